"""The toy domain of the default model: one coloured shape on a plain background, drawn from a seed.

Pictures are 64 x 64 RGB (uint8 [64, 64, 3]). Everything is a pure function of `(seed, index)`: the
same pair gives the same picture, caption and attributes on every machine (numpy's PCG64 seeded by
`[seed, index, stream]`; the rendering is plain float32/float64 numpy arithmetic).

Flat pictures (`draw`): one shape of `SHAPES` in one colour of `PALETTE`, on a background of another
palette colour (never the same), with mild texture: a low-frequency brightness ripple of +-4% and
per-pixel Gaussian noise of sigma 3 (of 255), on shape and background alike. Edges are anti-aliased
(4 x 4 supersampling). A shape's half-size is small (10 to 12.5 px) or large (13 to 18 px), its centre
anywhere that keeps it 3 px inside the picture, so the outer 2-px border is always background.

  circle    radius s: fills pi/4 ~ 0.785 of its bounding box
  square    side 2s: fills 1.0 of it
  triangle  apex up, base 2s, height 2s: fills 0.5 of it

Captions vary their wording (templates, a/an, an optional small/large, an optional position phrase
"at the top left", "on the right", "in the middle" ... named by the 3 x 3 cell that holds the centre),
e.g. "a red circle on a blue background", "an orange triangle at the bottom right, white background",
"a small green square against a black background". `canonical_caption` is the plain form the tests
prompt with.

Held-out combinations (`HELD_OUT`, shape / colour / background): never drawn for training
(`draw(..., held_out=False)`, the default); `draw(..., held_out=True)` draws only them, for tests:

  circle green on yellow,   circle purple on white,   circle cyan on black,
  square red on cyan,       square orange on blue,    square magenta on green,
  triangle yellow on purple, triangle blue on orange, triangle white on red, triangle black on magenta

Every colour and every background still appears in training with every shape, only not in these
ten triples (10 of the 270).

Depth scenes (`draw_depth`): a wall of the background colour above a ground plane that recedes to a
horizon (the ground shaded from 85% brightness at the horizon to 100% at the bottom), with one to
three shapes of one kind and colour standing on the ground at different distances, nearer ones lower
and larger, drawn far to near (nearer ones occlude). The depth map is float32 [64, 64], larger =
nearer, as DPT/MiDaS predict (inverse depth, disparity): the ground's disparity grows linearly from
the horizon row to 1.0 at the bottom row, the wall sits at the disparity of the ground where it meets
the wall, and each shape (a flat upright card) has the disparity of its foot point. Values lie in
(0, 1]. Captions: "two red circles on a blue background", "a green square ...".

`write_dataset` writes an imagefolder in the Hugging Face convention: `images/NNNNNN.png`,
`metadata.jsonl` with `file_name` and `text` (and for depth `depth_file_name`: `depth/NNNNNN.npy`,
float32 [64, 64] as above; or with `depth_format="png16"`, 16-bit grayscale PNGs holding
round(disparity * 65535)), `attributes.jsonl`, one JSON object per picture in the same order, and
`dataset.json`, the arguments that wrote it (and `GENERATOR_VERSION`).
The folder is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

SIZE = 64
# Bumped whenever a change to this module changes what a (seed, index) draws.
GENERATOR_VERSION = 2  # 2: small shapes' half-size 10 to 12.5 px (was 6 to 10)

# The named palette, exact sRGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 200),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (120, 50, 170),
}
COLORS = tuple(PALETTE)

# Shape -> the fraction of its bounding box it covers (continuous geometry).
SHAPES: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}

HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("circle", "green", "yellow"),
    ("circle", "purple", "white"),
    ("circle", "cyan", "black"),
    ("square", "red", "cyan"),
    ("square", "orange", "blue"),
    ("square", "magenta", "green"),
    ("triangle", "yellow", "purple"),
    ("triangle", "blue", "orange"),
    ("triangle", "white", "red"),
    ("triangle", "black", "magenta"),
)

ALL_COMBOS: tuple[tuple[str, str, str], ...] = tuple(
    (s, c, b) for s in SHAPES for c in COLORS for b in COLORS if c != b)
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(x for x in ALL_COMBOS if x not in set(HELD_OUT))

SMALL, LARGE = (10.0, 12.5), (13.0, 18.0)  # half-size ranges in pixels
MARGIN = 3.0  # a shape stays this far inside the picture: the 2-px border is background
TEXTURE_NOISE = 3.0  # per-pixel sigma, of 255
TEXTURE_RIPPLE = 0.04  # low-frequency brightness ripple amplitude
_SUPERSAMPLE = 4

# Random streams: a draw never shares numbers with another kind of draw of the same (seed, index).
_FLAT, _DEPTH = 0, 1

# (row, column) cell of the centre -> position phrases.
_POSITIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("top", "left"): ("at the top left", "in the top left corner"),
    ("top", "center"): ("at the top", "near the top"),
    ("top", "right"): ("at the top right", "in the top right corner"),
    ("middle", "left"): ("on the left", "at the left"),
    ("middle", "center"): ("in the middle", "in the center"),
    ("middle", "right"): ("on the right", "at the right"),
    ("bottom", "left"): ("at the bottom left", "in the bottom left corner"),
    ("bottom", "center"): ("at the bottom", "near the bottom"),
    ("bottom", "right"): ("at the bottom right", "in the bottom right corner"),
}

# {obj}: "a small red circle"; {bg}: "blue"; {abg}: "an orange"; {pos}: " at the top left" or "".
_TEMPLATES = (
    "{obj} on {abg} background{pos}",
    "{obj}{pos} on {abg} background",
    "{obj}{pos}, {bg} background",
    "{obj} against {abg} background{pos}",
    "{abg} background with {obj}{pos}",
    "a picture of {obj} on {abg} background{pos}",
)
_COUNTS = {1: "a", 2: "two", 3: "three"}


def article(word: str) -> str:
    """"an" before a vowel sound, else "a" (enough for this vocabulary)."""
    return "an" if word[0] in "aeiou" else "a"


def canonical_caption(shape: str, color: str, background: str) -> str:
    """The plain caption, e.g. "a red circle on a blue background"."""
    return f"{article(color)} {color} {shape} on {article(background)} {background} background"


def position_cell(center: tuple[float, float]) -> tuple[str, str]:
    """(row, column) names of the 3 x 3 cell holding a centre (x, y) in pixels."""
    x, y = center
    col = ("left", "center", "right")[min(int(x * 3 // SIZE), 2)]
    row = ("top", "middle", "bottom")[min(int(y * 3 // SIZE), 2)]
    return row, col


def _coverage(inside, size: int = SIZE) -> np.ndarray:
    """float32 [size, size]: the fraction of each pixel where `inside(x, y)` holds, pixel (i, j)
    spanning x in [j, j + 1), y in [i, i + 1)."""
    n = size * _SUPERSAMPLE
    t = (np.arange(n, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(t, t, indexing="ij")
    hit = inside(x, y).astype(np.float32)
    return hit.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def shape_inside(shape: str, cx: float, cy: float, s: float):
    """The point test of a shape of half-size `s` centred on its bounding box centre (cx, cy)."""
    if shape == "circle":
        return lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= s * s
    if shape == "square":
        return lambda x, y: (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    if shape == "triangle":
        return lambda x, y: (y <= cy + s) & (np.abs(x - cx) <= (y - (cy - s)) / 2)
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _texture(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(brightness gain [H, W, 1], additive noise [H, W, 3]) of the mild texture."""
    t = np.arange(SIZE, dtype=np.float64) / SIZE * 2 * np.pi
    fx, fy = rng.integers(1, 4, size=2)
    px, py = rng.uniform(0, 2 * np.pi, size=2)
    ripple = np.sin(fx * t[None, :] + px) * np.cos(fy * t[:, None] + py)
    gain = 1.0 + TEXTURE_RIPPLE * ripple[..., None]
    return gain, rng.normal(0.0, TEXTURE_NOISE, size=(SIZE, SIZE, 3))


