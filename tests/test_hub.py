"""Hub resolution offline: which files a pipeline downloads (on a real repo's listing), and loading by repo
id from a cache folder built here in huggingface_hub's own layout (blobs, refs, snapshots of symlinks),
with local_files_only and HF_HUB_OFFLINE, variants, revisions, and the errors for what is missing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from unclip_jax import CheckpointError, StableUnCLIPImg2ImgPipeline, StableUnCLIPPipeline
from unclip_jax.weights.hub import resolve, select_files
from unclip_jax.weights.safetensors_io import SafetensorsFile, save_file

# stabilityai/stable-diffusion-2-1-unclip as listed on the hub (every component in PyTorch .bin and
# safetensors, each in fp32 and an fp16 variant, plus the original single-file .ckpt). The flax
# .msgpack weights diffusers once shipped beside them are added so that they are seen to be left out.
SD21_UNCLIP = """
.gitattributes
README.md
feature_extractor/preprocessor_config.json
image_encoder/config.json
image_encoder/model.fp16.safetensors
image_encoder/model.safetensors
image_encoder/pytorch_model.bin
image_encoder/pytorch_model.fp16.bin
image_noising_scheduler/scheduler_config.json
image_normalizer/config.json
image_normalizer/diffusion_pytorch_model.bin
image_normalizer/diffusion_pytorch_model.fp16.bin
image_normalizer/diffusion_pytorch_model.fp16.safetensors
image_normalizer/diffusion_pytorch_model.safetensors
model_index.json
scheduler/scheduler_config.json
sd21-unclip-h.ckpt
text_encoder/config.json
text_encoder/flax_model.msgpack
text_encoder/model.fp16.safetensors
text_encoder/model.safetensors
text_encoder/pytorch_model.bin
text_encoder/pytorch_model.fp16.bin
tokenizer/merges.txt
tokenizer/special_tokens_map.json
tokenizer/tokenizer_config.json
tokenizer/vocab.json
unet/config.json
unet/diffusion_flax_model.msgpack
unet/diffusion_pytorch_model.bin
unet/diffusion_pytorch_model.fp16.bin
unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.safetensors
vae/config.json
vae/diffusion_flax_model.msgpack
vae/diffusion_pytorch_model.bin
vae/diffusion_pytorch_model.fp16.bin
vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.safetensors
""".split()

AUX = ["feature_extractor/preprocessor_config.json", "image_encoder/config.json",
       "image_noising_scheduler/scheduler_config.json", "image_normalizer/config.json", "model_index.json",
       "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/merges.txt",
       "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
       "unet/config.json", "vae/config.json"]
MODELS = {"image_encoder": "model", "image_normalizer": "diffusion_pytorch_model", "text_encoder": "model",
          "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def test_select_files_on_the_sd21_unclip_listing():
    img2img = StableUnCLIPImg2ImgPipeline.COMPONENTS
    plain = select_files(SD21_UNCLIP, img2img)
    assert plain == sorted(AUX + [f"{c}/{stem}.safetensors" for c, stem in MODELS.items()])
    fp16 = select_files(SD21_UNCLIP, img2img, "fp16")
    assert fp16 == sorted(AUX + [f"{c}/{stem}.fp16.safetensors" for c, stem in MODELS.items()])
    # Only the components asked for: a pipeline given its own unet and vae fetches neither.
    some = select_files(SD21_UNCLIP, tuple(c for c in img2img if c not in ("unet", "vae")))
    assert not any(f.startswith(("unet/", "vae/")) for f in some) and "text_encoder/model.safetensors" in some
    # A variant nobody has is named.
    with pytest.raises(CheckpointError, match="no component has weights of variant 'fp8'"):
        select_files(SD21_UNCLIP, img2img, "fp8")


def test_select_files_fallbacks_and_shards():
    listing = [
        "model_index.json",
        # No fp16 here: the plain safetensors, not the fp16 pickle (safetensors first, as diffusers).
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.fp16.bin",
        # Pickle only: the .bin of the variant.
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
        # Sharded, current diffusers naming for the variant; the plain set and another variant stay out.
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.bf16.json",
        "unet/diffusion_pytorch_model.bf16-00001-of-00001.safetensors",
        # The older variant shard naming.
        "prior/config.json", "prior/diffusion_pytorch_model.fp16.safetensors.index.json",
        "prior/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
        "prior/diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
        "prior/diffusion_pytorch_model.onnx",
    ]
    got = select_files(listing, ("text_encoder", "vae", "unet", "prior"), "fp16")
    assert got == sorted([
        "model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.bin",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "prior/config.json", "prior/diffusion_pytorch_model.fp16.safetensors.index.json",
        "prior/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
        "prior/diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
    ])
    plain = select_files(listing, ("unet", "vae"))
    assert plain == sorted(["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
                            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                            "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "vae/config.json",
                            "vae/diffusion_pytorch_model.bin"])


def test_online_resolution_downloads_the_selection(monkeypatch, tmp_path):
    """Online, the listing of the revision asked for decides the download's allow-list (the hub itself
    replaced by stand-ins that record what they are asked)."""
    import huggingface_hub

    calls = {}
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo, revision=None: calls.setdefault("list", (repo, revision)) and SD21_UNCLIP)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.setdefault("get", kw) and str(tmp_path))
    folder = resolve("stabilityai/stable-diffusion-2-1-unclip", StableUnCLIPImg2ImgPipeline.COMPONENTS,
                     variant="fp16", revision="v2", cache_dir="/c")
    assert folder == str(tmp_path)
    assert calls["list"] == ("stabilityai/stable-diffusion-2-1-unclip", "v2")
    assert calls["get"] == dict(revision="v2", cache_dir="/c", local_files_only=False,
                                allow_patterns=select_files(SD21_UNCLIP, StableUnCLIPImg2ImgPipeline.COMPONENTS, "fp16"))


# ---------------------------------------------------------------- a cache in huggingface_hub's layout


@pytest.fixture(autouse=True)
def no_hub_listing(monkeypatch):
    """Offline means no look-up: a listing asked of the hub fails the test."""
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **k: asked.append(a))
    yield
    assert not asked, f"the hub was asked for {asked}"

COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"


def _add_snapshot(repo_dir: Path, commit: str, source: Path, ref: str | None) -> None:
    """Adds `source`'s files as snapshot `commit`: contents in blobs/ (named by their hash, as the hub names
    them), relative symlinks in snapshots/<commit>/, and `ref` -> commit in refs/."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source)
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)


