"""Every scheduler of part A inside one jit-compiled `lax.fori_loop`: traced once (no retrace per step or
per call), random draws from `fold_in(key, i)`, final sample equal to diffusers' loop given the same draws;
and bf16 model outputs with the fp32 state staying finite and close to the fp32 run."""

from __future__ import annotations

import collections
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import (
    QUIET_REFERENCE, SHAPE_4D, TOL, assert_step_close, fake_model, from_ref, reference, to_ref,
)
from torch_ref import assert_close

from unclip_jax.schedulers.ddim import DDIMScheduler
from unclip_jax.schedulers.ddpm import DDPMScheduler
from unclip_jax.schedulers.edm_euler import EDMEulerScheduler
from unclip_jax.schedulers.euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from unclip_jax.schedulers.euler_discrete import EulerDiscreteScheduler
from unclip_jax.schedulers.heun_discrete import HeunDiscreteScheduler
from unclip_jax.schedulers.k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteScheduler
from unclip_jax.schedulers.k_dpm_2_discrete import KDPM2DiscreteScheduler
from unclip_jax.schedulers.lms_discrete import LMSDiscreteScheduler
from unclip_jax.schedulers.pndm import PNDMScheduler
from unclip_jax.schedulers.unclip import UnCLIPScheduler

pytestmark = QUIET_REFERENCE
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
N = 11
BF16_TOL = 1e-2  # bf16 model outputs (8-bit mantissa) vs fp32, relative to the final scale (measured <= 1.4e-3)

# name: (ours, diffusers, config, step options for both sides)
CASES = {
    "ddim_eta": (DDIMScheduler, diffusers.DDIMScheduler, dict(SD, clip_sample=False, steps_offset=1), dict(eta=0.7)),
    "ddpm": (DDPMScheduler, diffusers.DDPMScheduler, dict(variance_type="fixed_small_log"), {}),
    "pndm_prk": (PNDMScheduler, diffusers.PNDMScheduler, {}, {}),
    "pndm_plms": (PNDMScheduler, diffusers.PNDMScheduler, dict(SD, skip_prk_steps=True, steps_offset=1), {}),
    "unclip": (UnCLIPScheduler, diffusers.UnCLIPScheduler, dict(clip_sample_range=5.0), {}),
    "lms": (LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler, dict(SD, use_karras_sigmas=True), {}),
    "euler": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, dict(SD, prediction_type="v_prediction"), {}),
    "euler_a": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler, SD, {}),
    "heun": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, dict(use_karras_sigmas=True), {}),
    "kdpm2": (KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler, {}, {}),
    "kdpm2_a": (KDPM2AncestralDiscreteScheduler, diffusers.KDPM2AncestralDiscreteScheduler, {}, {}),
    "edm_euler": (EDMEulerScheduler, diffusers.EDMEulerScheduler, {}, {}),
}

TRACES: collections.Counter = collections.Counter()


def _loop(sched, options, name, state, x, key, out_dtype):
    def body(i, carry):
        TRACES[name] += 1  # runs only while tracing
        x, state = carry
        t = state.timesteps[i]
        x_in = sched.scale_model_input(state, x, t)
        out = (0.3 * x_in.astype(jnp.float32) + 0.1 * jnp.sin(t.astype(jnp.float32) / 100)).astype(out_dtype)
        kw = dict(options)
        if isinstance(sched, UnCLIPScheduler):
            kw["prev_timestep"] = sched.previous_timestep(state, i)
        res = sched.step(state, out, t, x, key=jax.random.fold_in(key, i), **kw)
        return res.prev_sample, res.state

    return jax.lax.fori_loop(0, state.timesteps.shape[0], body, (x, state))


sample_loop = jax.jit(_loop, static_argnums=(0, 1, 2, 6))
# The draw of step i, as the loop makes it (compiled once, not per step).
draw = jax.jit(lambda key, i: jax.random.normal(jax.random.fold_in(key, i), SHAPE_4D, jnp.float32))


def make_key(seed: int) -> jax.Array:
    """Schedulers take any typed key; the rbg implementation compiles in a fraction of threefry's time on
    CPU, which dominates these tests otherwise."""
    return jax.random.key(seed, impl="rbg")


