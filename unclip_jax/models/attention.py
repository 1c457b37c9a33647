"""Scaled dot-product attention shared by every model, and the transformer blocks built on it.

Attention goes through `jax.nn.dot_product_attention` on accelerators, so GPUs can take cuDNN's fused
kernel, and through cache-sized query blocks on CPU; both compute logits and softmax in float32
whatever the input dtype (the numerics that diffusers' `upcast_attention` and transformers' eager
CLIP attention ask for). `query_chunk_size` bounds memory the way diffusers'
`enable_attention_slicing` does: queries are processed in blocks, one after another (`lax.map`), and
since each query row's softmax is independent of the others the numbers are the same.

The modules mirror diffusers' `Attention` (to_q/to_k/to_v/to_out.0), `FeedForward` (GEGLU),
`BasicTransformerBlock` and the continuous-input `Transformer2DModel` of the SD UNets.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.layers import group_norm, layer_norm


# Logits per query block kept around this size on CPU: a block's [B, N, c, S] logits then stay in
# the last-level cache through max, exp, sum and the value product instead of streaming the whole
# [B, N, T, S] matrix through memory four times (about 3x faster than XLA's fused attention at
# 4096 tokens on a 2-core host).
_CPU_LOGITS_BYTES = 1 << 25


def _large_negative() -> jax.Array:
    # What jax.nn.dot_product_attention writes into masked logits: finite, so a row with every key
    # masked softmaxes to uniform weights instead of NaN.
    return jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, jnp.float32)


def _softmax_attention(q, k, v, mask, causal_offset, scale):
    """One block of queries, heads first: q [B, N, c, H], k/v [B, N, S, H], mask broadcastable to
    [B, N, c, S] or None, causal_offset the first query's position (None: not causal).

    Logits, softmax and the normalisation are float32 whatever the input dtype; the division by the
    row sum comes after the value product ([c, H] divisions instead of [c, S]).
    """
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if causal_offset is not None:
        rows = causal_offset + jnp.arange(q.shape[2])[:, None]
        causal = rows >= jnp.arange(k.shape[2])[None, :]
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, _large_negative())
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("bnts,bnsh->bnth", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)


def _cpu_block_size(b: int, n: int, t: int, s: int) -> int:
    c = 16
    while 2 * c * b * n * s * 4 <= _CPU_LOGITS_BYTES and c < t:
        c *= 2
    return c


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_chunk_size: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Multi-head attention over heads already split.

    Three paths with the same numbers (float32 logits and softmax): an explicit `implementation`
    goes to `jax.nn.dot_product_attention` (GPUs: cuDNN or XLA); `query_chunk_size` runs query
    blocks one after another; otherwise the CPU backend uses cache-sized query blocks (see
    `_CPU_LOGITS_BYTES`) and other backends `jax.nn.dot_product_attention`.

    Args:
      query: [B, T, N, H]; key, value: [B, S, N, H].
      mask: boolean, True where a query may attend; broadcastable to [B, N, T, S].
      is_causal: also mask keys after the query position (T == S).
      scale: logit scale, default H ** -0.5.
      query_chunk_size: process queries in blocks of this many, sequentially (memory-bounded; same
        result).
      implementation: passed to `jax.nn.dot_product_attention` when queries are not chunked (None
        lets this function choose); query blocks always take the float32 XLA formulation.

    Returns:
      [B, T, N, H] in the query dtype.
    """
    b, t, n, h = query.shape
    s = key.shape[1]
    if query_chunk_size is None:
        if implementation is not None or jax.default_backend() != "cpu":
            return jax.nn.dot_product_attention(
                query, key, value, mask=mask, is_causal=is_causal, scale=scale, implementation=implementation
            )
        query_chunk_size = _cpu_block_size(b, n, t, s)
    scale = h ** -0.5 if scale is None else scale
    q, k, v = (x.swapaxes(1, 2) for x in (query, key, value))  # heads first: [B, N, T|S, H]
    m = None
    if mask is not None:
        m = jnp.asarray(mask)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    c = min(query_chunk_size, t)
    blocks = -(-t // c)
    if blocks == 1:
        out = _softmax_attention(q, k, v, m, 0 if is_causal else None, scale)
        return out.swapaxes(1, 2)
    pad = blocks * c - t
    # The ragged tail is padded with zero queries (their rows are dropped below) so that every block
    # has one shape and `lax.map` can run them as a loop: only one block of logits is live at a time.
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q = q.reshape(b, n, blocks, c, h).transpose(2, 0, 1, 3, 4)
    starts = jnp.arange(blocks) * c
    per_query_mask = m is not None and m.shape[2] != 1
    if per_query_mask:
        m = jnp.broadcast_to(m, (*m.shape[:2], t, s))
        m = jnp.pad(m, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        m = m.reshape(*m.shape[:2], blocks, c, s).transpose(2, 0, 1, 3, 4)

    def one(args):
        qb, start, *mb = args
        return _softmax_attention(qb, k, v, mb[0] if mb else m, start if is_causal else None, scale)

    out = jax.lax.map(one, (q, starts, m) if per_query_mask else (q, starts))
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, blocks * c, n, h)
    return out[:, :t]


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, N*H]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class Attention(nn.Module):
    """diffusers' `Attention`: q from x, k/v from `context` (x itself when None), heads of `dim_head`.

    With `norm_num_groups` it first group-normalizes x and with `residual_connection` adds x back and
    divides by `rescale_output_factor` (the VAE's single-head spatial attention). x may be spatial
    [B, H, W, C] (attended as H*W tokens) or tokens [B, T, C]; context is [B, S, D].
    """

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    query_chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        spatial = x.shape[1:-1]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.norm_eps, "group_norm")(x).astype(self.dtype)
        context = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head

        def proj(name, y):
            return split_heads(nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(y), self.heads)

        out = attention(proj("to_q", x), proj("to_k", context), proj("to_v", context),
                        query_chunk_size=self.query_chunk_size)
        out = nn.Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(merge_heads(out))
        out = out.reshape(*residual.shape[:1], *spatial, self.out_dim)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out.astype(self.dtype)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): net.0.proj to 2 x inner, value * gelu(gate), net.2 back.

    [B, T, D] -> [B, T, D]
    """

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.dim * self.mult
        # A submodule named `net_0` holding `proj` mirrors PyTorch's `ff.net.0.proj`.
        h = _GEGLUProj(inner, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class _GEGLUProj(nn.Module):
    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention (cross-attention when `only_cross_attention`), cross-attention
    on `context`, GEGLU feed-forward, each with a residual. [B, T, D] -> [B, T, D]."""

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    norm_eps: float = 1e-5
    query_chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def attn(name):
            return Attention(self.heads, self.dim_head, self.dim, query_chunk_size=self.query_chunk_size,
                             dtype=self.dtype, name=name)

        h = layer_norm(self.norm_eps, "norm1")(x).astype(self.dtype)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        h = layer_norm(self.norm_eps, "norm2")(x).astype(self.dtype)
        x = x + attn("attn2")(h, context)
        h = layer_norm(self.norm_eps, "norm3")(x).astype(self.dtype)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(h)


class Transformer2DModel(nn.Module):
    """Spatial transformer over a feature map: group norm, proj_in, `num_layers` transformer blocks
    on the H*W tokens, proj_out, plus the input. A 1x1-conv proj_in/out (`use_linear_projection`
    False) is the same map as a linear one, so both are Dense here; only the checkpoint layout
    differs, which the conversion handles. [B, H, W, C], context [B, S, D] -> [B, H, W, C]."""

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    only_cross_attention: bool = False
    query_chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        # eps 1e-6 is fixed in diffusers for this norm, whatever the UNet's norm_eps.
        h = group_norm(self.norm_num_groups, 1e-6, "norm")(x).astype(self.dtype)
        h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(inner, self.heads, self.dim_head, self.only_cross_attention,
                                      query_chunk_size=self.query_chunk_size, dtype=self.dtype,
                                      name=f"transformer_blocks_{i}")(h, context)
        h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h.reshape(b, hgt, wid, inner))
        return (h + x).astype(self.dtype)
