"""The `unclip-jax` command as a user runs it: the README's main job, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import PIL.Image
import pytest


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "unclip_jax.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_tiny_checkpoint_text_to_png(tmp_path):
    """`unclip-jax tiny` then `unclip-jax txt2img`: a PNG carrying its generation parameters, no torch."""
    r = _run("tiny", str(tmp_path / "tiny"))
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = _run("txt2img", "a photo of a cat", "--model", str(tmp_path / "tiny"), "--steps", "2", "--prior-steps", "2",
             "--noise-level", "5", "--count", "2", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert len(paths) == 2
    image = PIL.Image.open(paths[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    meta = json.loads(image.text["parameters"])
    assert meta["prompt"] == "a photo of a cat" and meta["steps"] == 2 and meta["noise_level"] == 5


@pytest.mark.parametrize("args, message", [
    (("txt2img", "x", "--model", "/nonexistent/model"), "/nonexistent/model: no such pipeline folder"),
    (("txt2img", "x", "--model", ".", "--size", "30"), "--size must be a positive multiple of 8"),
])
def test_user_errors_are_one_line(args, message):
    r = _run(*args)
    assert r.returncode == 2
    # Progress lines may precede it; the error is one line, last, with no traceback.
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"unclip-jax {args[0]}: error: ") and message in last, r.stderr
    assert "Traceback" not in r.stderr
