"""AutoencoderKL: encode/decode parity with diffusers on random weights over tiny configs, tiled and
sliced paths against diffusers' tiled results, the posterior, deprecated attention names, errors and
the real-size conversion plan through abstract shapes."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from conftest import real_config
from diffusers import AutoencoderKL as TorchVAE
from torch_ref import assert_close, nchw_to_nhwc, nhwc_to_nchw, randomize_

from unclip_jax.models.config import UnsupportedConfigError
from unclip_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, dummy_inputs
from unclip_jax.weights.convert import abstract_params, convert, plan
from unclip_jax.weights.tables import VAE

RTOL = 1e-4

CONFIGS = {
    # Two levels; sample_size 16 makes 16-pixel / 8-latent tiles, so a 28x28 image really tiles
    # (3 x 3 tiles, the last row and column ragged).
    "two_level": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                      latent_channels=4, sample_size=16),
    # Three levels, two resnets per block, other channel counts, no mid attention, no post-quant conv.
    "three_level": dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4,
                        in_channels=4, out_channels=2, latent_channels=3, sample_size=32,
                        mid_block_add_attention=False, use_post_quant_conv=False),
}
IMAGE = {"two_level": 28, "three_level": 24}


@functools.lru_cache(maxsize=None)
def _case(name: str):
    """Model, params, torch model and inputs for one config, built once."""
    cfg = CONFIGS[name]
    torch_model = randomize_(TorchVAE(**cfg), seed=len(name))
    config = AutoencoderKLConfig.from_dict(dict(torch_model.config))
    model = AutoencoderKL(config)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = convert(state, abstract_params(model, *dummy_inputs(config)), VAE, what=name)
    rng = np.random.RandomState(0)
    n = IMAGE[name]
    x = rng.uniform(-1, 1, (2, n, n, config.in_channels)).astype(np.float32)
    z = rng.randn(2, n // config.downsample_factor, n // config.downsample_factor,
                  config.latent_channels).astype(np.float32)
    return model, {"params": params}, torch_model, x, z


@functools.lru_cache(maxsize=None)
def _jitted(model, method: str, tiled: bool = False, sliced: bool = False):
    return jax.jit(functools.partial(model.apply, method=method, tiled=tiled, sliced=sliced))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_and_decode_match_diffusers(name):
    model, variables, torch_model, x, z = _case(name)
    with torch.no_grad():
        posterior = torch_model.encode(nhwc_to_nchw(x)).latent_dist
        image = torch_model.decode(nhwc_to_nchw(z)).sample
    ours = _jitted(model, "encode")(variables, x)
    assert isinstance(ours, DiagonalGaussian)
    assert_close(ours.mean, nchw_to_nhwc(posterior.mean), RTOL, f"{name} mean")
    assert_close(ours.std, nchw_to_nhwc(posterior.std), RTOL, f"{name} std")
    assert_close(ours.logvar, nchw_to_nhwc(posterior.logvar), RTOL, f"{name} logvar")
    assert_close(_jitted(model, "decode")(variables, z), nchw_to_nhwc(image), RTOL, f"{name} decode")


def test_tiled_encode_and_decode_match_diffusers_tiling():
    model, variables, torch_model, x, z = _case("two_level")
    # Encode a 3 x 3 grid of tiles (blends both ways); decode one row of 3 tiles to keep compiles few.
    z = z[:, :6]
    torch_model.enable_tiling()
    try:
        with torch.no_grad():
            posterior = torch_model.encode(nhwc_to_nchw(x)).latent_dist
            image = torch_model.decode(nhwc_to_nchw(z)).sample
    finally:
        torch_model.disable_tiling()
    ours = _jitted(model, "encode", tiled=True)(variables, x)
    assert_close(ours.mean, nchw_to_nhwc(posterior.mean), RTOL, "tiled mean")
    assert_close(ours.std, nchw_to_nhwc(posterior.std), RTOL, "tiled std")
    decoded = _jitted(model, "decode", tiled=True)(variables, z)
    assert_close(decoded, nchw_to_nhwc(image), RTOL, "tiled decode")
    # Tiling really changed the numbers (each tile sees only its neighbourhood).
    untiled = _jitted(model, "encode")(variables, x).mean
    assert float(np.abs(np.asarray(untiled) - np.asarray(ours.mean)).max()) > 1e-2


def test_sliced_paths_equal_the_batched_ones():
    model, variables, _, x, z = _case("two_level")
    assert_close(_jitted(model, "decode", sliced=True)(variables, z), _jitted(model, "decode")(variables, z),
                 1e-5, "sliced decode")
    assert_close(_jitted(model, "encode", sliced=True)(variables, x).mean, _jitted(model, "encode")(variables, x).mean,
                 1e-5, "sliced encode")


def test_small_inputs_are_not_tiled():
    # diffusers tiles only an input larger than one tile (here 6 latents <= 8); so do we.
    model, variables, _, _, z = _case("three_level")
    assert_close(_jitted(model, "decode", tiled=True)(variables, z), _jitted(model, "decode")(variables, z),
                 1e-6, "small tiled decode")


def test_posterior_sample_and_reconstruction():
    model, variables, torch_model, x, _ = _case("three_level")
    posterior = _jitted(model, "encode")(variables, x)
    noise = np.random.RandomState(3).randn(*posterior.mean.shape).astype(np.float32)
    np.testing.assert_allclose(posterior.sample(None, noise), posterior.mean + posterior.std * noise, rtol=1e-6)
    a, b = posterior.sample(jax.random.key(0)), posterior.sample(jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == posterior.mean.shape and not np.allclose(a, posterior.mode())
    with torch.no_grad():
        ref = torch_model(nhwc_to_nchw(x)).sample
    # __call__ is decode(encode(x).mode()): its shape abstractly, its numbers through the compiled halves.
    assert jax.eval_shape(model.apply, variables, x).shape == ref.shape[:1] + ref.shape[2:] + ref.shape[1:2]
    assert_close(_jitted(model, "decode")(variables, posterior.mode()), nchw_to_nhwc(ref), RTOL, "reconstruction")


def test_deprecated_attention_names_convert():
    model, variables, torch_model, _, _ = _case("two_level")
    old = {}
    for k, v in torch_model.state_dict().items():
        v = v.numpy()
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{dep}.")
                if k.endswith("weight"):
                    v = v[:, :, None, None]  # the LDM checkpoints' 1x1 conv layout
        old[k] = v
    assert any(".proj_attn." in k for k in old) and any(".query." in k for k in old)
    params = convert(old, abstract_params(model, *dummy_inputs(model.config)), VAE)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, variables["params"])


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
    ("act_fn", "tanh"),
])
def test_unsupported_config_is_refused_by_name(key, value):
    with pytest.raises(UnsupportedConfigError, match=key):
        AutoencoderKLConfig.from_dict(dict(CONFIGS["two_level"], **{key: value}))


def test_bad_inputs_are_reported_before_compute():
    model, variables, _, x, z = _case("two_level")
    encode = functools.partial(jax.eval_shape, functools.partial(model.apply, variables, method="encode"))
    decode = functools.partial(jax.eval_shape, functools.partial(model.apply, variables, method="decode"))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        encode(np.zeros((1, 16, 16, 4), np.float32))
    with pytest.raises(ValueError, match="multiples of 2"):
        encode(np.zeros((1, 15, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, h, w, 4\]"):
        decode(np.zeros((1, 8, 8, 3), np.float32))


def test_real_size_conversion_plan():
    d = real_config("vae_sd.json")
    config = AutoencoderKLConfig.from_dict(d)
    assert (config.tile_sample_size, config.tile_latent_size, config.scaling_factor) == (768, 96, 0.18215)
    with torch.device("meta"):
        torch_model = TorchVAE.from_config(d)
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    abstract = abstract_params(AutoencoderKL(config), *dummy_inputs(config))
    steps = plan(shapes, abstract, VAE, what="vae_sd")
    assert len(steps) == len(shapes) == len(jax.tree_util.tree_leaves(abstract))
