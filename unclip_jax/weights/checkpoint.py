"""Finding and reading a component's PyTorch weights in a diffusers / transformers folder.

safetensors first (single file or a sharded `*.safetensors.index.json`); a pickle `.bin` is read only
when no safetensors exist, only through torch's weights-only loader, and only if torch is installed
(`read_pickle`, which textual inversion's pickles use too).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from unclip_jax.weights.errors import CheckpointError
from unclip_jax.weights.safetensors_io import SafetensorsFile

# diffusers models, transformers models (new and old names).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
# safetensors first: a pickle is read only when a component has no safetensors at all.
WEIGHT_FORMATS = ("safetensors", "bin")
_SHARD = r"\d{5}-of-\d{5}"
# A shard index of any format or variant (`x.safetensors.index.json`, `x.safetensors.index.fp16.json`, ...).
WEIGHT_INDEX = re.compile(r".*\.index(\.[^.]+)?\.json")
# Besides weights, a component folder holds configs (.json), BPE merges (.txt) and sentencepiece models.
AUX_EXTENSIONS = (".json", ".txt", ".model")


def is_aux_file(name: str) -> bool:
    """Whether a component folder's file is a config, tokenizer or processor file (not weights)."""
    return name.endswith(AUX_EXTENSIONS) and not WEIGHT_INDEX.fullmatch(name)


def _variant_name(stem: str, ext: str, variant: str | None) -> str:
    return f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"


@dataclass(frozen=True)
class WeightSet:
    """One component's weights among the files of its folder (names relative to the folder).

    entry: the file to open, a single weight file or a shard index; files: every file of the set
    (for an index, the index and its shards as their names say, for choosing downloads).
    """

    entry: str
    files: tuple[str, ...]
    variant: str | None

    @property
    def sharded(self) -> bool:
        return bool(WEIGHT_INDEX.fullmatch(self.entry))


def weight_set(names: Iterable[str], variant: str | None = None, fallback: bool = False) -> WeightSet | None:
    """The weight set of `variant` among a component folder's file names, or None.

    safetensors before .bin (with `fallback`, plain safetensors before `variant` .bin files, as diffusers
    ignores every .bin of a pipeline that has safetensors), then diffusers' stems before transformers';
    a single file before a sharded set. Variant shards are recognised in the layouts diffusers reads:
    `model.fp16-00001-of-00002.safetensors` with `model.safetensors.index.fp16.json`, and the older
    `model-00001-of-00002.fp16.safetensors` with `model.fp16.safetensors.index.json` or
    `model.safetensors.fp16.index.json`.
    """
    names = set(names)
    for ext in WEIGHT_FORMATS:
        for v, stem in itertools.product((variant, None) if variant and fallback else (variant,), WEIGHT_STEMS):
            found = _find_set(names, stem, ext, v)
            if found is not None:
                return found
    return None


def _find_set(names: set[str], stem: str, ext: str, variant: str | None) -> WeightSet | None:
    if variant:
        v = re.escape(variant)
        single = _variant_name(stem, ext, variant)
        indexes = (f"{stem}.{ext}.index.{variant}.json", f"{stem}.{variant}.{ext}.index.json",
                   f"{stem}.{ext}.{variant}.index.json")
        shard = re.compile(rf"{stem}(\.{v}-{_SHARD}|-{_SHARD}\.{v})\.{ext}")
    else:
        single, indexes = f"{stem}.{ext}", (f"{stem}.{ext}.index.json",)
        shard = re.compile(rf"{stem}-{_SHARD}\.{ext}")
    if single in names:
        return WeightSet(single, (single,), variant)
    for index in indexes:
        if index in names:
            return WeightSet(index, (index, *sorted(n for n in names if shard.fullmatch(n))), variant)
    return None


