"""The `unclip-jax` command as a user runs it: every subcommand in a subprocess on tiny checkpoints, and
user mistakes ending as one line on stderr with exit status 2.

Each generating subprocess pays JAX start-up and compilation, so the four runs start together in one
module fixture and the tests read their results; the mistakes (caught before any model work, or right
after loading) run in-process through `cli.main`, with two of them also as subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from unclip_jax import cli
from unclip_jax.schedulers import SCHEDULERS
from unclip_jax.tiny import write_tiny

# Fewer XLA optimisations: compilation is most of a tiny run's time, and these tests are about the command.
# No persistent compilation cache (it would go to the user's ~/.cache) except where a test gives one.
_ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
            UNCLIP_JAX_CACHE_DIR="")


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "unclip_jax.cli", *map(str, args)]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, timeout=600, env=_ENV)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny checkpoints of the three pipelines (the unCLIP one through `unclip-jax tiny`) and input images."""
    root = tmp_path_factory.mktemp("cli")
    r = _run("tiny", root / "unclip")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(root / "unclip")
    for kind in ("unclip_img2img", "depth2img"):
        write_tiny(kind, str(root / kind))
    _karlo_layout(root / "unclip", root / "karlo")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    # A depth map saved in color (gray values in RGB): read as its luminance. Near (bright) at the right.
    ramp = np.tile(np.linspace(0, 255, 48), (40, 1)).round().astype(np.uint8)
    PIL.Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(root / "depth_rgb.png")
    (root / "broken.png").write_text("not an image")
    # An output folder that already holds numbered images: new ones are numbered on, nothing overwritten.
    (root / "out_txt2img").mkdir()
    PIL.Image.new("RGB", (4, 4)).save(root / "out_txt2img" / "00007-old.png")
    return root


def _karlo_layout(unclip: Path, out: Path) -> None:
    """The tiny unCLIP checkpoint's prior, laid out as Karlo's UnCLIPPipeline folder (kakaobrain/karlo-v1-alpha):
    tokenizer, text_encoder, prior and an UnCLIPScheduler prior_scheduler."""
    out.mkdir()
    for theirs, ours in (("tokenizer", "prior_tokenizer"), ("text_encoder", "prior_text_encoder"), ("prior", "prior")):
        shutil.copytree(unclip / ours, out / theirs)
    index = json.loads((unclip / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "UnCLIPPipeline", "tokenizer": index["prior_tokenizer"], "text_encoder": index["prior_text_encoder"],
        "prior": index["prior"], "prior_scheduler": ["diffusers", "UnCLIPScheduler"]}))
    (out / "prior_scheduler").mkdir()
    (out / "prior_scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "UnCLIPScheduler", "clip_sample": True, "clip_sample_range": 5.0, "num_train_timesteps": 1000,
        "prediction_type": "sample", "variance_type": "fixed_small_log"}))


@pytest.fixture(scope="module")
def runs(root) -> dict[str, subprocess.CompletedProcess]:
    """The generating commands, started together: name -> finished process."""
    commands = {
        "txt2img": ("txt2img", "a photo of a cat", "--model", root / "unclip", "--steps", 2, "--prior-steps", 2,
                    "--noise-level", 5, "--count", 2, "--scheduler", "euler-a", "--negative-prompt", "blurry",
                    "--seed", 3, "--out", root / "out_txt2img"),
        # The real recipe's shape: an image-variation checkpoint's decoder with Karlo's prior.
        "txt2img_prior": ("txt2img", "a photo of a cat", "--model", root / "unclip_img2img", "--prior", root / "karlo",
                          "--steps", 2, "--prior-steps", 2, "--guidance", 1, "--out", root / "out_prior"),
        "variation": ("variation", "--image", root / "photo.png", "--model", root / "unclip_img2img", "--steps", 2,
                      "--noise-level", 100, "--size", 16, "--guidance", 1, "--progress", "--out", root / "out_var"),
        "depth2img": ("depth2img", "a dog", "--image", root / "photo.png", "--model", root / "depth2img",
                      "--steps", 4, "--strength", 0.5, "--height", 32, "--width", 40, "--save-depth",
                      "--out", root / "out_depth"),
        "depth2img_map": ("depth2img", "a dog", "--image", root / "photo.png", "--model", root / "depth2img",
                          "--steps", 2, "--depth-map", root / "depth_rgb.png", "--save-depth", "--scheduler",
                          "DDIMScheduler", "--dtype", "bf16", "--out", root / "out_depth_map"),
    }
    # txt2img writes its compiled programs into a cache folder of its own.
    envs = {"txt2img": dict(_ENV, UNCLIP_JAX_CACHE_DIR=str(root / "jax-cache"))}
    procs = {name: subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=envs.get(name, _ENV)) for name, args in commands.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def _finished(runs, name: str) -> list[str]:
    r = runs[name]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout.split()


