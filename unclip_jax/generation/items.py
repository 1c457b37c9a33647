"""What a generation run makes: items read from a prompts file or a dataset column, checked, and planned
into batches of items that share one compiled program.

An item is one image. Its `index` is its place in the input (a malformed line keeps its index, so the
indices of the items after it never move), its `seed` defaults to the run's seed plus the index, and its
arguments are the run's defaults overridden by its own (JSON lines). Items whose static arguments differ
(steps, guidance on or off, its scale, size, noise level, strength) go to separate batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

PIPELINES = ("txt2img", "variation", "depth2img")
# Per-item keys a JSON line may give, with the type each must have (beyond `prompt`, `negative_prompt`).
NUMBER_KEYS = {"guidance_scale": float, "prior_guidance_scale": float, "strength": float, "eta": float}
INT_KEYS = ("seed", "num_inference_steps", "prior_num_inference_steps", "noise_level", "height", "width")
TEXT_KEYS = ("prompt", "negative_prompt", "image")
ITEM_KEYS = TEXT_KEYS + INT_KEYS + tuple(NUMBER_KEYS)
# Which keys each pipeline reads (others are refused, so a typo or a wrong pipeline is named).
PIPELINE_KEYS = {
    "txt2img": {"prompt", "negative_prompt", "seed", "guidance_scale", "num_inference_steps", "noise_level",
                "height", "width", "prior_guidance_scale", "prior_num_inference_steps", "eta"},
    "variation": {"prompt", "negative_prompt", "seed", "image", "guidance_scale", "num_inference_steps",
                  "noise_level", "height", "width", "eta"},
    "depth2img": {"prompt", "negative_prompt", "seed", "image", "guidance_scale", "num_inference_steps",
                  "strength", "height", "width", "eta"},
}
MAX_SEED = 2**63 - 1
VAE_FACTOR = 8


class InputError(ValueError):
    """A bad line or image, named by its place (`PROMPTS:LINE` or the image's path)."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to make: its place in the input, its seed and every argument of its pipeline call
    (run defaults already filled in). `image` is a path (or, from a dataset, a PIL image; not hashed)."""

    index: int
    seed: int
    args: dict[str, Any]
    image: Any = None
    where: str = ""

    def record(self) -> dict:
        """The item's arguments as the index and the PNG metadata record them (JSON-safe)."""
        out = {"index": self.index, "seed": self.seed, **self.args}
        if isinstance(self.image, str):
            out["image"] = self.image
        return out


def _check_value(key: str, value, where: str):
    if key in TEXT_KEYS:
        if value is not None and not isinstance(value, str):
            raise InputError(f"{where}: `{key}` must be a string; got {type(value).__name__}")
        return value
    if key in INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: `{key}` must be an integer; got {value!r}")
        if value < 0 or (key != "noise_level" and key != "seed" and value == 0) or value > MAX_SEED:
            raise InputError(f"{where}: `{key}` out of range: {value}")
        if key == "noise_level" and value >= 1000:
            raise InputError(f"{where}: `noise_level` must be in [0, 999]; got {value}")
        if key in ("height", "width") and value % VAE_FACTOR:
            raise InputError(f"{where}: `{key}` must be a multiple of {VAE_FACTOR}; got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: `{key}` must be a finite number; got {value!r}")
    if key == "strength" and not 0 < value <= 1:
        raise InputError(f"{where}: `strength` must be in (0, 1]; got {value}")
    if key == "eta" and value < 0:
        raise InputError(f"{where}: `eta` must be >= 0; got {value}")
    return float(value)


def make_item(index: int, given: dict, *, pipeline: str, defaults: dict, seed: int, where: str,
              base_dir: str = "") -> Item:
    """An item from its own keys `given` over the run's `defaults`; InputError naming `where` if bad."""
    allowed = PIPELINE_KEYS[pipeline]
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for the {pipeline} pipeline "
                         f"(known: {', '.join(sorted(allowed))})")
    given = {k: _check_value(k, v, where) for k, v in given.items()}
    args = {k: v for k, v in defaults.items() if k in allowed}
    args.update({k: v for k, v in given.items() if v is not None and k not in ("seed", "image")})
    args.setdefault("prompt", "")
    if pipeline != "variation" and not args["prompt"]:
        raise InputError(f"{where}: no prompt")
    image = given.get("image")
    if pipeline != "txt2img":
        if image is None:
            raise InputError(f"{where}: the {pipeline} pipeline needs an `image`")
        if not isinstance(image, str):
            raise InputError(f"{where}: `image` must be a path")
        image = image if os.path.isabs(image) else os.path.normpath(os.path.join(base_dir, image))
    item_seed = given.get("seed")
    return Item(index, seed + index if item_seed is None else item_seed, args, image, where)


