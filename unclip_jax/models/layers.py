"""Shared convolutional building blocks: timestep embeddings, group norm, resnet blocks, resampling.

Used by the UNet, the VAE, the Karlo prior (sinusoidal timestep embedding) and the DPT model. All
spatial tensors are channels-last, [B, H, W, C].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / "Attention is all you need".

    Frequency i of dim // 2 is max_period ** (-i / (dim // 2 - freq_shift)); the output is
    [sin, cos] (or [cos, sin] with `flip_sin_to_cos`), zero-padded by one when `dim` is odd.

    Args:
      timesteps: [B] (a scalar is treated as [1]).
    Returns:
      [B, dim] float32.
    """
    timesteps = jnp.atleast_1d(jnp.asarray(timesteps)).astype(jnp.float32)
    half = dim // 2
    # float32 throughout, matching diffusers: the phase of a large timestep is sensitive to rounding.
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    phase = scale * (timesteps[:, None] * jnp.exp(exponent)[None, :])
    sin, cos = jnp.sin(phase), jnp.cos(phase)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# Every activation a config may name, by diffusers' `get_activation` and transformers' ACT2FN names.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    # The exact erf form in both libraries (OpenCLIP: SD 2.x text encoder, ViT-H; DPT).
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    # OpenAI CLIP: x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def group_norm(num_groups: int, eps: float, name: str) -> nn.GroupNorm:
    """GroupNorm over [B, ..., C] with float32 statistics whatever the compute dtype.

    The two-pass variance (not E[x^2] - E[x]^2) because activations deep in a UNet have means large
    against their spread, where the one-pass form loses digits that PyTorch keeps.
    """
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """LayerNorm with float32 two-pass statistics (see `group_norm`)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, padding: int | None = None) -> nn.Conv:
    """A 2-D convolution with PyTorch's symmetric padding ((kernel - 1) // 2 by default)."""
    p = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)), dtype=dtype,
                   name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D: norm-act-conv twice, the timestep embedding added (or, with
    "scale_shift", applied as FiLM after the second norm), a 1x1 shortcut when channels change.

    x: [B, H, W, C_in]; temb: [B, D] or None  ->  [B, H, W, out_channels].
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    time_embedding_norm: str = "default"  # or "scale_shift"
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = ACTIVATIONS[self.act_fn]
        h = act(group_norm(self.groups, self.eps, "norm1")(x)).astype(self.dtype)
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        scale_shift = None
        if temb is not None:
            width = 2 * self.out_channels if self.time_embedding_norm == "scale_shift" else self.out_channels
            t = nn.Dense(width, dtype=self.dtype, name="time_emb_proj")(act(temb))[:, None, None, :]
            if self.time_embedding_norm == "scale_shift":
                scale_shift = jnp.split(t, 2, axis=-1)
            else:
                h = h + t
        elif self.time_embedding_norm == "scale_shift":
            raise ValueError("ResnetBlock2D: time_embedding_norm 'scale_shift' needs a timestep embedding")
        h = group_norm(self.groups_out or self.groups, self.eps, "norm2")(h)
        if scale_shift is not None:
            h = h * (1 + scale_shift[0]) + scale_shift[1]
        h = conv(self.out_channels, 3, self.dtype, "conv2")(act(h).astype(self.dtype))
        if x.shape[-1] != self.out_channels:
            x = nn.Dense(self.out_channels, dtype=self.dtype, name="conv_shortcut")(x)
        return ((x + h) / self.output_scale_factor).astype(self.dtype)


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution. `padding` 0 pads one pixel on the bottom/right only (the VAE
    encoder's asymmetric padding, inherited from the original LDM code).

    [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), out_channels]
    """

    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution. [B, H, W, C] -> [B, 2H, 2W, C']."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on a (sinusoidal or other) embedding: linear_1, act, linear_2 [, post act].

    [B, D_in] -> [B, out_dim or time_embed_dim]
    """

    time_embed_dim: int
    out_dim: int | None = None
    act_fn: str = "silu"
    post_act_fn: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
        x = ACTIVATIONS[self.act_fn](x)
        x = nn.Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, name="linear_2")(x)
        return x if self.post_act_fn is None else ACTIVATIONS[self.post_act_fn](x)
