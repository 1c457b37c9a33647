"""safetensors files as numpy, through the safetensors library's numpy API (no torch).

Opening a file reads and validates its header (every tensor inside the file, the file fully
covered); shapes and dtypes are known from then on without reading data, and each tensor is read on
access. bf16 arrive as `ml_dtypes.bfloat16`. A file the library refuses is reported with its path and,
where the header says so, what is wrong (truncated, at which tensor; corrupt header).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import safetensors
import safetensors.numpy

from unclip_jax.files import atomic_path
from unclip_jax.weights.errors import CheckpointError

__all__ = ["CheckpointError", "SafetensorsFile", "TensorInfo", "read_header", "read_metadata", "save_file"]


@dataclass(frozen=True)
class TensorInfo:
    """What one tensor of a safetensors file is (from the header; no data read)."""

    dtype: str  # the format's name: "F32", "BF16", ...
    shape: tuple[int, ...]


def _open(path: str):
    """The library's handle on `path` (header validated), or a CheckpointError naming the file."""
    try:
        return safetensors.safe_open(path, framework="np")
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001  (SafetensorError, and Rust panics surfacing as other kinds)
        raise CheckpointError(_diagnose(path, e)) from e


def _diagnose(path: str, error: Exception) -> str:
    """Why the library refused `path`, said in terms of the file: the format is an 8-byte little-endian
    header length, a JSON header of tensor entries with data offsets, then the data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: truncated safetensors file ({size} bytes, no header)"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"{path}: truncated or corrupt safetensors file (header of {n} bytes in a file of {size})"
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = {k: 8 + n + int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"{path}: corrupt safetensors header ({e})"
    past = [k for k in sorted(ends, key=ends.get) if ends[k] > size]
    if past:
        return f"{path}: truncated safetensors file: tensor {past[0]!r} ends at byte {ends[past[0]]}, file has {size}"
    return f"{path}: not a valid safetensors file ({error})"


def read_header(path: str) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor of `path`; a CheckpointError naming `path` when the file is
    truncated, not safetensors, or inconsistent."""
    with _open(path) as f:
        return {name: TensorInfo(f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                for name in f.keys()}


def read_metadata(path: str) -> dict[str, str]:
    """The header's `__metadata__` (string to string; empty when absent), without reading tensor data."""
    with _open(path) as f:
        return dict(f.metadata() or {})


class SafetensorsFile(Mapping):
    """A read-only mapping name -> numpy array over one safetensors file; `shapes` without reading data."""

    def __init__(self, path: str):
        self.path = path
        self._file = _open(path)
        self.shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in self._file.keys()}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (bf16 included) as a safetensors file, atomically (temporary file, then rename)."""
    arrays = {name: np.ascontiguousarray(np.asarray(x)) for name, x in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
        except Exception as e:  # noqa: BLE001  (an unsupported dtype, a non-string metadata value)
            raise CheckpointError(f"{path}: cannot write ({e})") from e