def pipeline_weight_sets(
    listing: Mapping[str, Iterable[str]], variant: str | None, where: str
) -> dict[str, WeightSet]:
    """The weight set of every component that has weights, given each component's file names.

    As in diffusers, `variant` is taken per component: a component without files of the variant uses its
    plain weights; but a variant that no component has is an error naming it.
    """
    chosen = {}
    for name, names in listing.items():
        names = list(names)
        found = weight_set(names, variant, fallback=True)
        if found is not None:
            chosen[name] = found
    if variant and chosen and not any(w.variant == variant for w in chosen.values()):
        raise CheckpointError(
            f"{where}: no component has weights of variant {variant!r} (files like "
            f"{_variant_name('diffusion_pytorch_model', 'safetensors', variant)}); load without `variant` "
            "to use the plain weights"
        )
    return chosen


def find_weight_files(folder: str, variant: str | None = None) -> list[str]:
    """The weight files of one component folder, safetensors preferred.

    Raises CheckpointError naming the folder when it has none (or none of `variant`).
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such component folder")
    found = weight_set(os.listdir(folder), variant)
    if found is None:
        wanted = f" (variant {variant!r})" if variant else ""
        raise CheckpointError(
            f"{folder}: no weights{wanted}: expected one of "
            + ", ".join(_variant_name(s, "safetensors", variant) for s in WEIGHT_STEMS)
            + " (or a .bin, or a sharded .index.json)"
        )
    path = os.path.join(folder, found.entry)
    return _shards(path) if found.sharded else [path]


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path}: unreadable shard index ({e})") from e
    folder = os.path.dirname(index_path)
    files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    for path in files:
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_path}: names shard {os.path.basename(path)}, which is missing")
    return files


class StateDict(Mapping):
    """name -> numpy array over several weight files, each tensor read on access; `shapes` (name ->
    shape) is known without reading any data."""

    def __init__(self, files: list[str]):
        self.files = files
        self._where: dict[str, Mapping] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            part = SafetensorsFile(path) if path.endswith(".safetensors") else _flat_pickle(path)
            for name in part:
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in another shard")
                self._where[name] = part
                self.shapes[name] = part.shapes[name] if isinstance(part, SafetensorsFile) else part[name].shape

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_state_dict(folder: str, variant: str | None = None) -> StateDict:
    """Reads a component folder's weights (headers checked now, data read on access)."""
    return StateDict(find_weight_files(folder, variant))


def read_pickle(path: str, what: str = "checkpoint"):
    """A PyTorch pickle (`torch.save`) read with torch's weights-only loader: the same structure (nested
    dicts and lists as saved) with every tensor as a numpy array (bf16 widened to float32, which numpy
    lacks). Needs the optional torch extra; `what` names the file's kind in the errors."""
    try:
        import torch  # noqa: PLC0415  (optional: only pickle files need it)
    except ImportError as e:
        raise CheckpointError(f"{path}: a PyTorch pickle {what} needs torch; install the extra "
                              "`unclip-jax[torch]` or convert it to safetensors") from e
    try:
        # Memory-mapped where the file is a zip archive (torch.save's format since 1.6); older pickles cannot be.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad pickle)
        raise CheckpointError(f"{path}: cannot load as a weights-only PyTorch {what} ({e})") from e

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            x = x.detach()
            return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        if isinstance(x, Mapping):
            return {k: to_numpy(v) for k, v in x.items()}
        return [to_numpy(v) for v in x] if isinstance(x, (list, tuple)) else x

    return to_numpy(obj)


def _flat_pickle(path: str) -> dict[str, np.ndarray]:
    """A pickled state dict: a flat mapping name -> tensor, or a CheckpointError naming what is not."""
    sd = read_pickle(path)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: not a state dict (a {type(sd).__name__})")
    for name, value in sd.items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor (a {type(value).__name__})")
    return dict(sd)


def read_config(folder: str, name: str = "config.json") -> dict:
    """A component's config.json, with a clear error naming the file when it is absent or broken."""
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
