"""The default model: the toy-domain unCLIP family of issue 18, shipped inside the package.

    from unclip_jax.toy import default
    pipe, params = uj.StableUnCLIPPipeline.from_pretrained(default.pipeline_folder("unclip"))

The package ships `weights/` beside this file, as `scripts/train_default_model.py` exports it (`ship`):

  weights/manifest.json   per folder: every file's size and sha256, and the tokenizer folders to rebuild
                          (name -> pad token and length), with the folder's digest
  weights/unclip          StableUnCLIPPipeline's components plus the image encoder and its processor, so
                          the one folder serves StableUnCLIPPipeline and StableUnCLIPImg2ImgPipeline
  weights/depth2img       StableDiffusionDepth2ImgPipeline's

with fp16 orbax params and without the CLIP tokenizer folders (3.5 MB each, three of them: the package's
limit is 25 MB). The package already carries the BPE they are made of, and `tokenizer.write_clip_tokenizer`
rebuilds them; `ship` checks, when exporting, that the rebuilt tokenizer equals the one the training used
(vocabulary, merges' effect on captions, pad token).

`pipeline_folder(name)` makes, once, a complete pipeline folder in the cache: the shipped files copied
(and checked against the manifest's sha256) plus the rebuilt tokenizers, at
CACHE/default-model/NAME-DIGEST (CACHE: $UNCLIP_JAX_CACHE_DIR when set and not empty, as the compilation
cache's `abstract/` trees; else $XDG_CACHE_HOME/unclip-jax or ~/.cache/unclip-jax). Copies rather than
links: the cache may be on another filesystem, and a reinstalled or edited package must not change a
folder named by the digest of what it held. The folder is written beside itself and renamed into place
(`weights.folder.atomic_folder`), so concurrent first uses and kills leave either nothing or a whole
folder; later calls check that the folder exists and return it.

This module imports nothing but the standard library (and unclip_jax.files) at import time (the CLI's checks use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from unclip_jax.files import atomic_write, file_sha256  # standard library only

NAMES = ("unclip", "depth2img")
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MANIFEST = "manifest.json"
# Sampling settings of the default model, per command, where the commands' defaults (those of the real
# checkpoints) do not suit it: guidance measured with unclip_jax.toy.evaluate on the shipped weights.
# txt2img: decoder guidance 10 -> 2 and prior guidance 4 -> 2 raised the colours right from 68% to 94% of
# the tests' 50 prompts (the first model). variation: of 96 variations without a prompt, guidance 3 keeps
# the picture's shape and colours in 80, guidance 1 / 2 / 4 in 65 / 78 / 73 (toy README). depth2img: of
# 144 scenes, guidance 3 takes the prompt's colours in 134, the pipeline's default 7.5 in 116.
SAMPLING = {"txt2img": {"guidance": 2.0, "prior_guidance": 2.0}, "variation": {"guidance": 3.0},
            "depth2img": {"guidance": 3.0}}
# Bump when the materialised folder's content changes for the same shipped files (e.g. how tokenizers are
# written): it is part of the cache folder's name.
LAYOUT_VERSION = 1
_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


class DefaultModelMissing(FileNotFoundError):
    """The package carries no (or an incomplete) default model."""


def weights_dir() -> str:
    return WEIGHTS_DIR


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown default model folder {name!r}; choose one of {', '.join(NAMES)}")


def manifest(weights: str | None = None) -> dict:
    """The shipped weights' manifest.json, or DefaultModelMissing naming the missing path."""
    path = os.path.join(weights or WEIGHTS_DIR, MANIFEST)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DefaultModelMissing(
            f"{path}: missing, so this installation has no default model (the weights that "
            "scripts/train_default_model.py exports belong in that folder); give --model / a model folder") from None
    except ValueError as e:
        raise DefaultModelMissing(f"{path}: unreadable ({e})") from None
    if data.get("format") != 1 or not isinstance(data.get("folders"), dict):
        raise DefaultModelMissing(f"{path}: not a default-model manifest of format 1")
    return data


def check_shipped(name: str, weights: str | None = None) -> dict:
    """The manifest entry of folder `name`, after checking that each of its files is present with its
    size (no hashing: cheap enough for the CLI's argument checks). DefaultModelMissing names the first
    missing or mis-sized file."""
    _check_name(name)
    weights = weights or WEIGHTS_DIR
    entry = manifest(weights)["folders"].get(name)
    if entry is None:
        raise DefaultModelMissing(f"{os.path.join(weights, MANIFEST)}: names no folder {name!r}")
    for rel, (size, _) in entry["files"].items():
        path = os.path.join(weights, name, rel)
        try:
            found = os.path.getsize(path)
        except OSError:
            raise DefaultModelMissing(f"{path}: missing (the default model's {name!r} folder is incomplete)") from None
        if found != size:
            raise DefaultModelMissing(f"{path}: {found} bytes where the manifest says {size}")
    return entry


def picture_size(name: str, weights: str | None = None) -> int:
    """The side in pixels of the pictures the default model `name` makes (and was trained on): its UNet's
    sample_size times the VAE's factor, as the pipelines derive it."""
    folder = os.path.join(weights or WEIGHTS_DIR, name)
    with open(os.path.join(folder, "unet", "config.json")) as f:
        sample_size = json.load(f)["sample_size"]
    with open(os.path.join(folder, "vae", "config.json")) as f:
        factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    return int(sample_size) * factor


def cache_dir() -> str:
    """The folder default models are materialised in (see the module docstring)."""
    env = os.environ.get("UNCLIP_JAX_CACHE_DIR")  # unclip_jax.cache.CACHE_DIR_ENV (that module imports jax)
    if env:
        return os.path.join(env, "default-model")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unclip-jax", "default-model")


