"""files: a file is written whole or not at all (an exception or a SIGKILL leaves the old file), and the
temporaries a kill leaves are recognised and cleared without touching anything else."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest

from unclip_jax import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_writes_bytes_and_text_and_replaces(tmp_path):
    path = tmp_path / "a.json"
    files.atomic_write(str(path), b"old")
    files.atomic_write(str(path), "new \u00e9", sync_folder=False)
    assert path.read_bytes() == "new \u00e9".encode()
    assert os.listdir(tmp_path) == ["a.json"]


def test_exception_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), files.atomic_path(str(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half of the n")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(f"{dst}: read-only")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        files.atomic_write(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_sigkill_mid_write_leaves_the_old_file_and_a_temporary_that_is_cleared(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    child = textwrap.dedent(f"""
        import sys, time
        from unclip_jax import files
        with files.atomic_path({str(path)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert path.read_bytes() == b"old"
    left = sorted(set(os.listdir(tmp_path)) - {"a.bin"})
    assert len(left) == 1 and files.is_temporary(left[0]) and left[0].startswith(".a.bin.")
    for name in (".notes.tmp", "b.1.tmp", ".b.1.txt"):  # the user's files, not ours
        (tmp_path / name).write_text("keep")
    files.remove_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".b.1.txt", ".notes.tmp", "a.bin", "b.1.tmp"]


def test_png_bytes_records_parameters():
    image = PIL.Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    read = PIL.Image.open(io.BytesIO(files.png_bytes(image, {"seed": 3, "prompt": "a"})))
    assert json.loads(read.text["parameters"]) == {"seed": 3, "prompt": "a"}
    assert read.text["Software"].startswith("unclip-jax ")
    assert np.array_equal(np.asarray(read), np.asarray(image))
    assert PIL.Image.open(io.BytesIO(files.png_bytes(image))).text == {}