def _meta(path: str) -> dict:
    return json.loads(PIL.Image.open(path).text["parameters"])


def test_txt2img(root, runs):
    paths = _finished(runs, "txt2img")
    out = root / "out_txt2img"
    # number (on from the 00007 there), command, seed, index in the run
    assert paths == [str(out / "00008-txt2img-3-0.png"), str(out / "00009-txt2img-3-1.png")]
    images = [PIL.Image.open(p) for p in paths]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # two latents, two images
    meta = _meta(paths[1])
    assert meta["prompt"] == "a photo of a cat" and meta["negative_prompt"] == "blurry"
    assert (meta["steps"], meta["prior_steps"], meta["noise_level"], meta["seed"], meta["count"]) == (2, 2, 5, 3, 2)
    assert meta["scheduler"] == "EulerAncestralDiscreteScheduler" and meta["index"] == 1
    assert meta["model"] == str(root / "unclip") and meta["command"] == "txt2img"
    assert (meta["height"], meta["width"]) == (32, 32)  # defaulted (the model's size), recorded as made
    assert images[0].text["Software"].startswith("unclip-jax ")
    assert len(os.listdir(root / "jax-cache")) >= 2  # at least the prior's and the decoder's loops


def test_txt2img_with_a_karlo_prior(root, runs):
    (path,) = _finished(runs, "txt2img_prior")
    assert PIL.Image.open(path).size == (32, 32)
    meta = _meta(path)
    assert meta["prior"] == str(root / "karlo") and meta["model"] == str(root / "unclip_img2img")


def test_variation_with_progress_bars(root, runs):
    (path,) = _finished(runs, "variation")
    assert PIL.Image.open(path).size == (16, 16)
    meta = _meta(path)
    assert meta["image"] == str(root / "photo.png") and meta["noise_level"] == 100 and meta["prompt"] == ""
    assert meta["scheduler"] == "DDIMScheduler"  # the checkpoint's own
    err = runs["variation"].stderr
    assert "loading" in err and "generating" in err and "denoising" in err and "2/2" in err


def test_depth2img_estimates_depth(root, runs):
    path, depth_path = _finished(runs, "depth2img")
    assert path.endswith("-depth2img-0-0.png") and depth_path.endswith("-depth2img-0-depth.png")
    assert PIL.Image.open(path).size == (40, 32)  # the input, resized to --width x --height
    depth = PIL.Image.open(depth_path)
    # At the input's size (the tiny DPT's grid is 32 x 32), not stretched, and with its parameters.
    assert depth.mode.startswith("I") and depth.size == (40, 32)
    d = np.asarray(depth)
    assert d.min() == 0 and d.max() == 65535  # normalised to the full 16-bit range
    depth_meta = _meta(depth_path)
    assert depth_meta["image_kind"] == "depth" and (depth_meta["height"], depth_meta["width"]) == (32, 40)
    meta = _meta(path)
    assert meta["strength"] == 0.5 and meta["height"] == 32 and meta["width"] == 40 and meta["depth_map"] is None
    assert meta["scheduler"] == "PNDMScheduler"


