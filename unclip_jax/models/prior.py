"""The unCLIP prior (Ramesh et al. 2022, sec. 2.1) and Stable unCLIP's image-embedding normalizer.

`PriorTransformer` computes what diffusers' `PriorTransformer` computes: a decoder-only transformer
(causal when given a text mask, which is when diffusers applies its causal mask) over the tokens

    [text tokens (T), text embedding, timestep embedding, noised image embedding (N), prd]

whose last token (or, without `prd`, the N image-embedding tokens) is projected to the predicted
CLIP image embedding. Karlo and stable-diffusion-2-1-unclip-small use it with the default options;
the other options (layer norms on the input, no text-token projection, no `prd` token) are the ones
Shap-E's prior uses.

`StableUnCLIPImageNormalizer` holds the CLIP image-embedding statistics that Stable unCLIP
normalizes with before noising an embedding and un-normalizes with after.

Module names mirror diffusers' PyTorch names (`transformer_blocks_3/attn1/to_q`, `ff/net_0/proj`)
so the conversion table is empty. Params keep their dtype; `dtype` is the compute dtype; layer
norms run their statistics in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.attention import attention, merge_heads, split_heads
from unclip_jax.models.config import config_from_dict
from unclip_jax.models.layers import ACTIVATIONS, TimestepEmbedding, layer_norm, timestep_embedding

# diffusers' nn.LayerNorm default, used by every norm of the prior.
_EPS = 1e-5

# diffusers builds its causal and padding masks additively with this value rather than -inf.
_MASK_VALUE = -10000.0


@dataclasses.dataclass(frozen=True)
class PriorTransformerConfig:
    """diffusers' PriorTransformer config.json keys; None means "derive it", as in diffusers."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0  # training only: inference ignores it
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorTransformerConfig:
        return config_from_dict(cls, d, checks=_PRIOR_CHECKS, name="PriorTransformerConfig")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def time_dim(self) -> int:
        return self.time_embed_dim or self.inner_dim

    @property
    def proj_dim(self) -> int:
        return self.embedding_proj_dim or self.embedding_dim

    @property
    def clip_dim(self) -> int:
        return self.clip_embed_dim or self.embedding_dim

    @property
    def seq_len(self) -> int:
        return self.num_embeddings + self.additional_embeddings


_PRIOR_CHECKS = {
    "_class_name": lambda v: v == "PriorTransformer",
    "time_embed_act_fn": lambda v: v in ACTIVATIONS,
    "norm_in_type": lambda v: v in (None, "layer"),
    "embedding_proj_norm_type": lambda v: v in (None, "layer"),
    "encoder_hid_proj_type": lambda v: v in (None, "linear"),
    "added_emb_type": lambda v: v in (None, "prd"),
}


@dataclasses.dataclass(frozen=True)
class ImageNormalizerConfig:
    embedding_dim: int = 768

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageNormalizerConfig:
        return config_from_dict(
            cls, d, checks={"_class_name": lambda v: v == "StableUnCLIPImageNormalizer"},
            name="ImageNormalizerConfig",
        )


class _SelfAttention(nn.Module):
    """diffusers' `Attention` as the prior uses it: self-attention with biased projections."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        inner = self.num_heads * self.head_dim
        dense = lambda name: nn.Dense(inner, dtype=self.dtype, name=name)  # noqa: E731
        q = split_heads(dense("to_q")(x), self.num_heads)
        k = split_heads(dense("to_k")(x), self.num_heads)
        v = split_heads(dense("to_v")(x), self.num_heads)
        return dense("to_out_0")(merge_heads(attention(q, k, v, mask=mask)))


class _GELUProj(nn.Module):
    """diffusers' `GELU` activation module: a projection followed by the exact (erf) GELU."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return jax.nn.gelu(nn.Dense(self.features, dtype=self.dtype, name="proj")(x), approximate=False)


