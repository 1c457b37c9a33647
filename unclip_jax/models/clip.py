"""CLIP text and vision encoders (Radford et al. 2021), as transformers' CLIP models compute them.

Module names mirror transformers' PyTorch names (`text_model/encoder/layers_3/self_attn/q_proj`) so
the conversion table stays empty but for the layer index. Param dtype and compute dtype are separate:
params keep what they were loaded as, `dtype` is what activations are computed in; layer norms and
the attention softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from unclip_jax.models.attention import attention, merge_heads, split_heads
from unclip_jax.models.config import config_from_dict
from unclip_jax.models.layers import ACTIVATIONS, layer_norm

@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # 2 marks configs from before transformers fixed the EOS id: pool at argmax(input_ids) instead.
    eos_token_id: int = 2
    pad_token_id: int = 1
    bos_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        if "text_config" in d:  # a full CLIPConfig
            d = d["text_config"]
        return config_from_dict(cls, d, checks=_COMMON_CHECKS, name="CLIPTextConfig")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPVisionConfig:
        if "vision_config" in d:
            d = d["vision_config"]
        return config_from_dict(cls, d, checks=_COMMON_CHECKS, name="CLIPVisionConfig")


_COMMON_CHECKS = {
    "hidden_act": lambda v: v in ACTIVATIONS,
    "model_type": lambda v: v in ("clip_text_model", "clip_vision_model", "clip"),
}


@flax.struct.dataclass
class CLIPOutput:
    """What the CLIP encoders return.

    last_hidden_state: [B, T, D] (after the final layer norm for text; before the post norm for vision).
    pooler_output: [B, D] (text: at the EOS token; vision: the class token after the post norm).
    embeds: [B, P] the projected pooled output, or None for models without projection.
    hidden_states: the embeddings and each layer's output, ([B, T, D], ...), when asked for.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    embeds: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        q = split_heads(dense("q_proj")(x), self.num_heads)
        k = split_heads(dense("k_proj")(x), self.num_heads)
        v = split_heads(dense("v_proj")(x), self.num_heads)
        out = attention(q, k, v, mask=mask, is_causal=is_causal)
        return dense("out_proj")(merge_heads(out))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        h = layer_norm(self.eps, "layer_norm1")(x).astype(self.dtype)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(h, mask, is_causal)
        h = layer_norm(self.eps, "layer_norm2")(x).astype(self.dtype)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(ACTIVATIONS[self.hidden_act](x))


class CLIPEncoder(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False, num_layers=None):
        """Runs the first `num_layers` layers (all by default); returns (x, states) where states holds
        the input and every layer's output."""
        states = [x]
        for i in range(self.num_layers if num_layers is None else num_layers):
            x = CLIPEncoderLayer(
                self.hidden_size, self.intermediate_size, self.num_heads, self.hidden_act, self.eps,
                self.dtype, name=f"layers_{i}",
            )(x, mask, is_causal)
            states.append(x)
        return x, tuple(states)


def _encoder(config, dtype, name="encoder") -> CLIPEncoder:
    return CLIPEncoder(
        config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers,
        config.hidden_act, config.layer_norm_eps, dtype, name=name,
    )


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, clip_skip=None):
        """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding) or None."""
        c = self.config
        t = input_ids.shape[-1]
        if t > c.max_position_embeddings:
            raise ValueError(f"input_ids has {t} tokens; the text encoder takes at most {c.max_position_embeddings}")
        x = _TextEmbeddings(c, name="embeddings")(input_ids).astype(self.dtype)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        # clip_skip k (as diffusers applies it) takes hidden_states[-(k + 1)], the output of layer
        # L - k, through the final layer norm: the last k layers need not run at all.
        layers = c.num_hidden_layers - (clip_skip or 0)
        if not 0 <= layers <= c.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip} is outside [0, {c.num_hidden_layers}] for this text encoder")
        x, states = _encoder(c, self.dtype)(x, mask, True, num_layers=layers)
        last = layer_norm(c.layer_norm_eps, "final_layer_norm")(x)
        if c.eos_token_id == 2:
            # Old configs: the EOS token has the largest id in the vocabulary.
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return CLIPOutput(last, pooled, None, states if output_hidden_states else None)


class _TextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        tok = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding")(
            jnp.arange(input_ids.shape[-1])
        )
        return tok + pos[None]


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel (and, with `with_projection`, CLIPTextModelWithProjection)."""

    config: CLIPTextConfig
    with_projection: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, clip_skip=None):
        out = CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask, output_hidden_states, clip_skip
        )
        if self.with_projection:
            embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(
                out.pooler_output.astype(self.dtype)
            )
            out = out.replace(embeds=embeds)
        return out


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, H, W, C] (channels-last) -> [B, 1 + P, D]."""
        c = self.config
        b, h, w, _ = pixel_values.shape
        if h != c.image_size or w != c.image_size:
            raise ValueError(f"pixel_values are {h}x{w}; the vision encoder takes {c.image_size}x{c.image_size}")
        p = c.patch_size
        patches = nn.Conv(
            c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(c.hidden_size ** -0.5), (c.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
        pos = nn.Embed((c.image_size // p) ** 2 + 1, c.hidden_size, name="position_embedding")(
            jnp.arange((c.image_size // p) ** 2 + 1)
        )
        return jnp.concatenate([cls, patches], axis=1) + pos[None].astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states=False):
        c = self.config
        x = _VisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        # The misspelling is transformers' parameter name.
        x = layer_norm(c.layer_norm_eps, "pre_layrnorm")(x).astype(self.dtype)
        x, states = _encoder(c, self.dtype)(x)
        pooled = layer_norm(c.layer_norm_eps, "post_layernorm")(x[:, 0])
        return CLIPOutput(x, pooled, None, states if output_hidden_states else None)


class CLIPVisionModel(nn.Module):
    """transformers' CLIPVisionModel (and, with `with_projection`, CLIPVisionModelWithProjection).

    Takes channels-last pixel values [B, H, W, 3], normalised as CLIPImageProcessor does.
    """

    config: CLIPVisionConfig
    with_projection: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states=False):
        out = CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(pixel_values, output_hidden_states)
        if self.with_projection:
            embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(
                out.pooler_output.astype(self.dtype)
            )
            out = out.replace(embeds=embeds)
        return out


def dummy_text_inputs(config: CLIPTextConfig, batch: int = 1):
    """Inputs for `init` / `eval_shape`."""
    return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)


def dummy_vision_inputs(config: CLIPVisionConfig, batch: int = 1):
    """Inputs for `init` / `eval_shape`."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)