def test_depth2img_given_depth_map(root, runs):
    path, depth_path = _finished(runs, "depth2img_map")
    assert PIL.Image.open(path).size == (48, 40)
    assert (_meta(path)["height"], _meta(path)["width"]) == (40, 48)  # no --size: the input's, recorded
    # The map used is the given one (its luminance, normalised), not an estimate.
    ramp = np.linspace(0, 1, 48)
    np.testing.assert_allclose(np.asarray(PIL.Image.open(depth_path))[0] / 65535, ramp, atol=1 / 255)
    meta = _meta(path)
    assert meta["depth_map"] == str(root / "depth_rgb.png") and meta["dtype"] == "bf16"
    assert meta["scheduler"] == "DDIMScheduler"


# ------------------------------------------------------------------------------- mistakes


def _mistakes(root: Path) -> list[tuple[tuple, str]]:
    photo, unclip = root / "photo.png", root / "unclip"
    return [
        (("txt2img", "x", "--model", "/nonexistent/model"), "/nonexistent/model: no such pipeline folder"),
        (("txt2img", "x", "--model", root), "model_index.json: missing"),
        (("txt2img", "x", "--prior", root / "depth2img"), "--prior applies to a --model; the default model takes none"),
        (("depth2img", "x", "--image", photo, "--revision", "main"), "--revision applies to a --model"),
        (("txt2img", "x", "--model", unclip, "--size", "30"), "--size must be a positive multiple of 8"),
        (("txt2img", "x", "--model", unclip, "--height", "0"), "--height must be a positive multiple of 8"),
        (("txt2img", "x", "--model", unclip, "--size", "32", "--width", "32"), "give --size, or --height"),
        (("txt2img", "x", "--model", unclip, "--steps", "0"), "--steps must be at least 1"),
        (("txt2img", "x", "--model", unclip, "--prior-steps", "-1"), "--prior-steps must be at least 1"),
        (("txt2img", "x", "--model", unclip, "--steps", "two"), "argument --steps: invalid int value: 'two'"),
        (("txt2img", "x", "--model", unclip, "--guidance", "nan"), "--guidance must be a finite number"),
        (("txt2img", "x", "--model", unclip, "--scheduler", "warp-drive"), "unknown scheduler 'warp-drive'"),
        (("txt2img", "x", "--model", unclip, "--scheduler", "UnCLIPScheduler"), "unknown scheduler"),
        (("txt2img", "x", "--model", unclip, "--dtype", "fp8"), "argument --dtype: invalid choice: 'fp8'"),
        (("txt2img", "x", "--model", unclip, "--noise-level", "-1"), "--noise-level must be >= 0"),
        (("txt2img", "x", "--model", unclip, "--out", photo), "exists and is not a folder"),
        (("txt2img", "x", "--model", root / "depth2img"),
         "is a StableDiffusionDepth2ImgPipeline checkpoint; `txt2img` needs a StableUnCLIPPipeline"),
        (("txt2img", "x", "--model", root / "unclip_img2img"),
         "is a StableUnCLIPImg2ImgPipeline checkpoint; `txt2img` needs a StableUnCLIPPipeline (add --prior "),
        (("txt2img", "x", "--model", unclip, "--prior", root / "depth2img"),
         "a StableDiffusionDepth2ImgPipeline has no prior"),
        (("variation", "--model", unclip), "the following arguments are required: --image"),
        (("variation", "--image", root / "missing.png", "--model", root / "unclip_img2img"), "no such file"),
        (("variation", "--image", root / "broken.png", "--model", root / "unclip_img2img"),
         "cannot read it as an image"),
        (("depth2img", "x", "--image", photo, "--model", root / "depth2img", "--strength", "0"),
         "--strength must be in (0, 1]"),
        (("depth2img", "x", "--image", photo, "--model", root / "depth2img", "--strength", "1.5"),
         "--strength must be in (0, 1]"),
        (("depth2img", "x", "--image", photo, "--model", root / "depth2img", "--height", "32"),
         "give both --height and --width"),
        (("depth2img", "x", "--image", photo, "--model", root / "depth2img", "--max-pixels", "1000"),
         "is 48x40 = 1,920 pixels, past the budget of 1,000 pixels; resize it, or pass --max-pixels 0"),
        (("depth2img", "x", "--image", photo, "--model", root / "depth2img", "--size", "64", "--max-pixels", "4000"),
         "is 64x64 = 4,096 pixels"),
        (("depth2img", "x", "--image", photo, "--model", root / "depth2img", "--depth-map", root / "broken.png"),
         "--depth-map"),
        (("tiny", unclip, "--kind", "depth2img"), "already exists"),
        (("tiny", unclip, "--seed", "1"), "already exists"),
        (("tiny", photo), "already exists"),
        (("txt2img", "x", "--model", unclip, "--out", photo / "sub"), "cannot be created"),
        (("txt2img", "x", "--model", unclip, "--noise-level", "1000"), "--noise-level must be in [0, 999]"),
        (("tiny", root / "new", "--kind", "karlo"), "argument --kind: invalid choice: 'karlo'"),
        (("paint", "x"), "argument COMMAND: invalid choice: 'paint'"),
    ]


