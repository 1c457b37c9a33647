"""`unclip-jax train`: bad input refused before the first step with nothing written; a decoder run on the
tiny model end to end (once the decoder objective is installed)."""

from __future__ import annotations

import json
import os

import pytest

import tiny_objective
from unclip_jax import cli


@pytest.fixture(scope="module")
def tiny_img2img(tmp_path_factory):
    from unclip_jax.tiny import write_tiny

    return write_tiny("unclip_img2img", str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_objective.write_folder(str(tmp_path_factory.mktemp("data") / "d"), n=4, size=36)


def _train(capsys, *args):
    code = cli.main(["train", *map(str, args)])
    return code, capsys.readouterr()


def _base(model, data, out, **extra):
    args = ["decoder", "--model", model, "--data", data, "--out", out, "--steps", 2, "--batch-size", 8,
            "--seed", 0, "--save-every", 1]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def test_help_lists_the_diffusers_style_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--gradient-accumulation-steps", "--lr-scheduler", "--max-grad-norm", "--ema-decay",
                   "--mixed-precision", "--snr-gamma", "--noise-offset", "--validation-prompt", "--remat", "--resume"):
        assert option in text


def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_img2img, data):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code, io = _train(capsys, *_base(tiny_img2img, empty, out))
    assert code == 2 and "no metadata.jsonl" in io.err and not out.exists()

    blocker = tmp_path / "file"
    blocker.write_text("")
    code, io = _train(capsys, *_base(tiny_img2img, data, blocker / "out"))
    assert code == 2 and "is not writable" in io.err

    code, io = _train(capsys, *_base(tiny_img2img, data, out, resolution=34))
    assert code == 2 and "--resolution 34: must be a positive multiple of 4" in io.err and not out.exists()

    if len(__import__("jax").devices()) == 8:
        args = _base(tiny_img2img, data, out)
        args[args.index("--batch-size") + 1] = 3
        code, io = _train(capsys, *args)
        assert code == 2 and "--batch-size 3 is not divisible by the 8 devices" in io.err and not out.exists()


def test_decoder_run_end_to_end(capsys, tmp_path, tiny_img2img, data, fast_compile):
    pytest.importorskip("unclip_jax.training.objectives.decoder")
    import unclip_jax

    out = tmp_path / "run"
    args = _base(tiny_img2img, data, out, resolution=32, validation_prompt="a fox", validation_steps=1,
                 lr_warmup_steps=0, learning_rate=1e-3)
    args[args.index("--save-every") + 1] = 2
    code, io = _train(capsys, *args)
    assert code == 0, io.err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert sorted(os.listdir(out / "validation")) == ["step-000000.png", "step-000002.png"]
    assert os.listdir(out / "tensorboard")
    pipe, params = unclip_jax.StableUnCLIPImg2ImgPipeline.from_pretrained(str(out / "final"))
    assert set(params) >= {"unet", "vae"}
    assert os.listdir(out / "checkpoints") == ["2"]
    # Resuming from another objective's checkpoint is refused before the model is loaded.
    code, io = _train(capsys, *["prior", *_base(tiny_img2img, data, out)[1:], "--resume"])
    assert code == 2 and "is a checkpoint of a 'decoder' run" in io.err
