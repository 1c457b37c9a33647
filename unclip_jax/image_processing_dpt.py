"""DPT preprocessing (transformers' DPTImageProcessor, PIL backend) in numpy and PIL.

Reads a saved `preprocessor_config.json` (the legacy `DPTFeatureExtractor` form with `size: 384`, or
the `DPTImageProcessor` form with a size dict) and gives, for PIL and numpy inputs, the pixel values
transformers gives, channels-last: resize through PIL (optionally keeping the aspect ratio and
rounding to a multiple), rescale, normalise, and optionally centre-pad to a multiple of `size_divisor`.
DPT never centre-crops, whatever the config says.

Numpy inputs follow transformers' conventions, quirks included: float arrays in [0, 1] are scaled to
uint8 (truncating) for PIL's resize and scaled back, and then `do_rescale` divides by 255 again;
pass uint8 arrays (or PIL images) for the usual result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from unclip_jax.image_processing import to_rgb_float, to_rgb_uint8
from unclip_jax.models.config import UnsupportedConfigError

CONFIG_NAME = "preprocessor_config.json"
# PIL modes a depth map image may have (single channel; any scale: depth is normalised per image).
DEPTH_MODES = ("L", "I", "I;16", "F")

# Keys that do not change what DPT computes on images.
_IGNORED = {
    "feature_extractor_type", "image_processor_type", "processor_class", "do_reduce_labels", "reduce_labels",
    "do_center_crop", "crop_size", "default_to_square", "data_format", "input_data_format", "return_tensors",
    "pad_size", "device", "disable_grouping", "_processor_class",
}


@dataclasses.dataclass(frozen=True)
class DPTImageProcessor:
    """DPT preprocessing settings; call it on images to get [B, H, W, C] float32 pixel values."""

    do_resize: bool = True
    size: tuple[int, int] = (384, 384)  # (height, width)
    resample: int = PIL.Image.Resampling.BICUBIC
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pad: bool = False
    size_divisor: int | None = None
    do_convert_rgb: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DPTImageProcessor:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in fields:
                if value is not None:  # transformers: None means the class default
                    kwargs[key] = value
            elif key not in _IGNORED and not key.startswith("_"):
                raise UnsupportedConfigError(f"DPTImageProcessor: config key {key!r} = {value!r} is not supported")
        if "size" in kwargs:
            kwargs["size"] = _size(kwargs["size"])
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                v = kwargs[key]
                kwargs[key] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),)
        if "resample" in kwargs:
            kwargs["resample"] = int(kwargs["resample"])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str) -> DPTImageProcessor:
        """Reads `folder/preprocessor_config.json` (or a path to the json itself)."""
        path = folder if folder.endswith(".json") else os.path.join(folder, CONFIG_NAME)
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"] = {"height": self.size[0], "width": self.size[1]}
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        d["image_processor_type"] = "DPTImageProcessor"
        return d

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    def __call__(self, images) -> np.ndarray:
        """images: a PIL image, an array [H, W, C] or [B, H, W, C] (uint8, or float in [0, 1] or
        integer-valued in [0, 255]), or a list of those. Returns float32 [B, H, W, C]."""
        out = [self.preprocess_one(im) for im in _flatten(images)]
        shapes = {x.shape for x in out}
        if len(shapes) > 1:
            raise ValueError(f"preprocessed images differ in size {sorted(shapes)}; process them one at a time")
        return np.stack(out).astype(np.float32)

    def preprocess_one(self, image) -> np.ndarray:
        """One image -> [H, W, C] (float32, or float64 for a float64 input that is neither resized nor rescaled)."""
        x = self._to_array(image)
        if self.do_resize:
            x = self._resize(x)
        if self.do_rescale:
            # Products in float64, stored in float32, as transformers rescales.
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            c = x.shape[-1]
            mean = np.array(_per_channel(self.image_mean, c, "image_mean"), dtype=x.dtype)
            std = np.array(_per_channel(self.image_std, c, "image_std"), dtype=x.dtype)
            x = (x - mean) / std
        if self.do_pad and self.size_divisor is not None:
            pads = []
            for n in x.shape[:2]:
                extra = math.ceil(n / self.size_divisor) * self.size_divisor - n
                pads.append((extra // 2, extra - extra // 2))
            x = np.pad(x, (pads[0], pads[1], (0, 0)))
        return x

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        scale_h, scale_w = self.size[0] / height, self.size[1] / width
        if self.keep_aspect_ratio:
            # Scale as little as possible: fit whichever side needs the smaller change.
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        m = self.ensure_multiple_of
        # Python's round (half to even), as transformers rounds.
        return max(round(scale_h * height / m) * m, 0), max(round(scale_w * width / m) * m, 0)

    def _to_array(self, image) -> np.ndarray:
        if isinstance(image, PIL.Image.Image):
            if self.do_convert_rgb:
                if "A" in image.getbands() or image.info.get("transparency") is not None:
                    # Transparency composited onto white, as transformers converts.
                    rgba = image.convert("RGBA")
                    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    image = PIL.Image.alpha_composite(white, rgba)
                image = image.convert("RGB")
            x = np.array(image)
        else:
            x = np.asarray(image)
            if self.do_convert_rgb and x.ndim == 3 and x.shape[-1] == 1:
                x = np.repeat(x, 3, axis=-1)
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"an image must be [H, W, C]; got shape {x.shape}")
        return x

    def _resize(self, x: np.ndarray) -> np.ndarray:
        height, width = self.output_size(*x.shape[:2])
        scaled = _needs_scaling_for_pil(x)
        u8 = (x.astype(np.float64) * 255).astype(np.float32) if scaled else x
        u8 = u8.astype(np.uint8)
        pil = PIL.Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)
        y = np.array(pil.resize((width, height), resample=self.resample))
        if y.ndim == 2:
            y = y[..., None]
        return (y.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else y


def _needs_scaling_for_pil(x: np.ndarray) -> bool:
    """Whether an array must be scaled by 255 to become uint8 for PIL (floats in [0, 1])."""
    if x.dtype == np.uint8:
        return False
    if np.allclose(x, x.astype(int)):
        if np.all(x >= 0) and np.all(x <= 255):
            return False
        raise ValueError(f"integer-valued image outside [0, 255]: [{x.min()}, {x.max()}]")
    if np.all(x >= 0) and np.all(x <= 1):
        return True
    raise ValueError(f"float image outside [0, 1]: [{x.min()}, {x.max()}]")


def _per_channel(v: Sequence[float], channels: int, name: str) -> Sequence[float]:
    if len(v) == 1:
        return tuple(v) * channels
    if len(v) != channels:
        raise ValueError(f"{name} has {len(v)} values for an image with {channels} channels")
    return v


def _size(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (int(v[0]), int(v[1]))
    if isinstance(v, dict) and set(v) >= {"height", "width"} and v["height"] and v["width"]:
        return (int(v["height"]), int(v["width"]))
    raise UnsupportedConfigError(
        f"DPTImageProcessor: config key 'size' = {v!r} is not supported (DPT resizes to height x width)"
    )


def _flatten(images) -> list:
    if isinstance(images, PIL.Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            out.extend(_flatten(im))
        return out
    x = np.asarray(images)
    if x.ndim == 4:
        return list(x)
    return [x]


def dpt_input(image) -> np.ndarray:
    """One image (PIL of any mode, or an [H, W, C] array with 1, 3 or 4 channels) -> the uint8 RGB array
    the depth estimator reads. PIL images and uint8 arrays are made RGB as transformers' `convert_rgb`
    does (transparency composited onto white, gray repeated); float arrays in [0, 1] are rounded to uint8
    (the PIL image they equal: transformers would truncate them and divide by 255 twice)."""
    if isinstance(image, PIL.Image.Image) or np.asarray(image).dtype == np.uint8:
        return to_rgb_uint8(image)
    return np.round(to_rgb_float(image) * 255).astype(np.uint8)


def depth_array(depth_map) -> np.ndarray:
    """A depth map argument -> float32 [D, H, W]: an array [D, H, W] (or [H, W]), or single-channel PIL
    images (a mode in DEPTH_MODES; any scale: depth is normalised per image)."""
    if isinstance(depth_map, PIL.Image.Image) or (
            isinstance(depth_map, (list, tuple)) and depth_map and isinstance(depth_map[0], PIL.Image.Image)):
        ims = [depth_map] if isinstance(depth_map, PIL.Image.Image) else list(depth_map)
        for im in ims:
            if not isinstance(im, PIL.Image.Image) or im.mode not in DEPTH_MODES:
                got = im.mode if isinstance(im, PIL.Image.Image) else type(im).__name__
                raise ValueError(f"a depth_map image must be single-channel PIL (mode {'/'.join(DEPTH_MODES)}); "
                                 f"got {got}")
        d = [np.asarray(im, dtype=np.float32) for im in ims]
        if len({x.shape for x in d}) > 1:
            raise ValueError("depth_map images differ in size")
        return np.stack(d)
    if not (hasattr(depth_map, "shape") and hasattr(depth_map, "dtype")):
        raise TypeError(f"depth_map: expected an array [B, H, W] or a PIL depth image; got {type(depth_map).__name__}")
    d = np.asarray(depth_map, dtype=np.float32)
    if d.ndim == 2:
        d = d[None]
    if d.ndim != 3:
        raise ValueError(f"depth_map must be [B, H, W]; got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("depth_map has non-finite values (NaN or Inf)")
    return d
