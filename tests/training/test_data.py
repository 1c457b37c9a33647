"""Training data: imagefolder and datasets sources, diffusers' resize/crop/flip, deterministic order,
bad records skipped and counted, missing files refused, the iterator's position saved and restored."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import tiny_objective
from unclip_jax.training.data import DataError, DataIterator, crop_box, open_dataset, open_source


def _texts(it, n):
    return [it.next_example()["text"] for _ in range(n)]


def test_order_is_deterministic_per_epoch_and_resumes(tmp_path):
    folder = tiny_objective.write_folder(str(tmp_path / "d"), n=6, captions=[f"c{i}" for i in range(6)])
    source = open_source(folder)
    a = DataIterator(source, batch_size=2, resolution=16, seed=1, random_flip=True)
    epoch0, epoch1 = _texts(a, 6), _texts(a, 6)
    assert sorted(epoch0) == sorted(epoch1) == [f"c{i}" for i in range(6)]
    assert epoch0 != epoch1  # reshuffled each epoch
    b = DataIterator(source, batch_size=2, resolution=16, seed=1, random_flip=True)
    assert _texts(b, 12) == epoch0 + epoch1  # the same seed, the same order
    # Position saved mid-epoch and restored in a fresh iterator: the same examples, pixel for pixel.
    c = DataIterator(source, batch_size=2, resolution=16, seed=1, random_flip=True)
    c.next_batch(), c.next_batch()
    state = json.loads(json.dumps(c.state()))
    want = c.next_batch() + c.next_batch()
    d = DataIterator(source, batch_size=2, resolution=16, seed=1, random_flip=True)
    d.restore(state)
    got = d.next_batch() + d.next_batch()
    assert [e["text"] for e in got] == [e["text"] for e in want]
    assert all(np.array_equal(g["image"], w["image"]) for g, w in zip(got, want))
    with pytest.raises(DataError, match="seed 1"):
        DataIterator(source, batch_size=2, resolution=16, seed=2).restore(state)


def test_resize_crop_flip_as_torchvision_would(tmp_path):
    # torchvision's Resize(int) keeps the aspect ratio, the longer side rounded down; CenterCrop rounds offsets.
    assert crop_box(40, 50, 16, True, None) == ((16, 20), (0, 2))
    assert crop_box(51, 40, 16, True, None) == ((20, 16), (2, 0))
    folder = tmp_path / "d"
    folder.mkdir()
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :15] = 255  # left half white
    Image.fromarray(pixels).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t"}) + "\n")
    source = open_source(str(folder))
    it = DataIterator(source, batch_size=1, resolution=10, seed=0, center_crop=True, interpolation="nearest")
    image = it.next_example()["image"]
    assert image.shape == (10, 10, 3) and image.dtype == np.uint8
    want = np.asarray(Image.fromarray(pixels).resize((15, 10), Image.Resampling.NEAREST))[:, 2:12]
    np.testing.assert_array_equal(image, want)
    flips = set()
    it = DataIterator(source, batch_size=1, resolution=10, seed=0, center_crop=True, random_flip=True,
                      interpolation="nearest")
    for _ in range(16):
        flips.add(bool(it.next_example()["image"][0, 0, 0] == 0))
    assert flips == {True, False}  # both ways, from the seed


def test_bad_records_are_skipped_and_counted(tmp_path):
    folder = tiny_objective.write_folder(str(tmp_path / "d"), n=4)
    with open(os.path.join(folder, "2.png"), "wb") as f:
        f.write(b"not a png")
    with open(os.path.join(folder, "metadata.jsonl"), "a") as f:
        f.write(json.dumps({"file_name": "0.png"}) + "\n")  # no caption
        f.write("{broken\n")
    source = open_source(folder)
    assert len(source) == 4 and source.skipped == {"no caption": 1, "bad metadata line": 1}
    it = DataIterator(source, batch_size=3, resolution=16, seed=0)
    batches = [it.next_batch() for _ in range(2)]
    assert all(len(b) == 3 for b in batches)
    assert it.skipped == 2  # the unreadable image, once per epoch (two epochs started)


def test_missing_files_are_an_error_naming_them(tmp_path):
    folder = tiny_objective.write_folder(str(tmp_path / "d"), n=9)
    for i in range(7):
        os.remove(os.path.join(folder, f"{i}.png"))
    with pytest.raises(DataError, match=r"names 7 missing files: 0.png, 1.png, 2.png, 3.png, 4.png, \.\.\."):
        open_source(folder)
    assert len(open_source(folder, skip_missing=True)) == 2


@pytest.mark.parametrize("make", ["no metadata", "empty metadata"])
def test_folder_without_images_is_an_error(tmp_path, make):
    folder = tmp_path / "d"
    folder.mkdir()
    if make == "empty metadata":
        (folder / "metadata.jsonl").write_text("")
    with pytest.raises(DataError, match="metadata.jsonl" if make == "no metadata" else "no usable images"):
        open_source(str(folder))


def test_depth_maps_follow_their_image(tmp_path):
    folder = tiny_objective.write_folder(str(tmp_path / "d"), n=2)
    rows = []
    for i in range(2):
        depth = np.tile(np.arange(45, dtype=np.float32), (40, 1))  # grows left to right
        np.save(os.path.join(folder, f"{i}_depth.npy"), depth)
        rows.append({"file_name": f"{i}.png", "text": "t", "depth_file_name": f"{i}_depth.npy"})
        Image.fromarray(np.zeros((40, 45, 3), np.uint8)).save(os.path.join(folder, f"{i}.png"))
    (tmp_path / "d" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = open_source(folder, depth_column="depth_file_name")
    it = DataIterator(source, batch_size=1, resolution=16, seed=0, random_flip=True)
    seen = set()
    for _ in range(12):
        d = it.next_example()["depth"]
        assert d.shape == (16, 16) and d.dtype == np.float32
        seen.add(bool(d[0, 0] < d[0, -1]))
    assert seen == {True, False}  # flipped with their image, both ways


def test_datasets_object_and_saved_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for _ in range(3)]
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": images, "caption": ["a", "", "c"]}, features=features)
    source = open_dataset(ds, image_column="img", text_column="caption")
    assert len(source) == 2 and source.skipped == {"no caption": 1}
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = open_source(str(tmp_path / "saved"), image_column="img", text_column="caption")
    a = DataIterator(source, batch_size=2, resolution=16, seed=0).next_batch()
    b = DataIterator(saved, batch_size=2, resolution=16, seed=0).next_batch()
    assert [e["text"] for e in a] == [e["text"] for e in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    with pytest.raises(DataError, match="--caption-column 'text'"):
        open_dataset(ds, image_column="img")
