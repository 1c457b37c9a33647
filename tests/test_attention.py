"""attention(): the chunked (memory-bounded) path equals the plain one; the Attention module and the
spatial transformer match diffusers on random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2D
from torch_ref import assert_close, nchw_to_nhwc, nhwc_to_nchw, randomize_

from unclip_jax.models.attention import Attention, Transformer2DModel, attention
from unclip_jax.weights.convert import Rules, abstract_params, convert

RTOL = 1e-4

# Compiled once per static configuration: cheaper than eager dispatch of the scan on CPU.
_attention = jax.jit(attention, static_argnames=("is_causal", "scale", "query_chunk_size", "implementation"))


def _qkv(t=37, s=20, n=3, h=8, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(2, t, n, h).astype(np.float32), rng.randn(2, s, n, h).astype(np.float32),
            rng.randn(2, s, n, h).astype(np.float32))


@pytest.mark.parametrize("chunk", [8, 37, 100])
def test_chunked_equals_plain(chunk):
    q, k, v = _qkv()
    assert_close(_attention(q, k, v, query_chunk_size=chunk), _attention(q, k, v), 1e-6, f"chunk {chunk}")


def test_chunked_with_mask_and_causal():
    q, k, v = _qkv(t=19, s=19)
    mask = np.random.RandomState(1).rand(2, 1, 1, 19) > 0.3
    mask[..., 0] = True
    assert_close(_attention(q, k, v, mask=mask, query_chunk_size=4), _attention(q, k, v, mask=mask), 1e-6, "mask")
    assert_close(_attention(q, k, v, is_causal=True, query_chunk_size=4), _attention(q, k, v, is_causal=True),
                 1e-6, "causal")
    both = _attention(q, k, v, mask=mask, is_causal=True, query_chunk_size=5)
    assert_close(both, _attention(q, k, v, mask=mask, is_causal=True), 1e-6, "mask + causal")


def test_chunks_run_as_a_loop():
    q, k, v = _qkv()
    # lax.map lowers to a scan: XLA runs the blocks one after another instead of all at once.
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, query_chunk_size=8))(q, k, v))
    assert "scan" in jaxpr
    out = jax.jit(lambda q, k, v: attention(q, k, v, query_chunk_size=8))(q, k, v)
    assert out.shape == q.shape


def _convert(torch_module, flax_module, *inputs):
    state = {k: v.numpy() for k, v in torch_module.state_dict().items()}
    return {"params": convert(state, abstract_params(flax_module, *inputs), Rules())}


@pytest.mark.parametrize("chunk", [None, 5])
def test_cross_attention_matches_diffusers(chunk):
    ref_mod = randomize_(TorchAttention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8), 0)
    rng = np.random.RandomState(0)
    x, ctx = rng.randn(2, 9, 16).astype(np.float32), rng.randn(2, 4, 12).astype(np.float32)
    with torch.no_grad():
        ref = ref_mod(torch.from_numpy(x), torch.from_numpy(ctx)).numpy()
    ours = Attention(2, 8, 16, query_chunk_size=chunk)
    assert_close(jax.jit(ours.apply)(_convert(ref_mod, ours, x, ctx), x, ctx), ref, RTOL, "cross attention")


def test_vae_style_spatial_attention_matches_diffusers():
    # The VAE mid block's attention: group norm first, one head over all channels, residual added.
    ref_mod = randomize_(TorchAttention(16, heads=1, dim_head=16, norm_num_groups=4, eps=1e-6, bias=True,
                                        residual_connection=True, upcast_softmax=True,
                                        _from_deprecated_attn_block=True), 1)
    x = np.random.RandomState(1).randn(2, 5, 6, 16).astype(np.float32)
    with torch.no_grad():
        ref = nchw_to_nhwc(ref_mod(nhwc_to_nchw(x)))
    ours = Attention(1, 16, 16, qkv_bias=True, norm_num_groups=4, norm_eps=1e-6, residual_connection=True)
    assert_close(jax.jit(ours.apply)(_convert(ref_mod, ours, x), x), ref, RTOL, "spatial attention")


@pytest.mark.parametrize("linear,only_cross,layers", [(True, False, 2), (False, True, 1)])
def test_transformer_2d_matches_diffusers(linear, only_cross, layers):
    ref_mod = randomize_(TorchTransformer2D(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                            num_layers=layers, cross_attention_dim=12, norm_num_groups=4,
                                            use_linear_projection=linear, only_cross_attention=only_cross), 2)
    rng = np.random.RandomState(2)
    x, ctx = rng.randn(2, 4, 6, 16).astype(np.float32), rng.randn(2, 3, 12).astype(np.float32)
    with torch.no_grad():
        ref = ref_mod(nhwc_to_nchw(x), encoder_hidden_states=torch.from_numpy(ctx), return_dict=False)[0]
    ref = nchw_to_nhwc(ref)
    ours = Transformer2DModel(2, 8, layers, 4, only_cross)
    out = jax.jit(ours.apply)(_convert(ref_mod, ours, x, ctx), x, ctx)
    assert_close(out, ref, RTOL, f"transformer linear={linear} only_cross={only_cross}")
    bf16 = Transformer2DModel(2, 8, layers, 4, only_cross, dtype=jnp.bfloat16)
    out16 = jax.jit(bf16.apply)(_convert(ref_mod, ours, x, ctx), x, ctx)
    assert out16.dtype == jnp.bfloat16
    assert_close(np.asarray(out16, np.float32), ref, 3e-2, "bf16 transformer")