def _finish(linear: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain, noise = _texture(rng)
    return np.clip(np.rint(linear * gain + noise), 0, 255).astype(np.uint8)


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index), stream])


def render(shape: str, color: str, background: str, center: tuple[float, float], half_size: float,
           rng: np.random.Generator) -> np.ndarray:
    """uint8 [64, 64, 3]: one shape on a plain background, with the mild texture drawn from `rng`."""
    for name, value in (("color", color), ("background", background)):
        if value not in PALETTE:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(COLORS)}")
    alpha = _coverage(shape_inside(shape, center[0], center[1], half_size))[..., None]
    fg = np.asarray(PALETTE[color], np.float64)
    bg = np.asarray(PALETTE[background], np.float64)
    return _finish(bg * (1 - alpha) + fg * alpha, rng)


def sample_attributes(rng: np.random.Generator, held_out: bool = False) -> dict[str, Any]:
    """Shape, colours, size and place of one flat picture (from `HELD_OUT` only when `held_out`)."""
    combos = HELD_OUT if held_out else TRAIN_COMBOS
    shape, color, background = combos[rng.integers(len(combos))]
    size = ("small", "large")[rng.integers(2)]
    half = float(rng.uniform(*(SMALL if size == "small" else LARGE)))
    lo, hi = half + MARGIN, SIZE - half - MARGIN
    center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    return dict(kind="flat", shape=shape, color=color, background=background, size=size, half_size=half,
                center=center, position=" ".join(position_cell(center)), held_out=held_out)


