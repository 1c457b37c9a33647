"""The down, mid and up blocks of the SD UNets (diffusers' unet_2d_blocks), channels-last.

Each down block returns (x, skips): every resnet (+ attention) output and the downsampled output,
which the mirrored up block consumes from the end.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models.attention import Transformer2DModel
from unclip_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D


class BlockSpec(nn.Module):
    """Fields every block shares (a base class only; never instantiated)."""

    out_channels: int
    num_layers: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    resnet_time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    def resnet(self, name: str) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, self.norm_num_groups, eps=self.norm_eps, act_fn=self.act_fn,
                             time_embedding_norm=self.resnet_time_scale_shift,
                             output_scale_factor=self.output_scale_factor, dtype=self.dtype, name=name)


class CrossAttnSpec(BlockSpec):
    """Adds what the spatial transformers of a cross-attention block need."""

    num_heads: int = 8
    transformer_layers: int = 1
    only_cross_attention: bool = False
    query_chunk_size: int | None = None

    def transformer(self, name: str) -> Transformer2DModel:
        return Transformer2DModel(self.num_heads, self.out_channels // self.num_heads, self.transformer_layers,
                                  self.norm_num_groups, self.only_cross_attention, self.query_chunk_size,
                                  self.dtype, name=name)


class DownBlock2D(BlockSpec):
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context=None):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(CrossAttnSpec):
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock2D(BlockSpec):
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class CrossAttnUpBlock2D(CrossAttnSpec):
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            x = self.transformer(f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class UNetMidBlock2DCrossAttn(CrossAttnSpec):
    """resnet, then (transformer, resnet) x num_layers. Only-cross-attention is never passed to the mid
    block in diffusers, so it is not here either."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0")(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}")(x, temb)
        return x


class UNetMidBlock2D(BlockSpec):
    """The UNet's attention-free mid block: a single resnet."""

    @nn.compact
    def __call__(self, x, temb, context=None):
        return self.resnet("resnets_0")(x, temb)


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn, "UNetMidBlock2D": UNetMidBlock2D}
