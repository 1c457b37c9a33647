"""Reading PyTorch checkpoints as numpy, without torch.

safetensors files are parsed here directly (8-byte header length, JSON header, raw little-endian
data) so that bf16 tensors load through `ml_dtypes`, shapes can be read without touching the data
(for abstract coverage checks), and a truncated or corrupt file is reported with its path before any
tensor is used. Data is memory-mapped: a tensor is copied out only when it is converted.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from unclip_jax.weights.errors import CheckpointError

__all__ = ["CheckpointError", "SafetensorsFile", "TensorInfo", "read_header", "read_metadata", "save_file"]

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# A header larger than this is not a safetensors header but garbage (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file, and what it is."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _raw_header(path: str) -> tuple[dict, int, int]:
    """(the header's JSON object, the header length, the file size), or a CheckpointError naming `path`."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file (header of {n} bytes in a file of {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, n, size


def read_metadata(path: str) -> dict[str, str]:
    """The header's `__metadata__` (string to string; empty when absent), without reading tensor data."""
    return dict(_raw_header(path)[0].get("__metadata__") or {})


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses a safetensors header and checks that every tensor lies inside the file.

    Raises CheckpointError naming `path` when the file is truncated, not safetensors, or inconsistent.
    """
    header, n, size = _raw_header(path)
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} ({e!r})") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != nbytes or start < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes for shape {shape} {entry['dtype']}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {base + end}, file has {size}"
            )
        infos[name] = TensorInfo(path, dtype, shape, base + start, base + end)
    return infos


class SafetensorsFile(Mapping):
    """A read-only mapping name -> numpy array over one memory-mapped safetensors file."""

    def __init__(self, path: str):
        self.path = path
        self.infos = read_header(path)
        self._mmap = None

    def _buffer(self):
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.infos else b""
        return self._mmap

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.infos[name]
        arr = np.frombuffer(self._buffer(), dtype=info.dtype, count=int(np.prod(info.shape, dtype=np.int64)),
                            offset=info.start)
        return arr.reshape(info.shape)

    def __iter__(self):
        return iter(self.infos)

    def __len__(self):
        return len(self.infos)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (bf16 included) as a safetensors file, atomically (temporary file, then rename)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(arr.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shapes_of(files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) for every tensor in the given safetensors files, reading headers only."""
    out = {}
    for path in files:
        for name, info in read_header(path).items():
            out[name] = (info.shape, info.dtype)
    return out