FP16_COMPONENTS = ("unet", "vae")  # the others have no fp16 files: they fall back to their plain weights


@pytest.fixture(scope="module")
def hub_cache(pipeline_dirs, tmp_path_factory):
    """Repo "org/unclip-img2img": commit A (ref "main") is the tiny img2img pipeline plus fp16 files for the
    unet and vae; commit B (ref "v1") is the same without them."""
    source = Path(pipeline_dirs("unclip_img2img", "a"))
    root = tmp_path_factory.mktemp("hub")
    with_fp16 = root / "with_fp16"
    shutil.copytree(source, with_fp16)
    for name in FP16_COMPONENTS:
        plain = SafetensorsFile(str(with_fp16 / name / "diffusion_pytorch_model.safetensors"))
        save_file({k: np.asarray(plain[k]).astype(np.float16) for k in plain},
                  str(with_fp16 / name / "diffusion_pytorch_model.fp16.safetensors"))
    cache = root / "cache"
    repo_dir = cache / "models--org--unclip-img2img"
    _add_snapshot(repo_dir, COMMIT_A, with_fp16, "main")
    _add_snapshot(repo_dir, COMMIT_B, source, "v1")
    _, base = StableUnCLIPImg2ImgPipeline.from_pretrained(str(source))
    return cache, base


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_loads_by_repo_id_from_the_cache(hub_cache):
    cache, base = hub_cache
    pipe, params = StableUnCLIPImg2ImgPipeline.from_pretrained("org/unclip-img2img", cache_dir=str(cache),
                                                               local_files_only=True)
    assert _equal(params, base)
    assert pipe._source == str(cache / "models--org--unclip-img2img" / "snapshots" / COMMIT_A)


def test_variant_per_component_with_fallback(hub_cache):
    cache, base = hub_cache
    _, params = StableUnCLIPImg2ImgPipeline.from_pretrained("org/unclip-img2img", cache_dir=str(cache),
                                                            local_files_only=True, variant="fp16")
    for name in base:
        expect = base[name]
        if name in FP16_COMPONENTS:
            expect = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), expect)
            assert not _equal(params[name], base[name]), name  # the fp16 file was read, not the plain one
        assert _equal(params[name], expect), name


