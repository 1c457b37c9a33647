"""Argument checks that need no model: the pipelines run them first thing in a call, and the CLI runs the
same functions on its arguments before it loads anything, so both refuse exactly the same values.

Every check takes the name to report (the API's keyword, or the CLI's `--flag`) and raises a TypeError
(wrong kind of value) or ValueError (wrong value) whose message starts with that name. This module
imports only the standard library and numpy, so the CLI can call it without importing JAX.
"""

from __future__ import annotations

import math

import numpy as np

VAE_FACTOR = 8  # the VAE downsampling of the real checkpoints (tiny test models use smaller ones)
# depth2img refuses larger input images unless the call passes `max_pixels` (None: no limit). Depth
# estimation and the VAE encoder run at the input's size, so memory and time grow with it: 1024 x 1024
# is four times the model's native 512 x 512 area.
MAX_PIXELS = 1024 * 1024


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_real(value, name: str) -> None:
    """A real number (TypeError otherwise; bool is not a number here)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")


def check_finite_real(value, name: str) -> None:
    """A finite real number, e.g. a guidance scale (NaN would silently turn guidance off)."""
    check_real(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value}")


check_guidance = check_finite_real


def check_count(value, name: str) -> None:
    """A step or image count: an int of at least 1."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1; got {value}")


def check_side(value, name: str, factor: int = VAE_FACTOR) -> None:
    """An image height or width: a positive int multiple of the VAE factor."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    if value <= 0 or value % factor:
        raise ValueError(f"{name} must be a positive multiple of {factor}; got {value}")


def check_size(height, width, factor: int = VAE_FACTOR, names: tuple[str, str] = ("height", "width")) -> None:
    """Both sides of an output size (see `check_side`)."""
    check_side(height, names[0], factor)
    check_side(width, names[1], factor)


def check_strength(value, name: str = "strength") -> None:
    """img2img strength: in (0, 1] (0 would run no denoising step)."""
    check_finite_real(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1]; got {value}")


def check_eta(value, name: str = "eta") -> None:
    """DDIM's eta: a finite number >= 0."""
    check_finite_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")


def check_noise_level(value, num_train_timesteps: int | None = None, name: str = "noise_level") -> None:
    """The image-embedding noise level: an int in [0, num_train_timesteps) of the image-noising scheduler
    (when known; without it, only >= 0)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    if num_train_timesteps is None:
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value}")
    elif not 0 <= value < num_train_timesteps:
        raise ValueError(f"{name} must be in [0, {num_train_timesteps - 1}]; got {value}")


def check_pixels(height: int, width: int, max_pixels: int | None = MAX_PIXELS, name: str = "image",
                 allow: str = "max_pixels=None") -> None:
    """An input image within the pixel budget (None: no budget). `allow` says how to lift it."""
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(f"{name} is {width}x{height} = {height * width:,} pixels, past the budget of "
                         f"{max_pixels:,} pixels; resize it, or pass {allow} to allow it")


def check_max_pixels(value, name: str = "max_pixels") -> None:
    """A pixel budget: None (no budget) or a positive int."""
    if value is not None:
        check_count(value, name)