def test_mistakes_are_one_line(root, capsys):
    for args, message in _mistakes(root):
        assert cli.main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        prefix = f"unclip-jax {args[0]}: error: " if args[0] != "paint" else "unclip-jax: error: "
        assert len(err) == 1 and err[0].startswith(prefix) and message in err[0], (args, err)


def test_mistakes_in_files_are_found_before_loading(root, capsys):
    """An --out that cannot be written and a --noise-level past the model's image noising schedule (read from
    its scheduler config) end before the model is loaded: one line, no `loaded ...` line before it."""
    for args in (["--noise-level", "1000"], ["--out", str(root / "photo.png" / "sub")]):
        assert cli.main(["txt2img", "x", "--model", str(root / "unclip"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "loaded" not in err[0], err
    if os.geteuid() != 0:  # root writes anywhere
        locked = root / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main(["txt2img", "x", "--model", str(root / "unclip"), "--out", str(locked)]) == 2
        assert capsys.readouterr().err.strip() == f"unclip-jax txt2img: error: --out {locked}: not writable"


def test_checkpoint_mismatch_names_the_tensors(root, tmp_path, capsys):
    """A component whose PyTorch weights do not fit its model: one line with the first names of each kind
    and their counts (ConversionError's lists), not only `the checkpoint does not match the model`."""
    from safetensors.numpy import save_file

    broken = tmp_path / "broken"
    shutil.copytree(root / "unclip", broken)
    shutil.rmtree(broken / "vae")
    (broken / "vae").mkdir()
    shutil.copy(root / "unclip" / "vae" / "config.json", broken / "vae")
    save_file({"encoder.conv_in.weight_renamed": np.zeros((16, 3, 3, 3), np.float32),
               "decoder.conv_out.bias": np.zeros((5,), np.float32)}, str(broken / "vae" / "diffusion_pytorch_model.safetensors"))
    assert cli.main(["txt2img", "x", "--model", str(broken), "--steps", "1", "--prior-steps", "1",
                     "--no-compile-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"unclip-jax txt2img: error: {broken / 'vae'}: the checkpoint does not match the model: "), err
    assert "unexpected (1): encoder.conv_in.weight_renamed" in err, err
    assert "missing (" in err and ", ...;" in err and "wrong shape (1): " in err, err


def test_tiny_twice_and_no_pytorch_warning(tmp_path):
    """The README's job runs twice: `tiny` onto the tiny checkpoint it wrote (same kind and seed) leaves it as
    it is. Without torch installed, transformers' "PyTorch was not found" warning is not printed."""
    code = ("import sys; sys.modules['torch'] = None\n"  # as in a torch-free install
            "from unclip_jax.cli import main\n"
            "sys.exit(main(sys.argv[1:3]) or main(sys.argv[1:3]))")
    r = subprocess.run([sys.executable, "-c", code, "tiny", str(tmp_path / "t")], capture_output=True, text=True,
                       timeout=600, env=_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "t")] * 2
    assert "PyTorch was not found" not in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["no such pipeline folder", "cannot read it as an image"])
def test_mistakes_in_a_subprocess(root, which):
    """As a user sees them: exit status 2, the error last on stderr, no traceback."""
    args, message = next(case for case in _mistakes(root) if which in case[1])
    r = _run(*args)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"unclip-jax {args[0]}: error: ") and message in last, r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_every_scheduler_name():
    r = _run("txt2img", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: unclip-jax txt2img")
    for short, cls in cli.SCHEDULER_NAMES.items():
        assert short in r.stdout and cls in r.stdout
    assert "examples:" in r.stdout


def test_scheduler_names():
    assert set(cli.SCHEDULER_NAMES.values()) == set(SCHEDULERS) - {"UnCLIPScheduler"}
    assert cli.scheduler_class("Euler-A") == "EulerAncestralDiscreteScheduler"
    assert cli.scheduler_class("dpm++") == "DPMSolverMultistepScheduler"
    assert cli.scheduler_class("unipcmultistepscheduler") == "UniPCMultistepScheduler"


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_command_help(command, capsys):
    """Each command's own help, without importing jax, flax or transformers (a fast --help)."""
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: unclip-jax {command}")


def test_help_and_argument_checks_import_no_framework():
    code = ("import sys\nfrom unclip_jax import cli\n"
            "assert cli.main(['txt2img', 'x', '--model', 'm', '--size', '33']) == 2\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('jax', 'flax', 'transformers', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_bench_left_the_command_and_the_package():
    assert not (Path(cli.__file__).parents[1] / "bench.py").exists()  # benchmarks/bench.py now
    assert "bench" not in cli.COMMANDS


def test_tiny_kinds_and_convert_dtypes_match_the_library():
    from unclip_jax.weights.convert import DTYPES
    from unclip_jax.tiny import KINDS

    assert cli.tiny.KINDS == KINDS and cli.convert.DTYPES == tuple(DTYPES)


def test_prior_from_a_karlo_checkpoint_in_python(root, tmp_path):
    """`StableUnCLIPPipeline.from_pretrained(decoder, prior=karlo)` (the library side of --prior) samples as the
    checkpoint with its own prior, and saves as a whole StableUnCLIPPipeline folder that reloads the same."""
    import jax

    from unclip_jax import StableUnCLIPPipeline

    pipe, params = StableUnCLIPPipeline.from_pretrained(str(root / "unclip_img2img"), prior=str(root / "karlo"))
    own, own_params = StableUnCLIPPipeline.from_pretrained(str(root / "unclip"))
    assert type(pipe.prior_scheduler).__name__ == "DDPMScheduler"
    kw = dict(key=jax.random.key(3), num_inference_steps=2, prior_num_inference_steps=2, output_type="np")
    # The decoders differ (two tiny checkpoints); the priors are the same weights: equal image embeddings.
    prior_in, prior_cfg = pipe.prepare("a cat", params=params, key=kw["key"], prior_num_inference_steps=2)
    own_in, own_cfg = own.prepare("a cat", params=own_params, key=kw["key"], prior_num_inference_steps=2)
    np.testing.assert_array_equal(np.asarray(pipe.sample_prior(params, prior_in, kw["key"], config=prior_cfg)),
                                  np.asarray(own.sample_prior(own_params, own_in, kw["key"], config=own_cfg)))
    pipe.save_pretrained(str(tmp_path / "saved"), params)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableUnCLIPPipeline" and "feature_extractor" not in index
    assert index["prior_scheduler"] == ["diffusers", "DDPMScheduler"]
    again, again_params = StableUnCLIPPipeline.from_pretrained(str(tmp_path / "saved"))
    np.testing.assert_array_equal(again("a cat", params=again_params, **kw).images, pipe("a cat", params=params, **kw).images)


def test_compilation_cache_folder(monkeypatch, tmp_path):
    """UNCLIP_JAX_CACHE_DIR moves the cache (empty: no cache), else $XDG_CACHE_HOME or ~/.cache."""
    from unclip_jax import cache

    monkeypatch.setenv("UNCLIP_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert cache.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.setenv("UNCLIP_JAX_CACHE_DIR", "")
    assert cache.default_cache_dir() is None and cache.enable_compilation_cache() is None
    monkeypatch.delenv("UNCLIP_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == str(tmp_path / "xdg" / "unclip-jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == str(tmp_path / "home" / ".cache" / "unclip-jax" / "jax")