@pytest.mark.parametrize("revision, has_fp16", [("v1", False), (COMMIT_B, False), (COMMIT_A, True), ("main", True)])
def test_revision_by_ref_or_commit(hub_cache, revision, has_fp16):
    cache, _ = hub_cache
    folder = resolve("org/unclip-img2img", StableUnCLIPImg2ImgPipeline.COMPONENTS, revision=revision,
                     cache_dir=str(cache), local_files_only=True)
    assert folder == str(cache / "models--org--unclip-img2img" / "snapshots" / (COMMIT_A if has_fp16 else COMMIT_B))
    assert os.path.exists(os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors")) == has_fp16


def test_what_is_missing_is_named(hub_cache):
    cache, _ = hub_cache
    kw = dict(cache_dir=str(cache), local_files_only=True)
    with pytest.raises(CheckpointError, match="org/absent: not a local folder, and not found in the local cache"):
        StableUnCLIPImg2ImgPipeline.from_pretrained("org/absent", **kw)
    with pytest.raises(CheckpointError, match="org/unclip-img2img: .*at revision 'v9'"):
        StableUnCLIPImg2ImgPipeline.from_pretrained("org/unclip-img2img", revision="v9", **kw)
    with pytest.raises(CheckpointError, match="no component has weights of variant 'fp16'"):
        StableUnCLIPImg2ImgPipeline.from_pretrained("org/unclip-img2img", revision="v1", variant="fp16", **kw)
    # A pipeline whose components the snapshot lacks says which.
    with pytest.raises(CheckpointError, match="model_index.json: names no component 'prior_tokenizer'"):
        StableUnCLIPPipeline.from_pretrained("org/unclip-img2img", **kw)


def test_convert_by_repo_id(hub_cache, tmp_path):
    """The conversion resolves a repo id like `from_pretrained` does: same revision, same variant choice."""
    from unclip_jax.conversion import convert_pipeline

    cache, _ = hub_cache
    kw = dict(cache_dir=str(cache), local_files_only=True, variant="fp16")
    out = convert_pipeline("org/unclip-img2img", str(tmp_path / "out"), progress=False, **kw)
    _, expected = StableUnCLIPImg2ImgPipeline.from_pretrained("org/unclip-img2img", **kw)
    _, params = StableUnCLIPImg2ImgPipeline.from_pretrained(out)
    assert _equal(params, expected)


def test_hf_hub_offline_environment(hub_cache):
    """HF_HUB_OFFLINE=1 (read by huggingface_hub at import, hence a fresh process) means the cache only,
    without local_files_only."""
    cache, _ = hub_cache
    code = ("import sys, huggingface_hub; from unclip_jax.weights.hub import resolve\n"
            "def ask(*a, **k): raise SystemExit('the hub was asked for a listing')\n"
            "huggingface_hub.HfApi.list_repo_files = ask\n"
            "print(resolve('org/unclip-img2img', ('unet',), cache_dir=sys.argv[1], revision='v1'))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(cache / "models--org--unclip-img2img" / "snapshots" / COMMIT_B)


@pytest.mark.parametrize("value", ["./tiny-unclp", "~/tiny-unclp", "/nonexistent/tiny-unclp", "a/b/c",
                                   "tests/tiny-unclp", "README.md"])
def test_mistyped_local_path_is_one_line_and_never_a_hub_id(monkeypatch, value):
    """A path-like value that is no folder is named at once; neither the listing nor a download is tried,
    online or not."""
    import huggingface_hub

    def ask(*a, **k):
        raise AssertionError(f"the hub was asked about {value!r}")

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", ask)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", ask)
    what = "not a pipeline folder" if os.path.exists(value) else "no such pipeline folder"
    with pytest.raises(CheckpointError) as e:
        StableUnCLIPPipeline.from_pretrained(value)
    assert str(e.value) == f"{value}: {what} (a local path: not looked up on the hub)"


def test_offline_unknown_repo_id_fails_at_once(tmp_path, monkeypatch):
    """Offline, a repo id absent from the cache is one error from the cache look-up: no listing (the
    autouse fixture fails the test on one), and the download asked for the cache only."""
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    with pytest.raises(CheckpointError, match="org/absent: not a local folder, and not found in the local cache"):
        resolve("org/absent", ("unet",), cache_dir=str(tmp_path))
    assert [c["local_files_only"] for c in calls] == [True]
