"""UNet2DConditionModel: parity with diffusers on random weights over differently shaped tiny configs,
chunked attention, config refusal, input checks, and real-size conversion plans through abstract shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import real_config
from diffusers import UNet2DConditionModel as TorchUNet
from torch_ref import assert_close, nchw_to_nhwc, nhwc_to_nchw, randomize_

from unclip_jax.models.config import UnsupportedConfigError
from unclip_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel, dummy_inputs
from unclip_jax.weights.convert import abstract_params, convert, plan
from unclip_jax.weights.tables import UNET

RTOL = 1e-4  # fp32, relative to the output's scale

_TWO = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)

# Each tiny config exercises a different set of options; together they cover every option the SD 1.5,
# SD 2.1, unCLIP (-small) and depth UNets use, and a few more.
CONFIGS = {
    # unCLIP: projection class embedding, per-block head counts, linear projection, upcast.
    "unclip": dict(_TWO, layers_per_block=1, cross_attention_dim=24, attention_head_dim=(2, 4),
                   use_linear_projection=True, upcast_attention=True, class_embed_type="projection",
                   projection_class_embeddings_input_dim=12),
    # depth: 5 input channels, conv projections, no upcast, 2 transformer layers per block, attention
    # at every level; also an identity class embedding, an explicit time embedding width and gelu.
    "depth": dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2, norm_num_groups=8, in_channels=5,
                  layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
                  transformer_layers_per_block=2, use_linear_projection=False, upcast_attention=False,
                  class_embed_type="identity", time_embedding_dim=40, act_fn="gelu"),
    # scale-shift resnets, a timestep class embedding, only-cross-attention in one block, the other
    # sinusoid convention, an attention-free mid block, other conv kernels and eps.
    "scale_shift": dict(_TWO, layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
                        resnet_time_scale_shift="scale_shift", class_embed_type="timestep",
                        only_cross_attention=(True, False), flip_sin_to_cos=False, freq_shift=1,
                        mid_block_type="UNetMidBlock2D", conv_in_kernel=1, conv_out_kernel=5, norm_eps=1e-6,
                        mid_block_scale_factor=2.0),
    # a class table concatenated to the time embedding, per-block layer counts, no mid block, extra acts.
    "class_table": dict(_TWO, layers_per_block=(1, 2), transformer_layers_per_block=(2, 1), cross_attention_dim=8,
                        attention_head_dim=(1, 2), num_class_embeds=10, class_embeddings_concat=True,
                        mid_block_type=None, time_embedding_act_fn="silu", timestep_post_act="silu",
                        center_input_sample=True),
}

B, HW, T = 2, 16, 5


def _inputs(name: str, cfg: dict):
    rng = np.random.RandomState(len(name))
    x = rng.randn(B, HW, HW, cfg.get("in_channels", 4)).astype(np.float32)
    ctx = rng.randn(B, T, cfg["cross_attention_dim"]).astype(np.float32)
    # A scalar timestep in one config (broadcast over the batch); fractional ones elsewhere.
    t = 741 if name == "depth" else np.array([3.5, 870.0], np.float32)
    labels = None
    kind = cfg.get("class_embed_type")
    if kind == "projection":
        labels = rng.randn(B, cfg["projection_class_embeddings_input_dim"]).astype(np.float32)
    elif kind == "timestep":
        labels = np.array([0.0, 250.0], np.float32)
    elif kind == "identity":
        labels = rng.randn(B, cfg["time_embedding_dim"]).astype(np.float32)
    elif cfg.get("num_class_embeds"):
        labels = np.array([3, 7], np.int64)
    return x, t, ctx, labels


@functools.lru_cache(maxsize=None)
def _case(name: str):
    """(jax model, params, inputs, diffusers output [B, H, W, C]); built once per config."""
    cfg = CONFIGS[name]
    torch_model = randomize_(TorchUNet(**cfg), seed=len(name))
    x, t, ctx, labels = _inputs(name, cfg)
    with torch.no_grad():
        ref = torch_model(nhwc_to_nchw(x), torch.tensor(t), torch.from_numpy(ctx),
                          class_labels=None if labels is None else torch.from_numpy(labels)).sample
    config = UNet2DConditionConfig.from_dict(dict(torch_model.config))
    model = UNet2DConditionModel(config)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = convert(state, abstract_params(model, *dummy_inputs(config)), UNET, what=name)
    labels = None if labels is None else labels.astype(np.int32) if labels.dtype == np.int64 else labels
    return model, params, (x, t, ctx, labels), nchw_to_nhwc(ref)


def _run(model, params, inputs):
    # One compile per module: cheaper on CPU than the eager dispatch of a first call.
    return jax.jit(model.apply)({"params": params}, *inputs)


@functools.lru_cache(maxsize=None)
def _ours(name: str):
    model, params, inputs, _ = _case(name)
    return _run(model, params, inputs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name):
    assert_close(_ours(name), _case(name)[3], RTOL, f"UNet {name}")


def test_chunked_attention_gives_the_same_numbers():
    model, params, inputs, ref = _case("unclip")
    # 7 does not divide the 256 or 64 tokens: the ragged last block is exercised too.
    chunked = _run(UNet2DConditionModel(model.config, attention_chunk_size=7), params, inputs)
    # Only the summation order of the smaller matmuls differs.
    assert_close(chunked, _ours("unclip"), 1e-5, "chunked vs plain")
    assert_close(chunked, ref, RTOL, "chunked vs diffusers")


def test_num_attention_heads_overrides_the_misnamed_head_dim():
    # diffusers reads `attention_head_dim` as the number of heads unless `num_attention_heads` is set
    # (which diffusers itself then refuses to build); ours takes num_attention_heads as the head count.
    misnamed = UNet2DConditionConfig.from_dict(CONFIGS["unclip"])
    named = UNet2DConditionConfig.from_dict(dict(CONFIGS["unclip"], num_attention_heads=(2, 4), attention_head_dim=3))
    assert misnamed.heads == named.heads == (2, 4)
    # The model reads heads only through `config.heads`: the same modules, the same param tree.
    shapes = [jax.tree_util.tree_map(lambda a: a.shape, abstract_params(UNet2DConditionModel(c), *dummy_inputs(c)))
              for c in (misnamed, named)]
    assert shapes[0] == shapes[1]


def test_bfloat16_compute_stays_close():
    model, params, inputs, ref = _case("scale_shift")
    out = _run(UNet2DConditionModel(model.config, dtype=jnp.bfloat16), params, inputs)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), ref, 5e-2, "bf16 UNet")


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text"),
    ("addition_time_embed_dim", 256),
    ("encoder_hid_dim", 32),
    ("encoder_hid_dim_type", "text_proj"),
    ("time_cond_proj_dim", 8),
    ("time_embedding_type", "fourier"),
    ("dual_cross_attention", True),
    ("attention_type", "gated"),
    ("cross_attention_norm", "layer_norm"),
    ("reverse_transformer_layers_per_block", [[1], [1]]),
    ("transformer_layers_per_block", [[1, 2], [1, 2]]),
    ("resnet_skip_time_act", True),
    ("resnet_out_scale_factor", 2.0),
    ("mid_block_only_cross_attention", True),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("class_embed_type", "learned"),
    ("resnet_time_scale_shift", "spatial"),
    ("act_fn", "tanh"),
    ("norm_num_groups", None),
])
def test_unsupported_config_is_refused_by_name(key, value):
    d = dict(CONFIGS["unclip"], **{key: value})
    with pytest.raises(UnsupportedConfigError, match=key):
        UNet2DConditionConfig.from_dict(d)


def test_default_values_of_unsupported_keys_are_accepted():
    d = dict(CONFIGS["unclip"], addition_embed_type=None, encoder_hid_dim=None, time_cond_proj_dim=None,
             dual_cross_attention=False, attention_type="default", resnet_skip_time_act=False,
             time_embedding_type="positional", _class_name="UNet2DConditionModel", _diffusers_version="0.42.1")
    assert UNet2DConditionConfig.from_dict(d).class_embed_type == "projection"


def test_inconsistent_config_is_refused():
    with pytest.raises(UnsupportedConfigError, match="projection_class_embeddings_input_dim"):
        UNet2DConditionConfig.from_dict(dict(_TWO, class_embed_type="projection"))
    with pytest.raises(UnsupportedConfigError, match="attention_head_dim"):
        UNet2DConditionConfig.from_dict(dict(_TWO, attention_head_dim=(1, 2, 4)))


def test_bad_inputs_are_reported_before_compute():
    model, params, (x, t, ctx, labels), _ = _case("unclip")
    # eval_shape traces without computing: the checks fire at trace time.
    run = functools.partial(jax.eval_shape, functools.partial(model.apply, {"params": params}))
    run(x, t, ctx, labels)
    with pytest.raises(ValueError, match=r"\[B, H, W, 4\]"):
        run(np.zeros((B, HW, HW, 5), np.float32), t, ctx, labels)
    with pytest.raises(ValueError, match="multiples of 2"):
        run(np.zeros((B, 15, HW, 4), np.float32), t, ctx, labels)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        run(x, t, np.zeros((B, T, 7), np.float32), labels)
    with pytest.raises(ValueError, match="needs class_labels"):
        run(x, t, ctx, None)
    with pytest.raises(ValueError, match="class_labels must be"):
        run(x, t, ctx, np.zeros((B, 5), np.float32))


REAL = {
    "unet_sd21_unclip.json": dict(heads=(5, 10, 20, 20), in_channels=4, class_dim=2048),
    "unet_sd21_unclip_small.json": dict(heads=(5, 10, 20, 20), in_channels=4, class_dim=1536),
    "unet_sd2_depth.json": dict(heads=(5, 10, 20, 20), in_channels=5, class_dim=None),
    "unet_sd15.json": dict(heads=(8, 8, 8, 8), in_channels=4, class_dim=None),
}


@pytest.mark.parametrize("fixture", list(REAL))
def test_real_size_conversion_plan(fixture):
    d = real_config(fixture)
    config = UNet2DConditionConfig.from_dict(d)
    want = REAL[fixture]
    assert config.heads == want["heads"] and config.in_channels == want["in_channels"]
    assert config.projection_class_embeddings_input_dim == want["class_dim"]
    with torch.device("meta"):
        torch_model = TorchUNet.from_config(d)
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    abstract = abstract_params(UNet2DConditionModel(config), *dummy_inputs(config))
    steps = plan(shapes, abstract, UNET, what=fixture)
    assert len(steps) == len(shapes) == len(jax.tree_util.tree_leaves(abstract))
