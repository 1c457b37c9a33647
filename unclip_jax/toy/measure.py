"""Simple measures of a picture of the toy domain, for tests on generated pictures.

`measure(image)` on a uint8 [H, W, 3] (or float [0, 1]) picture of one shape on a plain background:

1. Background: the per-channel median of the outer `BORDER`-pixel ring (the domain keeps shapes 3 px
   inside, so that ring is background), named by the nearest `PALETTE` colour (Euclidean in sRGB).
2. Shape region: the pixels farther than `FAR` (of 255, about half the smallest distance between two
   palette colours) from the background colour give a first guess; its median is the shape colour,
   and the region is then every pixel nearer to that colour than to the background's. Its colour is
   the median over the region, named by the nearest palette colour.
3. Shape class: how much of the region's bounding box the region fills (circle pi/4 ~ 0.785, square
   1, triangle 0.5), the nearest of those (boundaries ~0.64 and ~0.89). The box spans the rows and
   columns holding at least `MIN_LINE` region pixels, so a few stray pixels do not stretch it.

`bounding_box(mask)` gives the region's box (what the variation test compares, to see a shape moved or
resized). `depth_correlation(a, b)` is the Pearson correlation of two depth maps of one shape (flattened).
`evaluation_prompts()` lists the canonical prompts of all 270 palette combinations (held-out ones
included) and `score(images, combos)` the fractions of pictures measured as asked, for issue 18's tests.
"""

from __future__ import annotations

import numpy as np

from unclip_jax.toy.domain import PALETTE, SHAPES

BORDER = 2
FAR = 48.0
MIN_LINE = 1
MIN_NEIGHBOURS = 2

_NAMES = tuple(PALETTE)
_RGB = np.asarray([PALETTE[n] for n in _NAMES], np.float64)


def as_rgb255(image) -> np.ndarray:
    """float64 [H, W, 3] in 0..255 from a uint8 picture or a float one in [0, 1]."""
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {x.shape}")
    if min(x.shape[:2]) <= 2 * BORDER + 2:
        raise ValueError(f"image of {x.shape[0]} x {x.shape[1]} is too small to measure")
    if x.dtype == np.uint8:
        return x.astype(np.float64)
    return np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0


def nearest_color(rgb) -> str:
    """The palette name nearest to an sRGB colour (0..255)."""
    d = np.sum((_RGB - np.asarray(rgb, np.float64)) ** 2, axis=-1)
    return _NAMES[int(np.argmin(d))]


def border_rgb(image) -> np.ndarray:
    """float64 [3]: the median colour of the outer BORDER-pixel ring."""
    return _border(as_rgb255(image))


def _border(x: np.ndarray) -> np.ndarray:
    ring = np.concatenate([x[:BORDER].reshape(-1, 3), x[-BORDER:].reshape(-1, 3),
                           x[BORDER:-BORDER, :BORDER].reshape(-1, 3), x[BORDER:-BORDER, -BORDER:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def shape_mask(image, background=None) -> np.ndarray:
    """bool [H, W]: the shape's pixels (see the module docstring); all False when nothing stands out."""
    x = as_rgb255(image)
    return _mask(x, _border(x) if background is None else np.asarray(background, np.float64))


def _mask(x: np.ndarray, bg: np.ndarray) -> np.ndarray:
    far = np.linalg.norm(x - bg, axis=-1) > FAR
    if not far.any():
        return far
    fg = np.median(x[far], axis=0)
    mask = np.linalg.norm(x - fg, axis=-1) < np.linalg.norm(x - bg, axis=-1)
    return mask & (_neighbours(mask) >= MIN_NEIGHBOURS)


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """int [H, W]: how many of each pixel's 8 neighbours are in the mask."""
    p = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    return sum(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - mask


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the mask's bounding box, ends exclusive: the span of the rows and
    columns holding >= MIN_LINE mask pixels; None for an empty mask."""
    rows = np.flatnonzero(mask.sum(axis=1) >= MIN_LINE)
    cols = np.flatnonzero(mask.sum(axis=0) >= MIN_LINE)
    if rows.size == 0 or cols.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def fill_ratio(mask: np.ndarray) -> float:
    """The fraction of the mask's bounding box (`bounding_box`) it covers."""
    box = bounding_box(mask)
    if box is None:
        return 0.0
    top, left, bottom, right = box
    return float(mask[top:bottom, left:right].mean())


def shape_from_fill(fill: float) -> str:
    """The shape whose ideal bounding-box fill is nearest to `fill`."""
    return min(SHAPES, key=lambda s: abs(SHAPES[s] - fill))


def measure(image) -> dict:
    """{"shape", "color", "background", "fill", "area"} of a one-shape picture ("shape" and "color"
    are None when no pixel stands out from the background)."""
    x = as_rgb255(image)
    bg = _border(x)
    mask = _mask(x, bg)
    out = dict(background=nearest_color(bg), area=int(mask.sum()), shape=None, color=None, fill=0.0)
    if out["area"]:
        out["color"] = nearest_color(np.median(x[mask], axis=0))
        out["fill"] = fill_ratio(mask)
        out["shape"] = shape_from_fill(out["fill"])
    return out


def depth_correlation(a, b) -> float:
    """Pearson correlation of two depth maps [H, W] (or any two arrays of one shape)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"depth maps differ in size: {np.shape(a)} vs {np.shape(b)}")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0:
        raise ValueError("a depth map is constant: its correlation is undefined")
    return float((a * b).sum() / denom)


def evaluation_prompts(every: int = 1) -> list[tuple[str, tuple[str, str, str]]]:
    """(canonical caption, (shape, colour, background)) for every `every`-th combination of the palette
    (all 270 with `every=1`), held-out combinations included, in a fixed order."""
    from unclip_jax.toy.domain import ALL_COMBOS, canonical_caption  # noqa: PLC0415

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return [(canonical_caption(*combo), combo) for combo in ALL_COMBOS[::every]]


def score(images, combos) -> dict[str, float]:
    """The fractions of pictures whose measures match what was asked, one (shape, colour, background)
    per picture: "colors" (shape colour and background both right: issue 18's first criterion),
    "color", "background", "shape", and "all"."""
    images = list(images)
    combos = list(combos)
    if len(images) != len(combos) or not images:
        raise ValueError(f"score needs one combination per picture; got {len(images)} pictures, {len(combos)} combos")
    hits = {"colors": 0, "color": 0, "background": 0, "shape": 0, "all": 0}
    for image, (shape, color, background) in zip(images, combos):
        got = measure(image)
        right = {"color": got["color"] == color, "background": got["background"] == background,
                 "shape": got["shape"] == shape}
        right["colors"] = right["color"] and right["background"]
        right["all"] = right["colors"] and right["shape"]
        for k, v in right.items():
            hits[k] += bool(v)
    return {k: v / len(images) for k, v in hits.items()}