def read_prompts(path: str, *, pipeline: str, defaults: dict, seed: int) -> tuple[list[Item], list[str]]:
    """Items of a prompts file: one item per non-blank line, either a plain prompt or a JSON object
    (`{"prompt": ..., "seed": 3, "image": "a.png", ...}`; image paths relative to the file's folder).
    Returns (items, errors): a malformed line is an error naming `PATH:LINE` and keeps its index."""
    items, errors = [], []
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    index = 0
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        where = f"{path}:{number}"
        try:
            if text.startswith("{"):
                try:
                    given = json.loads(text)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(given, dict):
                    raise InputError(f"{where}: a JSON line must be an object")
            else:
                given = {"prompt": text} if pipeline != "variation" else {"image": text}
            items.append(make_item(index, given, pipeline=pipeline, defaults=defaults, seed=seed, where=where,
                                   base_dir=base))
        except InputError as e:
            errors.append(str(e))
        index += 1
    return items, errors


def read_dataset(name: str, *, column: str, image_column: str | None, split: str, pipeline: str, defaults: dict,
                 seed: int) -> tuple[list[Item], list[str]]:
    """Items of a Hugging Face dataset (a hub name, or a folder written by `Dataset.save_to_disk`): the
    prompt from `column`, the image (a PIL image) from `image_column`. Needs the `datasets` package."""
    try:
        import datasets  # noqa: PLC0415
    except ModuleNotFoundError:
        raise InputError("reading a dataset needs the `datasets` package (pip install 'unclip-jax[datasets]')") from None
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "state.json")):
        data = datasets.load_from_disk(name)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        data = datasets.load_from_disk(name)[split]
    else:
        data = datasets.load_dataset(name, split=split)
    for c in (column, image_column):
        if c is not None and c not in data.column_names:
            raise InputError(f"dataset {name}: no column {c!r} (columns: {', '.join(data.column_names)})")
    items, errors = [], []
    for index, row in enumerate(data):
        where = f"{name}[{index}]"
        try:
            given = {"prompt": row[column]} if column is not None else {}
            image = row[image_column] if image_column is not None else None
            if image is not None:
                given["image"] = "<dataset>"
            item = make_item(index, given, pipeline=pipeline, defaults=defaults, seed=seed, where=where)
            items.append(dataclasses.replace(item, image=image) if image is not None else item)
        except InputError as e:
            errors.append(str(e))
    return items, errors


# ---------------------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass(frozen=True)
class Batch:
    """Items run in one pipeline call (`number`: its place in the plan); `group` holds their shared
    static arguments."""

    number: int
    group: tuple
    items: tuple[Item, ...]


def group_key(item: Item, pipeline: str, image_size: tuple[int, int] | None = None) -> tuple:
    """What items of one batch must share: every argument but the per-row ones (prompt, negative prompt,
    seed, image), and for depth2img the image size (the latent grid)."""
    shared = tuple(sorted((k, v) for k, v in item.args.items() if k not in ("prompt", "negative_prompt")))
    return shared + ((("image_size", image_size),) if pipeline == "depth2img" else ())


def plan_batches(items: Sequence[Item], keys: Sequence[tuple], batch_size: int) -> list[Batch]:
    """Items (in index order) split into batches of up to `batch_size` items of one group each, ordered by
    their first item. The plan depends only on the items and the batch size (never on devices, hosts or
    what was already made), so a resumed run forms the same batches and makes the same bytes."""
    groups: dict[tuple, list[Item]] = {}
    for item, key in zip(items, keys):
        groups.setdefault(key, []).append(item)
    chunks = [(key, tuple(members[i:i + batch_size])) for key, members in groups.items()
              for i in range(0, len(members), batch_size)]
    chunks.sort(key=lambda c: c[1][0].index)
    return [Batch(n, key, chunk) for n, (key, chunk) in enumerate(chunks)]


def plan_units(batches: Sequence[Batch], batches_per_unit: int) -> list[tuple[Batch, ...]]:
    """Consecutive batches grouped into units of work (a webdataset shard; one batch for PNGs)."""
    return [tuple(batches[i:i + batches_per_unit]) for i in range(0, len(batches), batches_per_unit)]


def host_share(units: Sequence, process_index: int, process_count: int) -> list:
    """The units this process makes: every `process_count`-th one from `process_index` (round robin, so the
    hosts' shares differ by at most one unit; the units themselves do not depend on the host count)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return list(units[process_index::process_count])


def number_width(n: int) -> int:
    """Digits of the zero-padded file names for n items (at least 5: 00000.png)."""
    return max(5, len(str(max(n - 1, 0))))


def iter_indices(batches: Iterable[Batch]) -> list[int]:
    return [it.index for b in batches for it in b.items]
