"""Scaled dot-product attention shared by every model.

All attention goes through `jax.nn.dot_product_attention`, so GPUs can take cuDNN's fused kernel and
the XLA fallback computes logits and softmax in float32 whatever the input dtype (the numerics that
diffusers' `upcast_attention` and transformers' eager CLIP attention ask for). `query_chunk_size`
bounds memory the way diffusers' `enable_attention_slicing` does: queries are processed in blocks, and
since each query row's softmax is independent of the others the numbers are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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

    Args:
      query: [B, T, N, H]; key, value: [B, S, N, H].
      mask: boolean, True where a query may attend; broadcastable to [B, N, T, S].
      is_causal: also mask keys after the query position (T == S).
      scale: logit scale, default H ** -0.5.
      query_chunk_size: process queries in blocks of this many (memory-bounded; same result).
      implementation: passed to `jax.nn.dot_product_attention` (None lets JAX choose).

    Returns:
      [B, T, N, H] in the query dtype.
    """
    t = query.shape[1]
    if query_chunk_size is None or query_chunk_size >= t:
        return jax.nn.dot_product_attention(
            query, key, value, mask=mask, is_causal=is_causal, scale=scale, implementation=implementation
        )
    if is_causal:
        causal = jnp.tril(jnp.ones((t, key.shape[1]), dtype=bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (query.shape[0], query.shape[2], t, key.shape[1]))
    blocks = []
    # A Python loop over static blocks (not lax.map): the block count is small and a ragged last
    # block needs no padding; XLA schedules the blocks one after another, bounding live logits.
    for start in range(0, t, query_chunk_size):
        stop = min(start + query_chunk_size, t)
        blocks.append(
            jax.nn.dot_product_attention(
                query[:, start:stop], key, value,
                mask=None if mask is None else mask[:, :, start:stop],
                scale=scale, implementation=implementation,
            )
        )
    return jnp.concatenate(blocks, axis=1)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, N*H]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
