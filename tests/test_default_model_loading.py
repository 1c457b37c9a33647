"""The default model shipped in the package (unclip_jax/toy/default.py): the shipped layout (`ship`), its
materialisation into the cache (`pipeline_folder`), and the CLI without --model.

The mechanics run on a small hand-made shipped folder (configs and tokenizers, no weights), so they run
everywhere; the tests marked `shipped` read the package's own weights and are skipped, saying so, only
where the package has none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from unclip_jax.toy import default
from unclip_jax.tokenizer import load_tokenizer, write_clip_tokenizer

HAS_WEIGHTS = os.path.isfile(os.path.join(default.WEIGHTS_DIR, default.MANIFEST))
shipped = pytest.mark.skipif(not HAS_WEIGHTS, reason=f"the package carries no default model ({default.WEIGHTS_DIR}/"
                                                     f"{default.MANIFEST} is missing; scripts/train_default_model.py "
                                                     "--only export --ship puts it there)")
CAPTIONS = ["a red circle on a blue background", "an orange triangle at the bottom right, white background",
            "a small green square against a black background", "A LARGE Purple circle!!", ""]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_JAX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "default-model"


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    """A shipped layout written by `ship` from two small pipeline folders: model_index.json, a config, a
    binary file in a nested folder, and tokenizer folders padded as the toy model's are."""
    root = tmp_path_factory.mktemp("fake")
    pads = {"unclip": {"prior_tokenizer": "<|endoftext|>", "tokenizer": "!"}, "depth2img": {"tokenizer": "!"}}
    for name, tokenizers in pads.items():
        src = root / "full" / name
        (src / "unet" / "orbax_params" / "d").mkdir(parents=True)
        (src / "unet" / "config.json").write_text(json.dumps({"sample_size": 16}))
        (src / "vae").mkdir()
        (src / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [16, 32, 32]}))
        (src / "unet" / "orbax_params" / "d" / "0123abcd").write_bytes(os.urandom(1000))
        index = {"_class_name": "StableUnCLIPPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
        for tok, pad in tokenizers.items():
            write_clip_tokenizer(str(src / tok), pad_token=pad)
            index[tok] = ["transformers", "CLIPTokenizer"]
        (src / "model_index.json").write_text(json.dumps(index))
    sizes = default.ship(str(root / "full"), str(root / "weights"))
    return root / "weights", sizes


def test_ship_drops_tokenizers_and_records_them(fake_weights):
    weights, sizes = fake_weights
    assert sorted(os.listdir(weights)) == ["depth2img", default.MANIFEST, "unclip"]
    assert sorted(os.listdir(weights / "unclip")) == ["model_index.json", "unet", "vae"]
    entry = default.manifest(str(weights))["folders"]["unclip"]
    assert entry["tokenizers"] == {"prior_tokenizer": {"pad_token": "<|endoftext|>", "model_max_length": 77},
                                   "tokenizer": {"pad_token": "!", "model_max_length": 77}}
    assert sizes["unclip"] == sum(size for size, _ in entry["files"].values()) > 1000
    assert default.picture_size("unclip", str(weights)) == 64


def test_ship_refuses_a_tokenizer_the_bpe_cannot_rebuild(tmp_path):
    src = tmp_path / "full"
    for name in default.NAMES:
        write_clip_tokenizer(str(src / name / "tokenizer"), pad_token="!")
        (src / name / "model_index.json").write_text(json.dumps({"_class_name": "X",
                                                                 "tokenizer": ["transformers", "CLIPTokenizer"]}))
    vocab_path = src / "depth2img" / "tokenizer" / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]  # another tokenizer, same size
    vocab_path.write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="depth2img/tokenizer: the package's BPE does not rebuild"):
        default.ship(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["full"]


def test_materialise_once_then_reuse(fake_weights, cache, monkeypatch):
    weights, _ = fake_weights
    before = sorted(p for p, _, _ in os.walk(weights))
    folder = default.pipeline_folder("unclip", str(weights))
    assert os.path.dirname(folder) == str(cache) and os.path.basename(folder).startswith("unclip-")
    assert sorted(os.listdir(folder)) == ["model_index.json", "prior_tokenizer", "tokenizer", "unet", "vae"]
    assert (open(os.path.join(folder, "unet", "orbax_params", "d", "0123abcd"), "rb").read()
            == (weights / "unclip" / "unet" / "orbax_params" / "d" / "0123abcd").read_bytes())
    assert load_tokenizer(os.path.join(folder, "prior_tokenizer")).pad_token == "<|endoftext|>"
    assert load_tokenizer(os.path.join(folder, "tokenizer")).pad_token == "!"
    assert sorted(p for p, _, _ in os.walk(weights)) == before  # nothing written beside the shipped files
    monkeypatch.setattr(default, "_materialise", lambda *a: pytest.fail("materialised twice"))
    assert default.pipeline_folder("unclip", str(weights)) == folder
    assert os.listdir(cache) == [os.path.basename(folder)]


def test_read_only_package(fake_weights, cache, tmp_path):
    import shutil

    weights = tmp_path / "ro"
    shutil.copytree(fake_weights[0], weights)
    for d, dirs, files in os.walk(weights):
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
        os.chmod(d, 0o555)
    try:
        folder = default.pipeline_folder("depth2img", str(weights))
        assert os.path.isfile(os.path.join(folder, "tokenizer", "vocab.json"))
    finally:
        for d, _, _ in os.walk(weights):
            os.chmod(d, 0o755)


def test_stale_partial_folders(fake_weights, cache):
    """A partial folder that a killed materialisation left (its name, a dead pid) is removed; one of a
    process still running, and anything else in the cache, are left."""
    weights, _ = fake_weights
    key = default._key(default.check_shipped("unclip", str(weights)))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)
    cache.mkdir(parents=True)
    stale = cache / f".unclip-{key}.partial-{dead}-abc"
    running = cache / f".unclip-{key}.partial-{os.getppid()}-abc"
    other = cache / "my-notes"
    for path in (stale, running, other):
        (path / "unet").mkdir(parents=True)
    folder = default.pipeline_folder("unclip", str(weights))
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    assert not stale.exists() and running.exists() and other.exists()