def caption(attrs: dict[str, Any], rng: np.random.Generator) -> str:
    """A caption of a flat picture's attributes, its wording drawn from `rng`."""
    words = [attrs["color"], attrs["shape"]]
    if rng.random() < 0.5:
        words.insert(0, attrs["size"])
    obj = f"{article(words[0])} {' '.join(words)}"
    pos = ""
    if rng.random() < 0.5:
        choices = _POSITIONS[tuple(attrs["position"].split())]
        pos = " " + choices[rng.integers(len(choices))]
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return _fill(template, obj, attrs["background"], pos)


def _fill(template: str, obj: str, background: str, pos: str) -> str:
    return template.format(obj=obj, bg=background, abg=f"{article(background)} {background}", pos=pos)


def draw(seed: int, index: int, *, held_out: bool = False) -> tuple[np.ndarray, str, dict[str, Any]]:
    """(uint8 [64, 64, 3] picture, caption, attributes) of flat picture `index` of `seed`.

    Training draws (`held_out=False`) never show a `HELD_OUT` combination; `held_out=True` draws only
    those (a separate stream: not the same pictures as training draws of the same index)."""
    rng = _rng(seed, index, _FLAT + 2 * held_out)
    attrs = sample_attributes(rng, held_out)
    text = caption(attrs, rng)
    image = render(attrs["shape"], attrs["color"], attrs["background"], attrs["center"], attrs["half_size"], rng)
    return image, text, attrs


# Depth scenes. The camera looks level over the ground: a ground row y below the horizon row h has
# disparity proportional to (y - h); it is normalised so the bottom pixel row's centre has 1.0.
_HORIZON = (18.0, 30.0)  # horizon row range
_WALL_DISPARITY = (0.12, 0.22)  # where the ground meets the wall, as a disparity
_DEPTH_SCALE = 17.0  # half-size of a shape at disparity 1 (it shrinks in proportion to the disparity)
_GROUND_SHADE = 0.85  # ground brightness at the wall (1.0 at the bottom)


def _ground_disparity(y: np.ndarray, horizon: float) -> np.ndarray:
    return (y - horizon) / (SIZE - 0.5 - horizon)