def diffusers_loop(ref, x, draws, options, monkeypatch):
    module = sys.modules[type(ref).__module__]
    current = {}
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: to_ref(current["z"]), raising=False)
    x = to_ref(x)
    ts = ref.timesteps
    for i, t in enumerate(ts):
        x_in = ref.scale_model_input(x, t)
        out = to_ref(fake_model(from_ref(x_in), float(t)))
        current["z"] = draws[i]
        kw = dict(options)
        if isinstance(ref, diffusers.DDIMScheduler):
            kw["variance_noise"] = to_ref(draws[i])
        if isinstance(ref, diffusers.UnCLIPScheduler):
            kw["prev_timestep"] = None if i + 1 == len(ts) else ts[i + 1]
        x = ref.step(out, t, x, **kw).prev_sample
    return from_ref(x)


def _setup(name):
    ours_cls, ref_cls, cfg, options = CASES[name]
    ours, ref = ours_cls.from_config(cfg), reference(ref_cls, **cfg)
    state = ours.set_timesteps(ours.create_state(), N, shape=SHAPE_4D)
    ref.set_timesteps(N)
    x = (np.random.default_rng(7).standard_normal(SHAPE_4D) * float(ref.init_noise_sigma)).astype(np.float32)
    return ours, ref, state, x, options


@pytest.mark.parametrize("name", list(CASES))
def test_fori_loop_matches_diffusers_without_retrace(name, monkeypatch):
    ours, ref, state, x, options = _setup(name)
    key = make_key(11)
    final, _ = sample_loop(ours, tuple(options.items()), name, state, jnp.asarray(x), key, jnp.float32)
    assert TRACES[name] == 1, f"traced {TRACES[name]} times"
    # The draws the loop made, replayed into diffusers.
    draws = [np.asarray(draw(key, i)) for i in range(len(ref.timesteps))]
    expected = diffusers_loop(ref, x, draws, options, monkeypatch)
    assert_step_close(final, expected, x, TOL, f"{name}: final sample of the compiled loop")
    # Another key and another start: same program, no retrace.
    again, _ = sample_loop(ours, tuple(options.items()), name, state, jnp.asarray(x) * 0.5, make_key(12),
                           jnp.float32)
    assert TRACES[name] == 1 and bool(jnp.all(jnp.isfinite(again)))


@pytest.mark.parametrize("name", ["ddim_eta", "pndm_plms", "lms", "euler_a", "heun", "kdpm2_a"])
def test_bf16_model_outputs(name):
    ours, _, state, x, options = _setup(name)
    key = make_key(3)
    opts = tuple(options.items())
    fp32, _ = sample_loop(ours, opts, name, state, jnp.asarray(x), key, jnp.float32)
    bf16, st = sample_loop(ours, opts, name, state, jnp.asarray(x), key, jnp.bfloat16)
    assert bf16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(bf16)))
    assert all(leaf.dtype != jnp.bfloat16 for leaf in jax.tree.leaves(st)), "the state must stay fp32"
    assert_close(bf16, fp32, BF16_TOL, f"{name}: bf16 outputs vs fp32")


@pytest.mark.parametrize("name", sorted(__import__("unclip_jax.schedulers", fromlist=["SCHEDULERS"]).SCHEDULERS))
def test_invalid_step_counts_and_options_are_refused(name):
    from unclip_jax.schedulers import SCHEDULERS, SchedulerConfigError

    sched = SCHEDULERS[name].from_config({})
    state = sched.create_state()
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer; got 0"):
        sched.set_timesteps(state, 0, shape=(1, 4))
    if hasattr(sched.config, "num_train_timesteps"):
        with pytest.raises(ValueError, match="num_inference_steps 1001 is above num_train_timesteps 1000"):
            sched.set_timesteps(state, 1001, shape=(1, 4))
    if hasattr(sched.config, "beta_schedule"):
        with pytest.raises(SchedulerConfigError, match="'nope'"):
            bad = SCHEDULERS[name].from_config({"beta_schedule": "nope"})
            bad.set_timesteps(bad.create_state(), 5, shape=(1, 4))