def test_concurrent_first_use(fake_weights, cache, monkeypatch):
    """Another process finishes first while we write: its folder stays, ours is dropped, no partial is left."""
    weights, _ = fake_weights
    real = default._materialise
    calls = []

    def racing(src, entry, dst):
        calls.append(dst)
        real(src, entry, dst)
        if len(calls) == 1:  # the other process: starts after us, renames its folder in first
            inner = default.pipeline_folder("unclip", str(weights))
            with open(os.path.join(inner, "winner"), "w"):
                pass

    monkeypatch.setattr(default, "_materialise", racing)
    folder = default.pipeline_folder("unclip", str(weights))
    assert len(calls) == 2 and os.path.isfile(os.path.join(folder, "winner"))
    assert os.listdir(cache) == [os.path.basename(folder)]


def test_missing_or_damaged_weights(fake_weights, cache, tmp_path):
    import shutil

    with pytest.raises(default.DefaultModelMissing, match=f"{tmp_path / 'none' / default.MANIFEST}: missing"):
        default.pipeline_folder("unclip", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="unknown default model folder 'sd2'"):
        default.pipeline_folder("sd2", str(fake_weights[0]))
    weights = tmp_path / "w"
    shutil.copytree(fake_weights[0], weights)
    blob = weights / "unclip" / "unet" / "orbax_params" / "d" / "0123abcd"
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(default.DefaultModelMissing, match=f"{blob}: its sha256 differs"):
        default.pipeline_folder("unclip", str(weights))
    assert not cache.exists() or not [p for p in os.listdir(cache) if not p.startswith(".")]
    blob.unlink()
    with pytest.raises(default.DefaultModelMissing, match=f"{blob}: missing"):
        default.pipeline_folder("unclip", str(weights))


