"""The pipelines' shared pieces: model-free argument checks, the loop driver, the guidance batch, typed inputs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.pipelines import checks, common
from unclip_jax.schedulers import SCHEDULERS


@pytest.mark.parametrize("call, error, message", [
    (lambda: checks.check_count(0, "num_inference_steps"), ValueError, "num_inference_steps must be at least 1; got 0"),
    (lambda: checks.check_count(2.0, "--steps"), TypeError, "--steps must be an integer; got float"),
    (lambda: checks.check_count(True, "n"), TypeError, "n must be an integer"),
    (lambda: checks.check_finite_real(math.nan, "guidance_scale"), ValueError, "guidance_scale must be a finite number"),
    (lambda: checks.check_finite_real(-math.inf, "g"), ValueError, "g must be a finite number; got -inf"),
    (lambda: checks.check_finite_real("7", "guidance_scale"), TypeError, "guidance_scale must be a number; got str"),
    (lambda: checks.check_side(36, "height"), ValueError, "height must be a positive multiple of 8; got 36"),
    (lambda: checks.check_side(0, "--size"), ValueError, "--size must be a positive multiple of 8; got 0"),
    (lambda: checks.check_side(-8, "width"), ValueError, "width must be a positive multiple of 8"),
    (lambda: checks.check_size(32, 30, 2 * 8), ValueError, "height must be a positive multiple of 16; got 32|width"),
    (lambda: checks.check_strength(0), ValueError, r"strength must be in \(0, 1\]; got 0"),
    (lambda: checks.check_strength(1.01), ValueError, r"strength must be in \(0, 1\]"),
    (lambda: checks.check_strength(math.nan), ValueError, "strength must be a finite number"),
    (lambda: checks.check_eta(-0.5), ValueError, "eta must be >= 0; got -0.5"),
    (lambda: checks.check_noise_level(1000, 1000), ValueError, r"noise_level must be in \[0, 999\]; got 1000"),
    (lambda: checks.check_noise_level(-1, None, "--noise-level"), ValueError, "--noise-level must be >= 0; got -1"),
    (lambda: checks.check_noise_level(1.5, 1000), TypeError, "noise_level must be an integer"),
    (lambda: checks.check_pixels(3000, 4000), ValueError, "image is 4000x3000 = 12,000,000 pixels, past the budget"),
    (lambda: checks.check_max_pixels(0), ValueError, "max_pixels must be at least 1"),
])
def test_checks_refuse(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_checks_accept():
    checks.check_count(np.int64(3), "n")
    checks.check_finite_real(np.float32(7.5), "guidance_scale")
    checks.check_size(768, 512)
    checks.check_side(36, "height", factor=2)
    checks.check_strength(1.0)
    checks.check_eta(0.0)
    checks.check_noise_level(0, 1000)
    checks.check_noise_level(999, 1000)
    checks.check_pixels(1024, 1024)
    checks.check_pixels(4000, 3000, max_pixels=None)
    checks.check_max_pixels(None)


# ---------------------------------------------------------------- the loop driver


def _toy_model(x, t, cond=None):
    return 0.3 * x + t / 1000.0 + (0.0 if cond is None else cond["shift"])


@pytest.fixture(scope="module")
def ddim():
    s = SCHEDULERS["DDIMScheduler"].from_config({"num_train_timesteps": 1000, "clip_sample": False})
    return s, s.set_timesteps(s.create_state(), 4, shape=(2, 3))


def test_sampling_loop_is_the_python_loop(ddim):
    """The compiled loop equals stepping the scheduler by hand (eta > 0: per-step noise given), from a
    start index, with conditioning carried; a hook sees every step and may change x and cond."""
    s, state = ddim
    x0 = jnp.asarray(np.random.RandomState(0).randn(2, 3), jnp.float32)
    noise = jnp.asarray(np.random.RandomState(1).randn(3, 2, 3), jnp.float32)
    key = jax.random.key(0)
    cond = {"shift": jnp.float32(0.5)}
    seen = []

    def bump(i, t, x, c):  # a traced hook: halves the shift after the first step
        return x, {"shift": jnp.where(i == 0, c["shift"] / 2, c["shift"])}

    hook = common.chain_hooks(common.report_hook(lambda i, t, x: seen.append((i, t, x.shape))), bump)
    run = jax.jit(lambda x, n: common.sampling_loop(_toy_model, s, state, x, key=key, step_noise=n,
                                                    step_options={"eta": 0.5}, start=1, cond=cond, on_step_end=hook))
    got = run(x0, noise)

    @jax.jit  # the same steps unrolled by Python (jitted only to compile once rather than per op)
    def by_hand(x, noise):
        st, shift = state, 0.5
        for k, i in enumerate(range(1, 4)):
            t = st.timesteps[i]
            res = s.step(st, _toy_model(s.scale_model_input(st, x, t), t, {"shift": shift}), t, x,
                         key=jax.random.fold_in(key, i), noise=noise[k], eta=0.5)
            x, st, shift = res.prev_sample, res.state, shift / 2 if k == 0 else shift
        return x

    np.testing.assert_allclose(np.asarray(got), np.asarray(by_hand(x0, noise)), rtol=1e-6, atol=1e-6)
    assert [(i, int(t)) for i, t, _ in seen] == [(k, int(state.timesteps[k + 1])) for k in range(3)]


def test_sampling_loop_arguments(ddim):
    s, state = ddim
    x = jnp.zeros((2, 3))
    with pytest.raises(TypeError):
        common.sampling_loop(_toy_model, s, state, x, jax.random.key(0))  # keyword-only past the sample
    with pytest.raises(ValueError, match="cannot run in a differentiated"):
        common.sampling_loop(_toy_model, s, state, x, key=jax.random.key(0), remat=True,
                             on_step_end=common.report_hook(print))
    assert common.chain_hooks(None, None) is None
    every = []
    jax.block_until_ready(common.sampling_loop(_toy_model, s, state, x, key=jax.random.key(0),
                                               on_step_end=common.report_hook(lambda i, t, x: every.append(i), 2, 2)))
    assert every == [0, 1]  # steps 0 and 2, reported divided by the scheduler order 2


def test_guidance_batch_and_guided_model():
    """Interleaved rows [u0, c0, u1, c1]; guidance equals the concatenated form diffusers computes."""
    rng = np.random.RandomState(2)
    u, c = (jnp.asarray(rng.randn(3, 4), jnp.float32) for _ in range(2))
    batch = common.cfg_batch(u, c)
    np.testing.assert_array_equal(np.asarray(batch[1::2]), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(common.cfg_halves(batch)), np.concatenate([u, c]))
    np.testing.assert_array_equal(np.asarray(common.cfg_pairs(common.cfg_halves(batch))), np.asarray(batch))
    tree = common.guidance_batch({"a": u, "b": 2 * u}, {"a": c, "b": 2 * c}, True)
    np.testing.assert_array_equal(np.asarray(tree["b"]), 2 * np.asarray(batch))
    assert common.guidance_batch(None, c, False) is c

    def apply(x, t, cond):
        return jnp.tanh(x * cond + t)

    x = jnp.asarray(rng.randn(3, 4), jnp.float32)
    got = jax.jit(common.guided_model(apply, 7.5, True))(x, 0.1, batch)
    uncond, cond = np.tanh(np.asarray(x * u + 0.1)), np.tanh(np.asarray(x * c + 0.1))
    np.testing.assert_allclose(np.asarray(got), uncond + 7.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(common.guided_model(apply, 7.5, False)(x, 0.1, c)),
                                  np.asarray(apply(x, 0.1, c)))


# ---------------------------------------------------------------- typed inputs, keys, param trees


def test_typed_inputs_are_pytrees():
    from unclip_jax.pipelines.depth2img import Depth2ImgInputs
    from unclip_jax.pipelines.stable_unclip import UnCLIPInputs

    z = jnp.zeros
    u = UnCLIPInputs(latents=z((2, 4, 4, 4)), prompt_embeds=z((2, 7, 8)), negative_prompt_embeds=None,
                     image_embeds=z((2, 5)), image_embeds_noise=z((2, 5)), noise_level=jnp.int32(3),
                     guidance_scale=jnp.float32(2.0))
    leaves, tree = jax.tree.flatten(u)
    assert len(leaves) == 6 and jax.tree.unflatten(tree, leaves) == u
    doubled = jax.jit(lambda i: jax.tree.map(lambda a: a + 1, i))(u)
    assert isinstance(doubled, UnCLIPInputs) and float(doubled.image_embeds[0, 0]) == 1.0
    assert u.replace(latents=z((3, 4, 4, 4))).batch_size == 3 and u.batch_size == 2
    assert UnCLIPInputs.from_dict(u.as_dict()) == u
    assert set(u.prior_part().as_dict()) == set(u.as_dict()) and u.prior_part().latents is None
    assert u.decoder_part().latents is u.latents
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.latents = None
    d = Depth2ImgInputs(prompt_embeds=z((2, 7, 8)), negative_prompt_embeds=z((2, 7, 8)), image_latents=z((1, 4, 4, 4)),
                        image_rows=jnp.zeros(2, jnp.int32), depth_map=z((1, 8, 8)), depth_rows=jnp.zeros(2, jnp.int32),
                        noise=z((2, 4, 4, 4)), guidance_scale=jnp.float32(7.5))
    assert jax.tree.unflatten(*reversed(jax.tree.flatten(d))) == d and d.batch_size == 2
    assert set(d.BATCH_AXIS) <= set(d.as_dict()) and set(u.BATCH_AXIS) <= set(u.as_dict())


def test_check_key():
    common.check_key(jax.random.key(0))
    for bad, message in ((0, "key must be a jax.random.key; got int"), ("0", "got str"),
                         (jax.random.PRNGKey(0), "old-style uint32 key"),
                         (jax.random.split(jax.random.key(0)), "a single key")):
        with pytest.raises(TypeError, match=message):
            common.check_key(bad)


def test_non_finite_checks_and_warnings():
    with pytest.raises(ValueError, match="`latents` has non-finite values"):
        common.check_random_input(np.array([[0.0, np.inf]]), (1, 2), "latents")
    jax.jit(lambda x: common.check_random_input(x, (1, 2), "latents"))(jnp.zeros((1, 2)))  # traced: passes
    with pytest.warns(RuntimeWarning, match=r"the prior produced non-finite values \(NaN or Inf\) in 1 of 2"):
        common.warn_if_nonfinite(jnp.array([[0.0], [jnp.nan]]), "prior")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        common.warn_if_nonfinite(jnp.array([[jnp.nan]]), "VAE decoder", given=jnp.array([[jnp.nan]]))
        common.warn_if_nonfinite(jnp.zeros((2, 3)), "VAE decoder")
