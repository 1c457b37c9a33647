"""Differentiable sampling: gradients of a scalar loss on the generated image agree with central finite
differences (fp32), and remat keeps a long gradient's memory near a short one's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

STEPS = 2
EPS = 1e-2  # a step of 1% of the argument's RMS: truncation error ~1e-3, fp32 rounding below that


@pytest.fixture(scope="module")
def img2img(pipeline_pairs):
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    return pipe, params


def _with_conv_in(params, kernel):
    unet = dict(params["unet"])
    unet["conv_in"] = {**unet["conv_in"], "kernel": kernel}
    return {**params, "unet": unet}


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _directional_check(value_and_grad, args):
    """Each argument's derivative along its own gradient, g . v with v = g scaled to the argument's RMS,
    against the central difference (f(x + eps v) - f(x - eps v)) / 2 eps. Along the gradient the change of
    the loss is as large as a step of that size can make it, so fp32 rounding of the loss stays far below
    it (a random direction in thousands of dims is nearly orthogonal to g, and its difference drowns in
    rounding); a wrong gradient still shows, as <true g, wrong g> != |wrong g|^2. One compiled
    value-and-gradient serves the differences too (a second compile costs more than the unused backward)."""
    _, grads = value_and_grad(*args)
    errors = []
    for i, (x, g) in enumerate(zip(args, grads)):
        assert _rms(g) > 0, f"argument {i}: a zero gradient checks nothing"
        v = np.asarray(g) * ((_rms(x) or 1.0) / _rms(g))
        analytic = float(jnp.vdot(g, v))
        plus = [a + EPS * v if j == i else a for j, a in enumerate(args)]
        minus = [a - EPS * v if j == i else a for j, a in enumerate(args)]
        numeric = (float(value_and_grad(*plus)[0]) - float(value_and_grad(*minus)[0])) / (2 * EPS)
        errors.append(abs(analytic - numeric) / abs(analytic))
    return errors


def test_img2img_gradients_match_finite_differences(img2img):
    """d loss / d (latents, image embeddings, a UNet weight) through noise augmentation, 2 guided DDIM
    steps with eta > 0 (given step noise) and the VAE decoder."""
    pipe, params = img2img
    rng = np.random.RandomState(0)
    embeds = rng.randn(2, 32).astype(np.float32)
    inputs, config = pipe.prepare(image_embeds=embeds, prompt=["a cat", "a dog"], params=params,
                                  key=jax.random.key(0), height=16, width=16, num_inference_steps=STEPS,
                                  guidance_scale=3.0, noise_level=20, eta=0.5)
    inputs = inputs.replace(step_noise=jnp.asarray(rng.randn(STEPS, *inputs.latents.shape).astype(np.float32)))
    weights = jnp.asarray(rng.randn(2, 16, 16, 3).astype(np.float32))
    key = jax.random.key(1)

    def loss(latents, image_embeds, kernel):
        out = pipe.sample(_with_conv_in(params, kernel), inputs.replace(latents=latents, image_embeds=image_embeds),
                          key, config=config)
        return jnp.sum(out * weights)

    args = (inputs.latents, inputs.image_embeds, params["unet"]["conv_in"]["kernel"])
    errors = _directional_check(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), args)
    print("relative errors (latents, image embeds, conv_in kernel):", errors)
    assert max(errors) <= 1e-2, errors


def test_depth2img_gradients_match_finite_differences(pipeline_pairs):
    """d loss / d (noise, prompt embeddings, depth map) through depth normalisation and the start-step noising."""
    _, pipe, params = pipeline_pairs("depth2img", "a")
    rng = np.random.RandomState(2)
    latents = rng.randn(1, 8, 8, 4).astype(np.float32)
    depth = (rng.rand(1, 12, 12) * 5).astype(np.float32)
    inputs, config = pipe.prepare("a cat", params=params, key=jax.random.key(0), image_latents=latents,
                                  depth_map=depth, strength=0.7, num_inference_steps=3, guidance_scale=2.0)
    weights = jnp.asarray(rng.randn(1, 16, 16, 3).astype(np.float32))
    key = jax.random.key(1)

    def loss(noise, prompt_embeds, depth_map):
        out = pipe.sample(params, inputs.replace(noise=noise, prompt_embeds=prompt_embeds, depth_map=depth_map),
                          key, config=config)
        return jnp.sum(out * weights)

    args = (inputs.noise, inputs.prompt_embeds, inputs.depth_map)
    errors = _directional_check(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), args)
    print("relative errors (noise, prompt embeds, depth map):", errors)
    assert max(errors) <= 1e-2, errors


def test_txt2img_gradient_through_prior_and_decoder(pipeline_pairs):
    """d loss / d prior latents through the prior loop (DDPM), the noise augmentation and the decoder."""
    _, pipe, params = pipeline_pairs("unclip", "a")
    inputs, config = pipe.prepare("a cat", params=params, key=jax.random.key(0), height=16, width=16,
                                  num_inference_steps=STEPS, prior_num_inference_steps=STEPS, noise_level=10,
                                  guidance_scale=2.0, prior_guidance_scale=2.0)
    weights = jnp.asarray(np.random.RandomState(4).randn(1, 16, 16, 3).astype(np.float32))
    key = jax.random.key(2)

    def loss(prior_latents):
        return jnp.sum(pipe.sample(params, inputs.replace(prior_latents=prior_latents), key, config=config) * weights)

    errors = _directional_check(jax.jit(jax.value_and_grad(loss, argnums=(0,))), (inputs.prior_latents,))
    print("relative error (prior latents):", errors)
    assert max(errors) <= 1e-2, errors


def test_remat_bounds_gradient_memory(img2img):
    """XLA's memory analysis of the compiled gradient: 20 steps need at most twice the temporaries of 2
    (without remat every step's activations would be kept, about 10x)."""
    pipe, params = img2img
    embeds = np.random.RandomState(6).randn(1, 32).astype(np.float32)
    temp = {}
    for steps in (2, 20):
        inputs, config = pipe.prepare(image_embeds=embeds, prompt="a cat", params=params, key=jax.random.key(0),
                                      height=16, width=16, num_inference_steps=steps, guidance_scale=3.0)

        def loss(image_embeds, inputs=inputs, config=config):
            out = pipe.sample(params, inputs.replace(image_embeds=image_embeds), jax.random.key(0), config=config)
            return jnp.mean(out**2)

        compiled = jax.jit(jax.grad(loss)).lower(inputs.image_embeds).compile()
        temp[steps] = compiled.memory_analysis().temp_size_in_bytes
    print("gradient temporaries (bytes) by step count:", temp)
    assert temp[20] <= 2 * temp[2], temp