def test_cli_without_model_names_missing_weights(tmp_path, monkeypatch, capsys):
    from unclip_jax import cli

    monkeypatch.setattr(default, "WEIGHTS_DIR", str(tmp_path / "weights"))
    assert cli.main(["txt2img", "a red circle on a blue background", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unclip-jax txt2img: error: ") and \
        f"{tmp_path / 'weights' / default.MANIFEST}: missing" in err[0], err
    assert not (tmp_path / "out").exists()


@shipped
def test_commands_sample_the_default_model_with_its_own_guidance():
    """Without --model each generating command takes the default model's guidance for that command
    (toy.default.SAMPLING); a --guidance flag wins."""
    from unclip_jax.cli import common, parser

    runs = {"txt2img": ["txt2img", "a red circle on a blue background"],
            "variation": ["variation", "--image", "picture.png"],
            "depth2img": ["depth2img", "a red circle on a blue background", "--image", "picture.png"]}
    for command, argv in runs.items():
        args = parser().parse_args([*argv, "--out", "out"])
        common.check_model_folder(args)
        assert args.guidance == default.SAMPLING[command]["guidance"], command
        if command == "txt2img":
            assert args.prior_guidance == default.SAMPLING[command]["prior_guidance"]
        args = parser().parse_args([*argv, "--out", "out", "--guidance", "3"])
        common.check_model_folder(args)
        assert args.guidance == 3.0, command


def test_cache_dir_follows_the_cache_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNCLIP_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert default.cache_dir() == str(tmp_path / "c" / "default-model")
    for value in ("", None):  # "" turns the compilation cache off; the model still needs a folder
        if value is None:
            monkeypatch.delenv("UNCLIP_JAX_CACHE_DIR")
        else:
            monkeypatch.setenv("UNCLIP_JAX_CACHE_DIR", value)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default.cache_dir() == str(tmp_path / "xdg" / "unclip-jax" / "default-model")


# ------------------------------------------------------------------------------- the package's weights


@shipped
def test_shipped_size_and_tokenizers_are_the_trainings():
    """Under the issue's 25 MB; the tokenizers to rebuild are padded as the training's were (toy/init.py)."""
    from unclip_jax.toy.init import TOKENIZERS

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(default.WEIGHTS_DIR) for f in fs)
    assert total <= 25e6, total
    folders = default.manifest()["folders"]
    assert {name: {k: v["pad_token"] for k, v in folders[name]["tokenizers"].items()} for name in default.NAMES} \
        == TOKENIZERS
    for name in default.NAMES:
        default.check_shipped(name)


@shipped
def test_shipped_folders_load(cache, tmp_path):
    """Both materialised folders load with the three pipelines; their tokenizers give the ids of the
    tokenizer folders the training run started from (written as toy/init.py writes them)."""
    import unclip_jax as uj
    from unclip_jax.toy.init import TOKENIZERS

    folders = {name: default.pipeline_folder(name) for name in default.NAMES}
    for name, tokenizers in TOKENIZERS.items():
        for tok, pad in tokenizers.items():
            write_clip_tokenizer(str(tmp_path / name / tok), pad_token=pad)
            want = load_tokenizer(str(tmp_path / name / tok))
            got = load_tokenizer(os.path.join(folders[name], tok))
            assert got.pad_token == want.pad_token
            assert got(CAPTIONS, padding="max_length").input_ids == want(CAPTIONS, padding="max_length").input_ids
    for cls, name in ((uj.StableUnCLIPPipeline, "unclip"), (uj.StableUnCLIPImg2ImgPipeline, "unclip"),
                      (uj.StableDiffusionDepth2ImgPipeline, "depth2img")):
        pipe, params = cls.from_pretrained(folders[name])
        assert pipe.unet.config.sample_size * pipe.vae_scale_factor == default.picture_size(name) == 64
        assert set(params) >= {"unet", "vae", "text_encoder"}
