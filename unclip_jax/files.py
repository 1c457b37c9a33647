"""Single files written whole or not at all: the one way the package writes a file in place.

A file is written under a hidden temporary name in its own folder (`.NAME.PID-XXXXXXXX.tmp`; the same
filesystem, so the rename is atomic), flushed to disk (fsync), renamed over NAME (os.replace), and the
folder is fsynced so that the rename survives a power loss. An exception at any point removes the
temporary file and leaves NAME as it was; a process killed (SIGKILL included) before the rename leaves
NAME as it was and at most a temporary file, which `remove_temporaries` clears. Whole folders go through
`weights.folder.atomic_folder`.

This module imports nothing of the package at import time: every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterator

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str, *, sync_folder: bool = True) -> Iterator[str]:
    """Yields a temporary path beside `path` for the caller to write (a writer that takes a path: PIL,
    safetensors); when the block ends, that file is fsynced and renamed to `path`. On an exception the
    temporary file is removed and `path` is untouched. `sync_folder` False leaves the folder's fsync to
    the caller (`fsync_folder`, once for many files)."""
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if sync_folder:
        fsync_folder(folder)


def atomic_write(path: str, data: bytes | str, *, sync_folder: bool = True) -> None:
    """Writes `data` (str as UTF-8) to `path` atomically (module doc)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path, sync_folder=sync_folder) as tmp, open(tmp, "xb") as f:
        f.write(data)


def fsync_folder(folder: str) -> None:
    """fsync a folder: the renames in it survive a power loss."""
    _fsync(folder or ".")


def _fsync(path: str) -> None:
    """Flushes a file's (or a folder's) data to disk, whoever wrote it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# `.NAME.PID-XXXXXXXX.tmp`, and `.NAME.PID.tmp` as generation's outputs named them before.
_TEMPORARY = re.compile(r"\..+\.\d+(-[0-9a-f]{8})?" + re.escape(TMP_SUFFIX))


def is_temporary(name: str) -> bool:
    """Whether a file name is one that `atomic_path` gives its temporaries."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_temporaries(folder: str) -> None:
    """Removes the temporary files that killed writes left in `folder` (those named as `atomic_path` names
    them, nothing else)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if is_temporary(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's bytes, read in blocks of 1 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def png_bytes(image, parameters: dict | None = None) -> bytes:
    """A PIL image as PNG bytes; `parameters`, when given, stored as JSON under the PNG text key
    `parameters`, beside `Software: unclip-jax VERSION`."""
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415  (import time: the CLI's checks import this module)

    info = None
    if parameters is not None:
        from unclip_jax import __version__  # noqa: PLC0415

        info = PngInfo()
        info.add_text("parameters", json.dumps(parameters, sort_keys=True))
        info.add_text("Software", f"unclip-jax {__version__}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
