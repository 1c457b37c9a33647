"""Finding and reading a component's PyTorch weights in a diffusers / transformers folder.

safetensors first (single file or a sharded `*.safetensors.index.json`); a pickle `.bin` is read only
when no safetensors exist, only through torch's weights-only loader, and only if torch is installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import numpy as np

from unclip_jax.weights.safetensors_io import CheckpointError, SafetensorsFile

# diffusers models, transformers models (new and old names).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _variant_name(stem: str, ext: str, variant: str | None) -> str:
    return f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"


def find_weight_files(folder: str, variant: str | None = None) -> list[str]:
    """The weight files of one component folder, safetensors preferred.

    Raises CheckpointError naming the folder when it has none (or none of `variant`).
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such component folder")
    for ext in ("safetensors", "bin"):
        for stem in WEIGHT_STEMS:
            single = os.path.join(folder, _variant_name(stem, ext, variant))
            index = os.path.join(folder, _variant_name(stem, ext, variant) + ".index.json")
            if os.path.isfile(single):
                return [single]
            if os.path.isfile(index):
                return _shards(index)
    wanted = f" (variant {variant!r})" if variant else ""
    raise CheckpointError(
        f"{folder}: no weights{wanted}: expected one of "
        + ", ".join(_variant_name(s, "safetensors", variant) for s in WEIGHT_STEMS)
        + " (or a .bin, or a sharded .index.json)"
    )


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
    """name -> numpy array over several weight files, read lazily (memory-mapped safetensors)."""

    def __init__(self, files: list[str]):
        self.files = files
        self._where: dict[str, Mapping] = {}
        for path in files:
            part = SafetensorsFile(path) if path.endswith(".safetensors") else _load_bin(path)
            for name in part:
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in another shard")
                self._where[name] = part

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_state_dict(folder: str, variant: str | None = None) -> StateDict:
    """Reads a component folder's weights (headers checked now, data read on access)."""
    return StateDict(find_weight_files(folder, variant))


def _load_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415  (optional: only pickle checkpoints need it)
    except ImportError as e:
        raise CheckpointError(
            f"{path}: a PyTorch pickle checkpoint needs torch; install the extra `unclip-jax[torch]` "
            "or convert it to safetensors"
        ) from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad pickle)
        raise CheckpointError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({e})") from e
    out = {}
    for name, t in sd.items():
        t = t.detach()
        out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


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
