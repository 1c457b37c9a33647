"""Image inputs and CLIP's image preprocessing, in numpy and PIL (the runtime never imports torch).

Images come in as a PIL image, a list of PIL images, or an array [H, W, C] / [B, H, W, C] (channels-last),
uint8 in [0, 255] or float in [0, 1]. `CLIPImageProcessor` reproduces transformers' CLIPImageProcessor (PIL
backend) from a saved preprocessor_config.json: RGB conversion (transparency composited onto white),
bicubic resize of the shortest side, center crop, rescale, normalize. Output is channels-last float32
[B, crop_h, crop_w, 3].
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

from unclip_jax.models.resize import resize_nearest

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {0: PIL.Image.NEAREST, 1: PIL.Image.LANCZOS, 2: PIL.Image.BILINEAR, 3: PIL.Image.BICUBIC,
             4: PIL.Image.BOX, 5: PIL.Image.HAMMING}


def image_list(images: Any, what: str = "image") -> list:
    """Splits an image argument into a list of single images (PIL or [H, W, C] arrays).

    Raises TypeError / ValueError naming `what` for anything else.
    """
    if isinstance(images, PIL.Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{what}: empty list of images")
        out = []
        for i, im in enumerate(images):
            out.extend(image_list(im, f"{what}[{i}]"))
        return out
    if hasattr(images, "shape") and hasattr(images, "dtype"):
        arr = np.asarray(images)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            return [arr]
        if arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
            return list(arr)
        raise ValueError(
            f"{what}: an array image must be channels-last [H, W, C] or [B, H, W, C] with C in (1, 3, 4); "
            f"got shape {arr.shape}"
        )
    raise TypeError(f"{what}: expected a PIL image, a list of them, or an array [B, H, W, C]; got {type(images).__name__}")


def to_rgb_float(image) -> np.ndarray:
    """One image -> float32 [H, W, 3] in [0, 1]; transparency is composited onto white, gray is repeated.

    PIL images and uint8 arrays are divided by 255; float arrays must already lie in [0, 1].
    """
    if isinstance(image, PIL.Image.Image) or np.asarray(image).dtype == np.uint8:
        return to_rgb_uint8(image).astype(np.float32) / np.float32(255)
    x = np.asarray(image)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"an array image must be uint8 or float in [0, 1]; got {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (np.isnan(x).any() or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"a float image must lie in [0, 1]; got values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]")
    if x.shape[-1] == 4:
        x = x[..., 3:] * x[..., :3] + (1 - x[..., 3:])
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def to_rgb_uint8(image) -> np.ndarray:
    """One image -> uint8 [H, W, 3]; transparency is composited onto white, gray is repeated.

    Float arrays must lie in [0, 1]; they become uint8 by truncation of x * 255, which is what
    transformers' PIL path does before resizing (so our pixels equal its pixels).
    """
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        return (to_rgb_float(arr).astype(np.float64) * 255).astype(np.uint8)
    if arr.shape[-1] == 4:
        a = arr[..., 3:4].astype(np.float64) / 255
        arr = np.round(a * arr[..., :3] + (1 - a) * 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def vae_pixels(images: list, factor: int) -> np.ndarray:
    """Images (PIL or [H, W, C] arrays, one size) -> float32 [N, H', W', 3] in [-1, 1], H' and W' cut down
    to multiples of `factor` as diffusers' VaeImageProcessor does (Lanczos for PIL, before the RGB
    conversion; torch's nearest for arrays). Every PIL mode and 1, 3 or 4 channels are made RGB by
    `to_rgb_float` (diffusers' processor, with do_convert_rgb, would drop alpha rather than composite it
    onto white as transformers does: we composite, so the depth estimator and the VAE see one image)."""
    out = []
    for im in images:
        h, w = (im.height, im.width) if isinstance(im, PIL.Image.Image) else np.shape(im)[:2]
        if h < factor or w < factor:
            raise ValueError(f"an image of size {(h, w)} is smaller than the VAE factor {factor}")
        size = (h - h % factor, w - w % factor)
        if isinstance(im, PIL.Image.Image):
            if (h, w) != size:
                im = im.resize(size[::-1], resample=PIL.Image.LANCZOS)
            x = to_rgb_float(im)
        else:
            x = to_rgb_float(im)
            if (h, w) != size:
                x = resize_nearest(x, size)
        out.append(x)
    if len({x.shape for x in out}) > 1:
        raise ValueError(f"images differ in size {sorted({x.shape[:2] for x in out})}; give images of one size")
    return np.stack(out) * 2 - 1


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
    """transformers' CLIPImageProcessor, channels-last. Field names are preprocessor_config.json keys."""

    do_resize: bool = True
    size: int = 224  # shortest edge
    resample: int = 3  # PIL bicubic
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> CLIPImageProcessor:
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and d[f.name] is not None:
                kw[f.name] = d[f.name]
        size = d.get("size")
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"preprocessor config: size {size} is not supported (need shortest_edge)")
            kw["size"] = int(size["shortest_edge"])
        crop = d.get("crop_size")
        if isinstance(crop, dict):
            kw["crop_size"] = (int(crop["height"]), int(crop["width"]))
        elif isinstance(crop, int):
            kw["crop_size"] = (crop, crop)
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        if not kw.get("do_convert_rgb", True):
            raise ValueError("preprocessor config: do_convert_rgb=false is not supported (the encoder takes RGB)")
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, folder: str) -> CLIPImageProcessor:
        path = os.path.join(folder, "preprocessor_config.json")
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: missing") from e

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = {"shortest_edge": self.size}
        d["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        d["image_processor_type"] = "CLIPImageProcessor"
        return d

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def _resize(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        # Integer truncation of the long side, as torchvision's Resize (and transformers) do.
        new_short, new_long = self.size, int(self.size * long / short)
        oh, ow = (new_long, new_short) if w <= h else (new_short, new_long)
        return np.array(PIL.Image.fromarray(rgb).resize((ow, oh), resample=_RESAMPLE[self.resample]))

    def _center_crop(self, x: np.ndarray) -> np.ndarray:
        ch, cw = self.crop_size
        h, w = x.shape[:2]
        if h < ch or w < cw:  # pad with zeros to at least the crop, centred
            nh, nw = max(h, ch), max(w, cw)
            top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
            padded = np.zeros((nh, nw) + x.shape[2:], dtype=x.dtype)
            padded[top:top + h, left:left + w] = x
            x, h, w = padded, nh, nw
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[top:top + ch, left:left + cw]

    def preprocess_one(self, image) -> np.ndarray:
        x = to_rgb_uint8(image)
        if self.do_resize:
            x = self._resize(x)
        if self.do_center_crop:
            x = self._center_crop(x)
        x = x.astype(np.float32)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x

    def __call__(self, images: Any | Sequence[Any]) -> np.ndarray:
        """Images (see module doc) -> pixel values [B, crop_h, crop_w, 3] float32."""
        items = image_list(images)
        return np.stack([self.preprocess_one(im) for im in items])
