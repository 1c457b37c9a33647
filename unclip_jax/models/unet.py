"""The conditional UNet of Stable Diffusion 1.x/2.x, Stable unCLIP and SD 2 depth (diffusers'
UNet2DConditionModel), channels-last.

`UNet2DConditionModel(config)(sample [B, H, W, C], timesteps [B] or scalar, encoder_hidden_states
[B, T, D], class_labels=None)` returns the model output (noise or v prediction) [B, H, W, C_out].
Module names mirror diffusers' (`down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k`), so the
conversion table is nearly empty.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.config import UnsupportedConfigError, config_from_dict
from unclip_jax.models.layers import ACTIVATIONS, TimestepEmbedding, conv, group_norm, timestep_embedding
from unclip_jax.models.unet_blocks import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS


def _default(value):
    return lambda v: v == value


def _none(v):
    return v is None


# Keys whose non-default values change the architecture in ways not implemented here (none of the
# SD 1.5 / 2.x / unCLIP / depth UNets use them). A present key that fails its check is refused.
_CHECKS = {
    "down_block_types": lambda v: all(t in DOWN_BLOCKS for t in v),
    "up_block_types": lambda v: all(t in UP_BLOCKS for t in v),
    "mid_block_type": lambda v: v is None or v in MID_BLOCKS,
    "act_fn": lambda v: v in ACTIVATIONS,
    "norm_num_groups": lambda v: v is not None,
    "class_embed_type": lambda v: v in (None, "timestep", "identity", "projection", "simple_projection"),
    "resnet_time_scale_shift": lambda v: v in ("default", "scale_shift"),
    "time_embedding_type": _default("positional"),
    "time_embedding_act_fn": lambda v: v is None or v in ACTIVATIONS,
    "timestep_post_act": lambda v: v is None or v in ACTIVATIONS,
    "transformer_layers_per_block": lambda v: isinstance(v, int) or all(isinstance(x, int) for x in v),
    "reverse_transformer_layers_per_block": _none,
    "encoder_hid_dim": _none,
    "encoder_hid_dim_type": _none,
    "addition_embed_type": _none,
    "addition_time_embed_dim": _none,
    "dual_cross_attention": _default(False),
    "time_cond_proj_dim": _none,
    "attention_type": _default("default"),
    "cross_attention_norm": _none,
    "mid_block_only_cross_attention": lambda v: v is None or v is False,
    # Both only act in block types we do not implement; refused rather than silently meaningless.
    "resnet_skip_time_act": _default(False),
    "resnet_out_scale_factor": _default(1.0),
}


def _per_block(value, n: int, key: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfigError(f"UNet2DConditionConfig: {key!r} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The config.json keys of diffusers' UNet2DConditionModel that these UNets use (diffusers'
    defaults). Per-block keys may be one value or one per down block."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: Any = None
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: Any = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    # diffusers' historical misnomer: with `num_attention_heads` unset, this is the number of heads.
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    class_embeddings_concat: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNet2DConditionConfig:
        config = config_from_dict(cls, d, checks=_CHECKS, name="UNet2DConditionConfig")
        config.validate()
        return config

    def validate(self) -> None:
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise UnsupportedConfigError(
                "UNet2DConditionConfig: down_block_types, up_block_types and block_out_channels differ in length")
        for key in ("only_cross_attention", "layers_per_block", "cross_attention_dim",
                    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            _per_block(getattr(self, key), n, key)
        if self.class_embed_type in ("projection", "simple_projection") \
                and self.projection_class_embeddings_input_dim is None:
            raise UnsupportedConfigError(
                f"UNet2DConditionConfig: class_embed_type {self.class_embed_type!r} needs "
                "'projection_class_embeddings_input_dim'")
        for c, h in zip(self.block_out_channels, self.heads):
            if c % h:
                raise UnsupportedConfigError(f"UNet2DConditionConfig: {c} channels do not split into {h} heads")

    # Per-block views, as diffusers expands them.
    @property
    def heads(self) -> tuple[int, ...]:
        n = len(self.down_block_types)
        return _per_block(self.num_attention_heads if self.num_attention_heads is not None
                          else self.attention_head_dim, n, "attention_head_dim")

    def per_block(self, key: str) -> tuple:
        return _per_block(getattr(self, key), len(self.down_block_types), key)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def has_class_embedding(self) -> bool:
        return self.class_embed_type is not None or self.num_class_embeds is not None


class UNet2DConditionModel(nn.Module):
    """Stable Diffusion's conditional UNet.

    Attributes:
      config: the architecture.
      dtype: compute dtype (norms and attention softmax stay float32).
      attention_chunk_size: run every attention over query blocks of this many tokens, one block at a
        time (diffusers' `enable_attention_slicing` counterpart: bounded memory, the same numbers).
      remat: rematerialise each down/mid/up block in the backward pass (diffusers'
        `enable_gradient_checkpointing`: less training memory, the same numbers).
    """

    config: UNet2DConditionConfig
    dtype: Any = jnp.float32
    attention_chunk_size: int | None = None
    remat: bool = False

    def check_inputs(self, sample_shape, context_shape, class_labels_shape) -> None:
        """Raises ValueError on input shapes the model cannot take, before any compute."""
        c = self.config
        if len(sample_shape) != 4 or sample_shape[-1] != c.in_channels:
            raise ValueError(
                f"UNet: sample must be [B, H, W, {c.in_channels}] (channels-last); got {tuple(sample_shape)}")
        f = c.downsample_factor
        if sample_shape[1] % f or sample_shape[2] % f:
            raise ValueError(f"UNet: sample height and width must be multiples of {f}; got {tuple(sample_shape[1:3])}")
        dims = set(c.per_block("cross_attention_dim"))
        if len(context_shape) != 3 or (len(dims) == 1 and context_shape[-1] not in dims):
            raise ValueError(f"UNet: encoder_hidden_states must be [B, T, {min(dims)}]; got {tuple(context_shape)}")
        if c.has_class_embedding and class_labels_shape is None:
            raise ValueError(f"UNet: this model (class_embed_type={c.class_embed_type!r}) needs class_labels")
        if c.class_embed_type in ("projection", "simple_projection") and \
                tuple(class_labels_shape[-1:]) != (c.projection_class_embeddings_input_dim,):
            raise ValueError(f"UNet: class_labels must be [B, {c.projection_class_embeddings_input_dim}]; "
                             f"got {tuple(class_labels_shape)}")

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        class_labels: jax.Array | None = None,
    ) -> jax.Array:
        """sample [B, H, W, C_in]; timesteps [B] or scalar; encoder_hidden_states [B, T, D];
        class_labels: [B, P] ("projection"), [B] ("timestep" or num_class_embeds), [B, E] ("identity").

        Returns [B, H, W, C_out].
        """
        c = self.config
        self.check_inputs(sample.shape, encoder_hidden_states.shape,
                          None if class_labels is None else jnp.shape(class_labels))
        b = sample.shape[0]
        act = ACTIVATIONS[c.act_fn]
        if c.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        t_emb = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = TimestepEmbedding(c.time_embed_dim, act_fn=c.act_fn, post_act_fn=c.timestep_post_act,
                                dtype=self.dtype, name="time_embedding")(t_emb.astype(self.dtype))
        class_emb = self._class_embedding(class_labels, b)
        if class_emb is not None:
            emb = jnp.concatenate([emb, class_emb], -1) if c.class_embeddings_concat else emb + class_emb
        if c.time_embedding_act_fn is not None:
            emb = ACTIVATIONS[c.time_embedding_act_fn](emb)

        context = encoder_hidden_states.astype(self.dtype)
        x = conv(c.block_out_channels[0], c.conv_in_kernel, self.dtype, "conv_in")(sample.astype(self.dtype))

        n = len(c.block_out_channels)
        heads, layers = c.heads, c.per_block("layers_per_block")
        tlayers, only_cross = c.per_block("transformer_layers_per_block"), c.per_block("only_cross_attention")
        common = dict(norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps, act_fn=c.act_fn,
                      resnet_time_scale_shift=c.resnet_time_scale_shift, dtype=self.dtype)

        def attn_kwargs(block_type, i):
            if "CrossAttn" not in block_type:
                return {}
            return dict(num_heads=heads[i], transformer_layers=tlayers[i], only_cross_attention=only_cross[i],
                        query_chunk_size=self.attention_chunk_size)

        block = nn.remat if self.remat else (lambda cls: cls)
        skips = [x]
        for i, block_type in enumerate(c.down_block_types):
            x, s = block(DOWN_BLOCKS[block_type])(
                c.block_out_channels[i], layers[i], add_downsample=i < n - 1,
                downsample_padding=c.downsample_padding, name=f"down_blocks_{i}",
                **common, **attn_kwargs(block_type, i))(x, emb, context)
            skips.extend(s)

        if c.mid_block_type is not None:
            x = block(MID_BLOCKS[c.mid_block_type])(
                c.block_out_channels[-1], 1, output_scale_factor=c.mid_block_scale_factor, name="mid_block",
                **common, **attn_kwargs(c.mid_block_type, n - 1))(x, emb, context)

        for i, block_type in enumerate(c.up_block_types):
            j = n - 1 - i  # the mirrored down block
            num = layers[j] + 1
            s, skips = skips[-num:], skips[:-num]
            x = block(UP_BLOCKS[block_type])(
                c.block_out_channels[j], num, add_upsample=i < n - 1, name=f"up_blocks_{i}",
                **common, **attn_kwargs(block_type, j))(x, s, emb, context)

        x = act(group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(x)).astype(self.dtype)
        return conv(c.out_channels, c.conv_out_kernel, self.dtype, "conv_out")(x)

    def _class_embedding(self, class_labels, batch: int):
        c = self.config
        if not c.has_class_embedding:
            return None
        if c.class_embed_type is None:  # num_class_embeds: a learned table
            return nn.Embed(c.num_class_embeds, c.time_embed_dim, dtype=self.dtype,
                            name="class_embedding")(class_labels)
        if c.class_embed_type == "timestep":
            labels = jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (batch,))
            sinus = timestep_embedding(labels, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
            return TimestepEmbedding(c.time_embed_dim, act_fn=c.act_fn, dtype=self.dtype,
                                     name="class_embedding")(sinus.astype(self.dtype))
        if c.class_embed_type == "identity":
            return class_labels.astype(self.dtype)
        if c.class_embed_type == "projection":
            # diffusers builds this TimestepEmbedding without passing act_fn: always SiLU.
            return TimestepEmbedding(c.time_embed_dim, dtype=self.dtype,
                                     name="class_embedding")(class_labels.astype(self.dtype))
        return nn.Dense(c.time_embed_dim, dtype=self.dtype, name="class_embedding")(class_labels.astype(self.dtype))


def dummy_inputs(config: UNet2DConditionConfig, batch: int = 1):
    """Inputs for `init` / `eval_shape` (the smallest spatial size the UNet takes)."""
    f = config.downsample_factor
    dim = config.per_block("cross_attention_dim")[0]
    labels = None
    if config.class_embed_type in ("projection", "simple_projection"):
        labels = jnp.zeros((batch, config.projection_class_embeddings_input_dim), jnp.float32)
    elif config.class_embed_type == "identity":
        labels = jnp.zeros((batch, config.time_embed_dim), jnp.float32)
    elif config.has_class_embedding:
        labels = jnp.zeros((batch,), jnp.int32)
    return (jnp.zeros((batch, f, f, config.in_channels), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, 1, dim), jnp.float32), labels)