def model_id(name: str, weights: str | None = None) -> str:
    """A short stable name of the shipped folder `name` (what the CLI records as the model)."""
    return f"default:{name}@{_key(check_shipped(name, weights))}"


def _key(entry: dict) -> str:
    return f"{entry['digest'][:16]}-v{LAYOUT_VERSION}"


def pipeline_folder(name: str, weights: str | None = None) -> str:
    """A complete pipeline folder of the default model `name` ("unclip" or "depth2img") that
    `from_pretrained` loads, materialised in `cache_dir()` on first use (see the module docstring).
    `weights` is the shipped folder (default: the package's)."""
    entry = check_shipped(name, weights)
    weights = weights or WEIGHTS_DIR
    folder = os.path.join(cache_dir(), f"{name}-{_key(entry)}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    from unclip_jax.weights.folder import atomic_folder  # noqa: PLC0415  (imports jax: only when writing)

    try:
        with atomic_folder(folder) as tmp:
            _materialise(os.path.join(weights, name), entry, tmp)
    except FileExistsError:
        # Another process renamed its copy into place while we wrote ours (ours is removed).
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise
    return folder


def _materialise(src: str, entry: dict, dst: str) -> None:
    for rel, (size, sha256) in sorted(entry["files"].items()):
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if _copy_hashing(os.path.join(src, rel), target) != sha256:
            raise DefaultModelMissing(f"{os.path.join(src, rel)}: its sha256 differs from the manifest's "
                                      "(a damaged or hand-edited default model; reinstall the package)")
    from unclip_jax.tokenizer import write_clip_tokenizer  # noqa: PLC0415

    for tok, spec in entry["tokenizers"].items():
        write_clip_tokenizer(os.path.join(dst, tok), pad_token=spec["pad_token"],
                             model_max_length=spec["model_max_length"])


def _copy_hashing(src: str, dst: str) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for block in iter(lambda: fi.read(1 << 20), b""):
            h.update(block)
            fo.write(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Export: complete pipeline folders -> the shipped layout


def _tokenizer_spec(folder: str, probe: list[str]) -> dict:
    """The write_clip_tokenizer arguments that rebuild tokenizer folder `folder`, checked: the rebuilt
    tokenizer has the same vocabulary, special tokens, length and ids of `probe`; else a ValueError."""
    import tempfile  # noqa: PLC0415

    from unclip_jax.tokenizer import load_tokenizer, write_clip_tokenizer  # noqa: PLC0415

    used = load_tokenizer(folder)
    spec = {"pad_token": str(used.pad_token), "model_max_length": int(used.model_max_length)}
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp, **spec)
        rebuilt = load_tokenizer(tmp)
        same = (used.get_vocab() == rebuilt.get_vocab()
                and all(getattr(used, t) == getattr(rebuilt, t) for t in ("bos_token", "eos_token", "unk_token",
                                                                          "pad_token", "pad_token_id"))
                and used(probe, padding="max_length", truncation=True).input_ids
                == rebuilt(probe, padding="max_length", truncation=True).input_ids)
    if not same:
        raise ValueError(f"{folder}: the package's BPE does not rebuild this tokenizer (write_clip_tokenizer "
                         f"with {spec}); it cannot be dropped from the shipped model")
    return spec


def ship(source: str, out: str, probe: list[str] | None = None) -> dict[str, int]:
    """Writes the shipped layout of the complete pipeline folders SOURCE/{unclip,depth2img} to `out`
    (which must not exist; written beside itself, then renamed): the folders without their CLIP tokenizer
    folders (each checked to be rebuilt exactly, `_tokenizer_spec`, on `probe` captions and the whole
    vocabulary) and manifest.json. Returns {folder: bytes shipped}."""
    from unclip_jax.weights.folder import atomic_folder, read_model_index  # noqa: PLC0415

    probe = probe or ["a red circle on a blue background", "an orange triangle at the bottom right, white background",
                      "A small GREEN square against a black background!", ""]
    folders, sizes = {}, {}
    with atomic_folder(out) as tmp:
        for name in NAMES:
            src = os.path.join(source, name)
            index = read_model_index(src)
            tokenizers = {k: _tokenizer_spec(os.path.join(src, k), probe) for k, v in index.items()
                          if isinstance(v, list) and len(v) == 2 and v[1] in _TOKENIZER_CLASSES}
            shutil.copytree(src, os.path.join(tmp, name), ignore=lambda d, _: [] if d != src else list(tokenizers))
            folders[name] = folder_entry(os.path.join(tmp, name), tokenizers)
            sizes[name] = sum(size for size, _ in folders[name]["files"].values())
        write_manifest(tmp, folders)
    return sizes


def folder_entry(folder: str, tokenizers: dict) -> dict:
    """The manifest's entry of shipped folder `folder` whose tokenizer folders `tokenizers` are rebuilt:
    every file's size and sha256, and the digest of both (which names the materialised cache folder)."""
    files = {}
    for root, _, names in os.walk(folder):
        for fname in names:
            path = os.path.join(root, fname)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = [os.path.getsize(path), file_sha256(path)]
    files = dict(sorted(files.items()))
    digest = hashlib.sha256(json.dumps([files, tokenizers], sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "tokenizers": tokenizers, "files": files}


def write_manifest(weights: str, folders: dict) -> None:
    """Writes WEIGHTS/manifest.json naming `folders` ({name: folder_entry(...)}), whole or not at all."""
    atomic_write(os.path.join(weights, MANIFEST), json.dumps({"format": 1, "folders": folders}, indent=1))
