"""PyTorch's `interpolate`, as the reference models and pipelines call it, in JAX (and numpy on the host).

jax.image.resize is not a drop-in replacement: it antialiases when downsampling (torch does not by
default), has no align_corners=True, and its bicubic kernel uses a = -0.5 where torch uses a = -0.75.
Each function here reproduces torch's sampling positions and weights so parity tests hold at fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _linear_taps(size_in: int, size_out: int, align_corners: bool):
    """Source indices and weights of PyTorch's linear interpolation along one axis (no antialias)."""
    dst = np.arange(size_out, dtype=np.float32)
    if align_corners:
        scale = np.float32((size_in - 1) / (size_out - 1)) if size_out > 1 else np.float32(0)
        src = dst * scale
    else:
        scale = np.float32(size_in / size_out)
        src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C] as torch's `interpolate(mode="bilinear")` computes it: separable
    two-tap gathers with static indices."""
    for axis, out in ((1, size[0]), (2, size[1])):
        if x.shape[axis] == out and not align_corners:
            continue
        i0, i1, w = _linear_taps(x.shape[axis], out, align_corners)
        shape = [1] * x.ndim
        shape[axis] = out
        w = jnp.asarray(w).reshape(shape)
        a, b = jnp.take(x, i0, axis=axis), jnp.take(x, i1, axis=axis)
        x = (a.astype(jnp.float32) * (1 - w) + b.astype(jnp.float32) * w).astype(x.dtype)
    return x


def _cubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of `interpolate(mode="bicubic", align_corners=False)` along one axis:
    Keys' cubic with a = -0.75, half-pixel centres without clamping the source coordinate, taps clamped
    to the border, arithmetic in float32."""
    a = np.float32(-0.75)
    scale = np.float32(size_in) / np.float32(size_out)
    dst = np.arange(size_out, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    t = np.clip(src - base.astype(np.float32), 0, 1).astype(np.float32)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    m = np.zeros((size_out, size_in), np.float32)
    for k in range(4):
        np.add.at(m, (np.arange(size_out), np.clip(base - 1 + k, 0, size_in - 1)), weights[:, k])
    return m


def resize_bicubic(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W] -> [B, *size], as torch's `interpolate(mode="bicubic", align_corners=False)`."""
    mh = jnp.asarray(_cubic_matrix(x.shape[1], size[0]))
    mw = jnp.asarray(_cubic_matrix(x.shape[2], size[1]))
    return jnp.einsum("oh,bhw,pw->bop", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source indices of torch's default `interpolate(mode="nearest")` along one axis."""
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


def resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, ...] -> [*size, ...] (numpy, on the host), as torch's `interpolate(mode="nearest")`."""
    return x[nearest_indices(x.shape[0], size[0])][:, nearest_indices(x.shape[1], size[1])]
