"""Training data: image + caption (+ depth) examples, transformed as diffusers' training scripts do, served
in deterministic per-epoch order by an iterator whose whole position is a small dict.

Sources:

- an image folder in the Hugging Face `imagefolder` convention: `DIR/metadata.jsonl` (or
  `DIR/train/metadata.jsonl`), one JSON object per line with `file_name` (relative to the metadata file)
  and `text` (the caption); for depth training also a depth-map column, `depth_file_name` unless
  `depth_column` says otherwise, naming a `.npy` array [H, W] or a single-channel image (8- or 16-bit
  PNG) holding the depth map;
- a Hugging Face `datasets.Dataset` (or a folder written by its `save_to_disk`), with the image, caption
  and optional depth columns named by `image_column`, `text_column`, `depth_column`.

Each example is resized so its shorter side is `resolution`, cropped to `resolution` x `resolution`
(centre, or at a random position; Lanczos resampling by default, diffusers' `--image_interpolation_mode`
default) and flipped left-right with probability 1/2 if `random_flip` (the
`Resize` / `CenterCrop`|`RandomCrop` / `RandomHorizontalFlip` of diffusers' train_text_to_image); a depth
map follows its image through the same geometry. Examples are `{"image": uint8 [R, R, 3], "text": str,
"depth": float32 [R, R] (depth only)}`, plus "record" (the record's index in the source) from the
iterator; normalisation is the objective's `collate`.

Bad records are skipped and counted, never fatal: a record without a caption (found when the source is
opened), an image or depth map that cannot be read (found when it is read). Files that the metadata names
but that do not exist are an error when the source is opened (naming how many and the first few),
unless `skip_missing=True`, which counts them as bad records instead.

Order: epoch `e` visits the records in `np.random.default_rng([seed, e]).permutation(n)`; the random crop
and flip of the record at position `i` of epoch `e` come from `np.random.default_rng([seed, e, i])`. So the
iterator's whole position is `{"epoch", "index", "skipped"}` (plus the seed it was made with): a
checkpoint saves `state()`, a resumed run calls `restore(state)` and sees exactly the batches the
uninterrupted run saw. grain was measured as an alternative (its import alone takes 2.2 s on the test
machine) and not used: this needs a fixed order, per-record augmentation seeds and a count of skipped
records in the saved position, which a plain iterator gives in a few lines.

Several hosts: every process walks the same global order (same seed) but reads only the records of its
own rows of each global batch (`next_batch(rows, exchange)`): which records turned out unreadable is
exchanged between the processes once per batch (a few bytes; more rounds only when bad records need
replacing), so the batch holds exactly the records a single process would have put in it and every
process ends at the same position with the same `skipped` count. The rows become one global array in
`sharding.Layout.put_rows`. `collate` must treat examples row by row (every objective's does: fixed-length
tokens, per-image processing), so collating a process's rows gives that process's rows of the batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_DEPTH_COLUMN = "depth_file_name"
METADATA = "metadata.jsonl"
_SHOW = 5  # how many missing files an error names


class DataError(ValueError):
    """The training data cannot be used (reported before the first step)."""


class BadRecord(Exception):
    """One record cannot be read; it is skipped and counted."""


# ---------------------------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Record:
    """What a source knows of one example before it is read."""

    image: Any  # a path, or a PIL image / array / datasets image dict
    text: str
    depth: Any = None


@dataclasses.dataclass
class Source:
    """The usable records of a data set and what was dropped while opening it."""

    records: list[Record]
    skipped: dict[str, int]  # reason -> count
    description: str

    def __len__(self) -> int:
        return len(self.records)


def _metadata_path(folder: str) -> str:
    for candidate in (os.path.join(folder, METADATA), os.path.join(folder, "train", METADATA)):
        if os.path.isfile(candidate):
            return candidate
    raise DataError(f"{folder}: no {METADATA} (an image folder needs one line per image with "
                    f"'file_name' and 'text')")


def open_image_folder(folder: str, *, depth_column: str | None = None, skip_missing: bool = False,
                      text_column: str = "text") -> Source:
    """The records of an imagefolder-style `folder` (see the module docstring)."""
    if not os.path.isdir(folder):
        raise DataError(f"--data {folder}: not a folder")
    meta = _metadata_path(folder)
    base = os.path.dirname(meta)
    records, missing, skipped = [], [], {"no caption": 0, "missing file": 0, "bad metadata line": 0}
    with open(meta, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped["bad metadata line"] += 1
            continue
        files = [os.path.join(base, name)]
        depth = None
        if depth_column is not None:
            if not row.get(depth_column):
                skipped["no depth map"] = skipped.get("no depth map", 0) + 1
                continue
            depth = os.path.join(base, row[depth_column])
            files.append(depth)
        absent = [p for p in files if not os.path.isfile(p)]
        if absent:
            missing.extend(os.path.relpath(p, base) for p in absent)
            skipped["missing file"] += 1
            continue
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            skipped["no caption"] += 1
            continue
        records.append(Record(files[0], text, depth))
    if missing and not skip_missing:
        shown = ", ".join(missing[:_SHOW]) + (", ..." if len(missing) > _SHOW else "")
        raise DataError(f"{meta}: names {len(missing)} missing file{'s' * (len(missing) > 1)}: {shown} "
                        f"(fix the metadata, or skip them with --skip-missing-files)")
    if not records:
        raise DataError(f"--data {folder}: no usable images ({_describe(skipped) or 'the metadata is empty'})")
    return Source(records, {k: v for k, v in skipped.items() if v}, folder)


def open_dataset(dataset, *, image_column: str = "image", text_column: str = "text",
                 depth_column: str | None = None) -> Source:
    """The records of a Hugging Face `datasets.Dataset` (or of a `save_to_disk` folder)."""
    if isinstance(dataset, (str, os.PathLike)):
        try:
            import datasets  # noqa: PLC0415
        except ImportError:
            raise DataError(f"{dataset}: a `datasets` folder needs the datasets package "
                            "(pip install 'unclip-jax[datasets]')") from None

        dataset = datasets.load_from_disk(str(dataset))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise DataError(f"the dataset has splits {sorted(dataset)} and no 'train' split")
            dataset = dataset["train"]
    columns = list(dataset.column_names)
    for option, column in (("--image-column", image_column), ("--caption-column", text_column),
                           ("--depth-column", depth_column)):
        if column is not None and column not in columns:
            raise DataError(f"{option} {column!r}: the dataset has columns {columns}")
    texts = dataset[text_column]
    skipped = {"no caption": 0}
    records = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            skipped["no caption"] += 1
            continue
        records.append(Record(_DatasetCell(dataset, image_column, i), text,
                              None if depth_column is None else _DatasetCell(dataset, depth_column, i)))
    if not records:
        raise DataError(f"the dataset has no usable rows ({_describe(skipped) or 'it is empty'})")
    return Source(records, {k: v for k, v in skipped.items() if v}, f"dataset of {len(dataset)} rows")


@dataclasses.dataclass(frozen=True)
class _DatasetCell:
    """A cell read lazily, so opening a large dataset decodes no image."""

    dataset: Any
    column: str
    row: int

    def load(self):
        return self.dataset[self.row][self.column]


def open_source(data, *, depth_column: str | None = None, image_column: str = "image", text_column: str = "text",
                skip_missing: bool = False) -> Source:
    """An image folder, a `save_to_disk` folder (it has `dataset_info.json` or `dataset_dict.json`) or a
    `datasets.Dataset`."""
    if isinstance(data, (str, os.PathLike)):
        data = str(data)
        if any(os.path.isfile(os.path.join(data, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            return open_dataset(data, image_column=image_column, text_column=text_column, depth_column=depth_column)
        return open_image_folder(data, depth_column=depth_column, skip_missing=skip_missing, text_column=text_column)
    return open_dataset(data, image_column=image_column, text_column=text_column, depth_column=depth_column)


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)


# ---------------------------------------------------------------------------------------------- reading


def _as_pil(value) -> Image.Image:
    if isinstance(value, _DatasetCell):
        value = value.load()
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # a datasets Image cell not decoded: {"bytes", "path"}
        import io  # noqa: PLC0415

        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return Image.open(value)


def read_image(value) -> Image.Image:
    """An RGB PIL image; BadRecord if it cannot be read."""
    try:
        image = _as_pil(value)
        image.load()
        return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise BadRecord(f"unreadable image {value}: {e}") from e


def read_depth(value) -> np.ndarray:
    """A depth map as float32 [H, W]; BadRecord if it cannot be read."""
    try:
        if isinstance(value, (str, os.PathLike)) and str(value).endswith(".npy"):
            depth = np.load(value)
        else:
            depth = np.asarray(value.load() if isinstance(value, _DatasetCell) else value)
            if depth.dtype == object or depth.ndim < 2:
                depth = np.asarray(_as_pil(value))
        depth = np.asarray(depth, np.float32)
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2:
            raise ValueError(f"a depth map is [H, W]; got shape {depth.shape}")
        return depth
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise BadRecord(f"unreadable depth map {value}: {e}") from e


def crop_box(width: int, height: int, resolution: int, center_crop: bool, rng: np.random.Generator):
    """(resized (w, h), crop (left, top)): shorter side to `resolution` (torchvision's Resize(int) rounds
    the longer side down), then a centred (torchvision rounds half-offsets to nearest) or random crop."""
    if width <= height:
        w, h = resolution, int(resolution * height / width)
    else:
        w, h = int(resolution * width / height), resolution
    if center_crop:
        left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    return (w, h), (left, top)


INTERPOLATIONS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


def transform(record: Record, resolution: int, *, center_crop: bool, random_flip: bool,
              rng: np.random.Generator, interpolation: str = "lanczos") -> dict[str, Any]:
    """One example: resize, crop, flip (see the module docstring). Raises BadRecord."""
    image = read_image(record.image)
    (w, h), (left, top) = crop_box(*image.size, resolution, center_crop, rng)
    flip = bool(random_flip and rng.random() < 0.5)
    box = (left, top, left + resolution, top + resolution)
    pixels = np.asarray(image.resize((w, h), INTERPOLATIONS[interpolation]).crop(box), np.uint8)
    example = {"image": pixels[:, ::-1] if flip else pixels, "text": record.text}
    if record.depth is not None:
        depth = Image.fromarray(read_depth(record.depth), mode="F").resize((w, h), Image.Resampling.BILINEAR)
        depth = np.asarray(depth.crop(box), np.float32)
        example["depth"] = depth[:, ::-1] if flip else depth
    for key in ("image", "depth"):
        if key in example:
            example[key] = np.ascontiguousarray(example[key])
    return example


# ---------------------------------------------------------------------------------------------- iterator


class DataIterator:
    """Endless batches (lists of examples) of `batch_size`, in a deterministic order from `seed`; its
    position is `state()` and `restore(state)` puts it back there."""

    def __init__(self, source: Source, *, batch_size: int, resolution: int, seed: int, center_crop: bool = False,
                 random_flip: bool = False, interpolation: str = "lanczos",
                 collate: Callable[[Sequence[dict]], Any] | None = None):
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
        self.interpolation = interpolation
        self.source, self.batch_size, self.resolution, self.seed = source, batch_size, resolution, seed
        self.center_crop, self.random_flip, self.collate = center_crop, random_flip, collate
        self.epoch, self.index, self.skipped = 0, 0, 0
        self._order_epoch, self._order = None, None

    # -- position
    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "skipped": self.skipped, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise DataError(f"the data position was saved with seed {state['seed']}, this run has seed {self.seed}")
        self.epoch, self.index, self.skipped = int(state["epoch"]), int(state["index"]), int(state["skipped"])

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._order_epoch = epoch
        return self._order

    # -- reading
    def _advance(self) -> tuple[int, int]:
        """The next position (epoch, index in the epoch's order), moving past it."""
        if self.index >= len(self.source):
            self.epoch, self.index = self.epoch + 1, 0
        self.index += 1
        return self.epoch, self.index - 1

    def _read(self, position: tuple[int, int]) -> dict[str, Any]:
        """The example at `position` (its crop and flip seeded by the position). Raises BadRecord."""
        epoch, i = position
        index = int(self.order(epoch)[i])
        example = transform(self.source.records[index], self.resolution, center_crop=self.center_crop,
                            random_flip=self.random_flip, interpolation=self.interpolation,
                            rng=np.random.default_rng([self.seed, epoch, i]))
        example["record"] = index
        return example

    def next_example(self) -> dict[str, Any]:
        return self._next_rows(1, [0], None)[0]

    def next_batch(self, rows: Sequence[int] | None = None,
                   exchange: Callable[[np.ndarray], np.ndarray] | None = None) -> list[dict[str, Any]]:
        """The next batch of `batch_size` examples, or, given `rows` (indices into it), only those, in
        that order (the rows of this process; `exchange` then joins the other processes, see below)."""
        return self._next_rows(self.batch_size, range(self.batch_size) if rows is None else rows, exchange)

    def _next_rows(self, size: int, rows: Sequence[int],
                        exchange: Callable[[np.ndarray], np.ndarray] | None) -> list[dict[str, Any]]:
        """Rows `rows` of the next `size` readable examples of the order, unreadable records skipped and
        counted. Positions are tried in rounds: row r's candidate is read by its owner; then `exchange`
        (bool [size] -> the elementwise OR over all processes; None for a process that owns every row)
        tells everyone which candidates were bad, and the rows after a bad one move to the next positions.
        Every process therefore agrees on the batch and on the position and count after it, and only
        a row that a bad record moved onto another process is read twice."""
        wanted = set(rows)
        if exchange is None and wanted != set(range(size)):
            raise ValueError("next_batch: reading only some rows needs `exchange` (the other processes' reads)")
        good: list[tuple[int, int]] = []  # positions of the batch's examples, in order
        read: dict[tuple[int, int], dict[str, Any]] = {}
        bad_in_a_row = 0
        while len(good) < size:
            window = [self._advance() for _ in range(size - len(good))]
            bad = np.zeros(size, bool)
            for k, position in enumerate(window):
                if len(good) + k in wanted:
                    try:
                        read[position] = self._read(position)
                    except BadRecord:
                        bad[k] = True
            if exchange is not None:
                bad = np.asarray(exchange(bad), bool)
            for k, position in enumerate(window):
                if bad[k]:
                    self.skipped += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= len(self.source):
                        raise DataError(f"{self.source.description}: no record can be read") from None
                else:
                    good.append(position)
                    bad_in_a_row = 0
        out = []
        for r in rows:
            position = good[r]
            if position not in read:  # a row moved here from another process by a bad record before it
                try:
                    read[position] = self._read(position)
                except BadRecord as e:
                    raise DataError(f"{self.source.description}: a record read by one process cannot be read "
                                    f"by another ({e}); the processes must see the same files") from None
            out.append(read[position])
        return out

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        batch = self.next_batch()
        return batch if self.collate is None else self.collate(batch)
