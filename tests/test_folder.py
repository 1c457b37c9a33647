"""Pipeline folders on disk (weights/folder.py): what `overwrite` may replace, refused before any work;
stale partial folders of killed writes; the umask; the model index."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unclip_jax.conversion import convert_pipeline
from unclip_jax.weights.errors import CheckpointError
from unclip_jax.weights.folder import atomic_folder, prior_layout, remove_stale_partials


def _snapshot(root):
    """Every path under `root` (hidden ones included) with its content, to prove nothing changed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = "link" if os.path.islink(path) else open(path, "rb").read()
    return out


def _pipeline_folder(path, marker="old"):
    os.makedirs(path)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        f.write('{"_class_name": "StableUnCLIPPipeline"}')
    with open(os.path.join(path, "marker"), "w") as f:
        f.write(marker)


def _make(kind, out):
    if kind == "regular file":
        out.write_text("the user's notes")
    elif kind == "empty folder":
        out.mkdir()
    elif kind == "folder with user files":
        out.mkdir()
        (out / "photo.png").write_bytes(b"\x89PNG not really")
        (out / "sub").mkdir()
        (out / "sub" / "notes.txt").write_text("keep me")
    elif kind == "link to a pipeline folder":
        _pipeline_folder(out.parent / "real")
        out.symlink_to(out.parent / "real")


@pytest.mark.parametrize("kind", ["regular file", "empty folder", "folder with user files",
                                  "link to a pipeline folder"])
def test_overwrite_refuses_anything_but_a_pipeline_folder_before_any_work(tmp_path, kind):
    out = tmp_path / "out"
    _make(kind, out)
    before = _snapshot(tmp_path)
    # The library's write: the block (the work) never runs.
    ran = []
    with pytest.raises(FileExistsError, match=f"{out}: exists and is "), atomic_folder(str(out), overwrite=True):
        ran.append(True)
    assert not ran
    # The conversion: refused before the source is even looked at (it does not exist).
    with pytest.raises(FileExistsError, match=f"{out}: exists and is .*only a pipeline folder is overwritten"):
        convert_pipeline(str(tmp_path / "no-such-source"), str(out), overwrite=True, progress=False)
    # Without --overwrite: refused too, naming the flag.
    with pytest.raises(FileExistsError, match=f"{out}: already exists \\(pass --overwrite to replace it\\)"):
        convert_pipeline(str(tmp_path / "no-such-source"), str(out), progress=False)
    assert _snapshot(tmp_path) == before  # nothing moved, deleted, or left behind


def test_save_pretrained_overwrites_only_a_pipeline_folder(tmp_path):
    from unclip_jax.pipelines.loading import PipelineBase

    class Empty(PipelineBase):
        COMPONENTS = ()

    out = tmp_path / "out"
    _make("folder with user files", out)
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="a folder without model_index.json"):
        Empty().save_pretrained(str(out), {}, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists \\(pass overwrite=True to replace it\\)"):
        Empty().save_pretrained(str(out), {})
    assert _snapshot(tmp_path) == before
    Empty().save_pretrained(str(tmp_path / "saved"), {})
    Empty().save_pretrained(str(tmp_path / "saved"), {}, overwrite=True)
    assert sorted(os.listdir(tmp_path / "saved")) == ["model_index.json"]


def test_overwrite_replaces_a_pipeline_folder_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "out"
    _pipeline_folder(out)
    with atomic_folder(str(out), overwrite=True) as tmp:
        _pipeline_folder(os.path.join(tmp, "x"))
        os.replace(os.path.join(tmp, "x", "model_index.json"), os.path.join(tmp, "model_index.json"))
    assert sorted(os.listdir(out)) == ["model_index.json", "x"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # A failed write leaves the old folder as it was and no partial folder.
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError), atomic_folder(str(out), overwrite=True):
        raise RuntimeError("killed")
    assert _snapshot(tmp_path) == before


def test_stale_partial_folders_are_removed_by_the_next_write_and_only_those(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = [tmp_path / f".out.partial-{dead.pid}-abc", tmp_path / ".out.partial-k2j3h4"]  # pid-less: older runs
    keep = [tmp_path / f".out.partial-{os.getppid()}-live",  # a write still running
            tmp_path / ".other.partial-1-x", tmp_path / ".out.old-x", tmp_path / "out.partial-1-x"]
    for path in stale + keep:
        path.mkdir()
        (path / "data").write_text("x")
    (tmp_path / ".out.partial-file").write_text("a file, not a partial folder")
    with atomic_folder(str(out)) as tmp:
        (open(os.path.join(tmp, "model_index.json"), "w")).close()
    assert not any(p.exists() for p in stale)
    assert all((p / "data").exists() for p in keep) and (tmp_path / ".out.partial-file").exists()
    assert remove_stale_partials(str(out)) == []


def test_written_folders_follow_the_umask(tmp_path):
    import numpy as np

    from unclip_jax.weights.orbax_io import save_params

    old = os.umask(0o027)
    try:
        with atomic_folder(str(tmp_path / "out")) as tmp:
            save_params(os.path.join(tmp, "unet", "orbax_params"), {"kernel": np.zeros((2, 3), np.float32)})
    finally:
        os.umask(old)
    for dirpath, _, files in os.walk(tmp_path / "out"):
        assert os.stat(dirpath).st_mode & 0o777 == 0o750, dirpath
        for f in files:
            assert os.stat(os.path.join(dirpath, f)).st_mode & 0o777 == 0o640, f


def test_prior_layout_names_the_wrong_checkpoint(tmp_path):
    _pipeline_folder(tmp_path / "karlo")
    (tmp_path / "karlo" / "model_index.json").write_text('{"_class_name": "UnCLIPPipeline"}')
    assert prior_layout(str(tmp_path / "karlo"))["prior_text_encoder"] == "text_encoder"
    _pipeline_folder(tmp_path / "sd")
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(CheckpointError, match="a StableDiffusionPipeline has no prior; give a UnCLIPPipeline"):
        prior_layout(str(tmp_path / "sd"))