def draw_depth(seed: int, index: int, *, held_out: bool = False
               ) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """(uint8 [64, 64, 3] picture, float32 [64, 64] disparity (larger = nearer), caption, attributes)
    of depth scene `index` of `seed` (held-out combinations as in `draw`)."""
    rng = _rng(seed, index, _DEPTH + 2 * held_out)
    combos = HELD_OUT if held_out else TRAIN_COMBOS
    shape, color, background = combos[rng.integers(len(combos))]
    count = int(rng.integers(1, 4))
    horizon = float(rng.uniform(*_HORIZON))
    wall = float(rng.uniform(*_WALL_DISPARITY))
    wall_row = horizon + wall * (SIZE - 0.5 - horizon)

    rows = np.arange(SIZE, dtype=np.float64) + 0.5
    ground = np.maximum(_ground_disparity(rows, horizon), wall)
    disparity = np.repeat(ground[:, None], SIZE, axis=1)
    shade = np.where(rows >= wall_row, _GROUND_SHADE + (1 - _GROUND_SHADE) * (ground - wall) / (1 - wall), 1.0)
    bg = np.asarray(PALETTE[background], np.float64)
    linear = np.repeat((shade[:, None] * bg)[:, None, :], SIZE, axis=1)

    # Feet at disparities stratified over the ground, each shape in its own horizontal slot (so they
    # overlap little), drawn far (small) to near (large).
    lo = max(wall + 0.1, 0.4)
    feet = lo + (1 - lo) * (np.arange(count) + rng.uniform(0, 1, size=count)) / count
    slots = rng.permutation(count)
    fg = np.asarray(PALETTE[color], np.float64)
    objects = []
    for d, slot in zip(feet, slots):
        half = _DEPTH_SCALE * d
        foot = horizon + d * (SIZE - 0.5 - horizon)  # the ground row with disparity d
        x = (slot + rng.uniform(0, 1)) * SIZE / count
        cx = float(np.clip(x, half + 1, SIZE - half - 1))
        cy = float(foot - half)
        alpha = _coverage(shape_inside(shape, cx, cy, half))
        linear = linear * (1 - alpha[..., None]) + fg * alpha[..., None]
        disparity = np.where(alpha >= 0.5, d, disparity)
        objects.append(dict(center=(cx, cy), half_size=float(half), disparity=float(d)))
    noun = shape if count == 1 else shape + "s"
    obj = f"{_COUNTS[count]} {color} {noun}" if count > 1 else f"{article(color)} {color} {noun}"
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    text = _fill(template, obj, background, "")
    attrs = dict(kind="depth", shape=shape, color=color, background=background, count=count, horizon=horizon,
                 wall_disparity=wall, objects=objects, held_out=held_out)
    return _finish(linear, rng), disparity.astype(np.float32), text, attrs


def write_dataset(folder: str, count: int, seed: int, *, depth: bool = False, held_out: bool = False,
                  depth_format: str = "npy", exist_ok: bool = False) -> str:
    """Writes `count` pictures (flat, or depth scenes with their depth maps) as an imagefolder at
    `folder` (see the module docstring), atomically; returns `folder`.

    `folder` must not exist; with `exist_ok`, a folder this function wrote with the same arguments
    (its `dataset.json`) is kept as it is, and anything else there is still refused."""
    from PIL import Image  # noqa: PLC0415

    from unclip_jax.weights.folder import atomic_folder  # noqa: PLC0415

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if depth_format not in ("npy", "png16"):
        raise ValueError(f"depth_format must be 'npy' or 'png16', got {depth_format!r}")
    stamp = dict(generator=GENERATOR_VERSION, count=count, seed=seed, depth=depth, held_out=held_out,
                 depth_format=depth_format if depth else None)
    if os.path.exists(folder):
        try:
            with open(os.path.join(folder, "dataset.json")) as f:
                same = json.load(f) == stamp
        except (OSError, ValueError):
            same = False
        if exist_ok and same:
            return folder
        raise FileExistsError(f"{folder}: already exists" + (" (and is not this dataset)" if exist_ok else ""))
    with atomic_folder(folder) as tmp:
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(stamp, f, indent=2)
        os.makedirs(os.path.join(tmp, "images"))
        if depth:
            os.makedirs(os.path.join(tmp, "depth"))
        with open(os.path.join(tmp, "metadata.jsonl"), "w") as meta, \
                open(os.path.join(tmp, "attributes.jsonl"), "w") as extra:
            for i in range(count):
                row: dict[str, Any] = {"file_name": f"images/{i:06d}.png"}
                if depth:
                    image, disparity, text, attrs = draw_depth(seed, i, held_out=held_out)
                    row["depth_file_name"] = f"depth/{i:06d}.{'npy' if depth_format == 'npy' else 'png'}"
                    path = os.path.join(tmp, row["depth_file_name"])
                    if depth_format == "npy":
                        np.save(path, disparity)
                    else:
                        Image.fromarray(np.rint(disparity * 65535).astype(np.uint16)).save(path)
                else:
                    image, text, attrs = draw(seed, i, held_out=held_out)
                Image.fromarray(image).save(os.path.join(tmp, row["file_name"]))
                row["text"] = text
                meta.write(json.dumps(row) + "\n")
                extra.write(json.dumps(attrs) + "\n")
    return folder


def read_depth(path: str) -> np.ndarray:
    """A depth map written by `write_dataset` (.npy or 16-bit .png) as float32 [64, 64] disparity."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32) / 65535.0