class _GELUFeedForward(nn.Module):
    """diffusers' FeedForward with `activation_fn="gelu"`, 4x inner width (net.1 is a dropout)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _GELUProj(4 * self.dim, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class PriorTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock as the prior configures it (layer norms, no cross-attention):
    x + attn1(norm1(x)); x + ff(norm3(x))."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        dim = self.num_heads * self.head_dim
        h = layer_norm(_EPS, "norm1")(x).astype(self.dtype)
        x = x + _SelfAttention(self.num_heads, self.head_dim, self.dtype, name="attn1")(h, mask)
        h = layer_norm(_EPS, "norm3")(x).astype(self.dtype)
        return x + _GELUFeedForward(dim, self.dtype, name="ff")(h)


def prior_attention_mask(attention_mask: jax.Array, seq_len: int) -> jax.Array:
    """The boolean mask equivalent to diffusers' additive prior mask.

    diffusers adds -10000 for each padded text token and -10000 above the diagonal, so a logit gets 0,
    -10000 or -20000. Softmax weight only survives on the keys whose sum equals the row's maximum:
    the others are exp(-10000)-times smaller, which is 0 in float32. Keeping exactly those keys
    reproduces diffusers even in the rows whose every causal key is padding (where diffusers then
    attends to the padding and the later extra tokens): no row is left fully masked, so no row can
    produce the NaN or uniform output that a fully masked softmax gives.

    Args:
      attention_mask: [B, T] text mask (1/True = token, 0/False = padding), T + extra tokens = seq_len.
      seq_len: L, the length of the whole token sequence.

    Returns:
      [B, 1, L, L] boolean, True where a query may attend to a key.
    """
    t = attention_mask.shape[1]
    if t > seq_len:
        raise ValueError(f"attention_mask has {t} tokens; the prior's sequence has only {seq_len}")
    pad = (1.0 - attention_mask.astype(jnp.float32)) * _MASK_VALUE
    pad = jnp.pad(pad, ((0, 0), (0, seq_len - t)))
    idx = jnp.arange(seq_len)
    causal = jnp.where(idx[None, :] > idx[:, None], _MASK_VALUE, 0.0)
    bias = pad[:, None, :] + causal[None]
    keep = bias >= jnp.max(bias, axis=-1, keepdims=True)
    return keep[:, None]


class PriorTransformer(nn.Module):
    """diffusers' PriorTransformer (the unCLIP prior), in Flax.

    `apply({"params": p}, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask)`
    returns the predicted image embedding; `apply({"params": p}, latents, method="post_process_latents")`
    un-normalizes a sampled embedding with the checkpoint's CLIP statistics.
    """

    config: PriorTransformerConfig
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each transformer block in the backward pass (training memory)

    def setup(self):
        c = self.config
        d = c.inner_dim
        dense = lambda n: nn.Dense(n, dtype=self.dtype)  # noqa: E731
        self.time_embedding = TimestepEmbedding(c.time_dim, d, c.time_embed_act_fn, dtype=self.dtype)
        self.proj_in = dense(d)
        self.embedding_proj_norm = layer_norm(_EPS, "embedding_proj_norm") if c.embedding_proj_norm_type else None
        self.embedding_proj = dense(d)
        self.encoder_hidden_states_proj = dense(d) if c.encoder_hid_proj_type else None
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.02), (1, c.seq_len, d)
        )
        self.prd_embedding = (
            self.param("prd_embedding", nn.initializers.normal(0.02), (1, 1, d)) if c.added_emb_type else None
        )
        self.transformer_blocks = [
            (nn.remat(PriorTransformerBlock) if self.remat else PriorTransformerBlock)(
                c.num_attention_heads, c.attention_head_dim, self.dtype) for _ in range(c.num_layers)
        ]
        self.norm_in = layer_norm(_EPS, "norm_in") if c.norm_in_type else None
        self.norm_out = layer_norm(_EPS, "norm_out")
        self.proj_to_clip_embeddings = dense(c.clip_dim)
        self.clip_mean = self.param("clip_mean", nn.initializers.zeros, (1, c.clip_dim))
        self.clip_std = self.param("clip_std", nn.initializers.ones, (1, c.clip_dim))

    def __call__(self, hidden_states, timestep, proj_embedding, encoder_hidden_states=None, attention_mask=None):
        """One prior denoising step.

        Args:
          hidden_states: [B, D] noised image embedding (or [B, N, D] tokens), D = embedding_dim.
          timestep: scalar or [B], integer or fractional.
          proj_embedding: [B, P] text embedding (or [B, 1, P]), P = embedding_proj_dim.
          encoder_hidden_states: [B, T, D] text tokens, D = embedding_dim (= inner_dim when the config
            has no `encoder_hid_proj_type`); required when it has one.
          attention_mask: [B, T] text mask (1 = token, 0 = padding), T = num_embeddings; None
            attends everywhere, causal mask included, as diffusers does.

        Returns:
          [B, C] predicted image embedding, C = clip_embed_dim; without `prd` ([B, N, C]) the image
          tokens' outputs, as diffusers returns them ([B, 1, C] for a [B, D] input). Compute dtype.
        """
        c = self.config
        b = hidden_states.shape[0]

        t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timestep)), (b,))
        # Timesteps(inner_dim, flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin].
        time_emb = self.time_embedding(timestep_embedding(t, c.inner_dim, flip_sin_to_cos=True, freq_shift=0.0))

        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        proj = self.embedding_proj(proj_embedding.astype(self.dtype))
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("this prior projects text tokens: encoder_hidden_states is required")
            encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states.astype(self.dtype))
        x = self.proj_in(hidden_states.astype(self.dtype))

        proj = proj[:, None] if proj.ndim == 2 else proj
        x = x[:, None] if x.ndim == 2 else x
        tokens = [] if encoder_hidden_states is None else [encoder_hidden_states.astype(self.dtype)]
        tokens += [proj, time_emb[:, None], x]
        if self.prd_embedding is not None:
            tokens.append(jnp.broadcast_to(self.prd_embedding.astype(self.dtype), (b, 1, c.inner_dim)))
        x = jnp.concatenate(tokens, axis=1)

        # Tokens before the image embedding: text tokens, text embedding, timestep.
        n_before = (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]) + proj.shape[1] + 1
        pos = self.positional_embedding.astype(self.dtype)
        if pos.shape[1] < x.shape[1]:
            # A table covering only the image tokens (Shap-E's): the extra tokens get no position.
            pos = jnp.pad(pos, ((0, 0), (n_before, 0 if self.prd_embedding is None else 1), (0, 0)))
        if pos.shape[1] != x.shape[1]:
            raise ValueError(
                f"the prior's sequence has {x.shape[1]} tokens but its positional embedding {pos.shape[1]}: "
                f"text tokens must number num_embeddings = {c.num_embeddings}"
            )
        x = x + pos

        mask = None
        if attention_mask is not None:
            if attention_mask.shape[1] + c.additional_embeddings != c.seq_len or x.shape[1] != c.seq_len:
                raise ValueError(
                    f"attention_mask is {attention_mask.shape}; the prior masks exactly num_embeddings = "
                    f"{c.num_embeddings} text tokens of a {c.seq_len}-token sequence"
                )
            mask = prior_attention_mask(attention_mask, c.seq_len)

        if self.norm_in is not None:
            x = self.norm_in(x).astype(self.dtype)
        for block in self.transformer_blocks:
            x = block(x, mask)
        x = self.norm_out(x).astype(self.dtype)
        x = x[:, -1] if self.prd_embedding is not None else x[:, n_before:]
        return self.proj_to_clip_embeddings(x)

    def post_process_latents(self, prior_latents):
        """[B, C] normalized image embedding -> CLIP image embedding: latents * clip_std + clip_mean."""
        return prior_latents * self.clip_std + self.clip_mean


class StableUnCLIPImageNormalizer(nn.Module):
    """The CLIP image-embedding statistics of Stable unCLIP: `scale` normalizes, `unscale` inverts it.

    `apply({"params": p}, embeds, method="scale")`; calling the module itself is `scale`.
    """

    config: ImageNormalizerConfig

    def setup(self):
        d = self.config.embedding_dim
        self.mean = self.param("mean", nn.initializers.zeros, (1, d))
        self.std = self.param("std", nn.initializers.ones, (1, d))

    def __call__(self, embeds):
        return self.scale(embeds)

    def scale(self, embeds):
        """[B, D] -> (embeds - mean) / std."""
        return (embeds - self.mean) / self.std

    def unscale(self, embeds):
        """[B, D] -> embeds * std + mean."""
        return embeds * self.std + self.mean


def dummy_prior_inputs(config: PriorTransformerConfig, batch: int = 1):
    """Inputs for `init` / `eval_shape`: (hidden_states, timestep, proj_embedding, encoder_hidden_states).

    Param shapes depend only on the feature sizes; the sequence is laid out to fill the positional
    table: text tokens in front of one image token when the config projects text tokens (Karlo:
    num_embeddings of them), otherwise image tokens only (Shap-E).
    """
    c = config
    extra = 2 + (1 if c.added_emb_type else 0)  # text embedding, timestep, prd
    if c.encoder_hid_proj_type:
        hidden = jnp.zeros((batch, c.embedding_dim), jnp.float32)
        text = jnp.zeros((batch, max(c.seq_len - extra - 1, 1), c.embedding_dim), jnp.float32)
    else:
        hidden = jnp.zeros((batch, max(c.seq_len - extra, 1), c.embedding_dim), jnp.float32)
        text = None
    return hidden, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, c.proj_dim), jnp.float32), text


def dummy_normalizer_inputs(config: ImageNormalizerConfig, batch: int = 1):
    return (jnp.zeros((batch, config.embedding_dim), jnp.float32),)


__all__ = [
    "ImageNormalizerConfig",
    "PriorTransformer",
    "PriorTransformerConfig",
    "StableUnCLIPImageNormalizer",
    "dummy_normalizer_inputs",
    "dummy_prior_inputs",
]
