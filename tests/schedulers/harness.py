"""The one harness of the scheduler tests: both sides (ours and diffusers) run the same sampling loop, each
on its own trajectory, driven by a synthetic model output (a fixed function of the scaled input and t);
stochastic steps get the same noise on both sides. Two comparisons: `run_trajectory` (every step's
prev_sample and predicted x_0 within TOL of the step's own scale: the integer-timestep and sigma
schedulers) and `run_solver_trajectory` (within TOL of the largest sample seen so far: the DPM-Solver
family, whose steps pass through large intermediate samples); `check_compiled_loop` runs a whole
trajectory as one jitted `lax.fori_loop`.
"""

from __future__ import annotations

import copy
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_ref import assert_close

TOL = 1e-5  # fp32, relative to the sample's scale (that of the step's input or output, whichever is larger)

# diffusers' k-diffusion schedulers warn (numpy 2 deprecations of torch tensors in numpy calls) at every sigma
# lookup: tens of thousands of records per file that pytest would otherwise collect and count.
QUIET_REFERENCE = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
                   pytest.mark.filterwarnings("ignore::DeprecationWarning:numpy")]
# Samples are channels-last on our side; diffusers gets the same values as NCHW.
SHAPE_4D = (2, 4, 3, 5)  # [B, H, W, C]
SHAPE_2D = (3, 8)  # [B, D], the prior's embedding


def to_ref(x: np.ndarray) -> torch.Tensor:
    x = np.array(x, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1) if x.ndim == 4 else x))


def from_ref(t: torch.Tensor) -> np.ndarray:
    x = t.detach().float().numpy()
    return np.moveaxis(x, 1, -1) if x.ndim == 4 else x


@functools.lru_cache(maxsize=None)
def _built_reference(ref_cls, config_items):
    return ref_cls(**dict(config_items))


def reference(ref_cls, **config):
    """A fresh diffusers scheduler of this config. Each config is built once per session and handed out as
    deep copies (no state is shared between tests): KDPM2's constructors alone take ~2 s (they run
    set_timesteps(1000) with a per-sigma search)."""
    return copy.deepcopy(_built_reference(ref_cls, tuple(sorted(config.items()))))


def fake_model(x_in: np.ndarray, t: float, learned: str | None = None) -> np.ndarray:
    """A deterministic stand-in for the denoiser: 0.3 x + 0.1 sin(t / 100). `learned` appends a second half
    of channels for a learned variance: "range" in [-1, 1] (the `learned_range` interpolation), "positive" a
    variance, "solver" tanh(x / 2) (what the DPM-Solver family's tests use)."""
    x_in = np.asarray(x_in, np.float32)
    out = (np.float32(0.3) * x_in + np.float32(0.1 * np.sin(float(t) / 100.0))).astype(np.float32)
    if learned == "solver":
        return np.concatenate([out, np.tanh(0.5 * x_in).astype(np.float32)], axis=-1)
    if learned:
        var = np.tanh(0.5 * x_in + np.cos(t / 50.0)).astype(np.float32)
        if learned == "positive":
            var = (0.02 * (1 + var)).astype(np.float32)
        out = np.concatenate([out, var], axis=-1)
    return out


def assert_step_close(actual, expected, sample_in, tol, what) -> None:
    """assert_close relative to the larger of the step's input and output scales: a step from sigma ~ 100
    to ~ 1 cancels most of its input, so float32 leaves errors of a few ulp of the input there."""
    out_scale = max(float(np.abs(np.asarray(expected)).max()), 1e-6)
    in_scale = float(np.abs(np.asarray(sample_in, np.float64)).max())
    assert_close(actual, expected, tol * max(in_scale, out_scale) / out_scale, what)


def check_schedule(state, ref) -> None:
    """The inference tables must agree before any step is compared."""
    ts = ref.timesteps.numpy().astype(np.float64)
    # Timesteps only feed the model (and exact-match lookups of our own table): an ulp of a sigma near the
    # table's end moves a derived timestep by ~1e-5.
    np.testing.assert_allclose(np.asarray(state.timesteps, np.float64), ts, rtol=1e-6, atol=1e-4, err_msg="timesteps")
    if hasattr(state, "sigmas") and hasattr(ref, "sigmas"):
        np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=2e-6, atol=1e-7,
                                   err_msg="sigmas")
    np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)


def run_trajectory(ours, ref, n, *, shape=SHAPE_2D, seed=0, stochastic=False, learned=None, begin=None,
                   step_kwargs=None, ref_kwargs=None, per_step=None, tol=TOL, monkeypatch=None,
                   bf16_outputs=False, teacher_forcing=False):
    """Runs both samplers for n inference steps and compares every step.

    `per_step(i, ref_ts, state)` returns (our kwargs, diffusers kwargs) for step i; `begin` starts at that
    schedule index from noised x_0 (img2img strength). With `teacher_forcing` each of our steps starts from
    diffusers' previous sample (for ill-conditioned schedules whose first step already loses float32
    digits, so that independent trajectories would compare rounding noise rather than the method).
    Returns (our final sample, diffusers' final sample).
    """
    state = ours.set_timesteps(ours.create_state(), n, shape=shape)
    ref.set_timesteps(n)
    check_schedule(state, ref)
    rng = np.random.default_rng(seed)
    current = {}
    if monkeypatch is not None:
        module = sys.modules[type(ref).__module__]
        monkeypatch.setattr(module, "randn_tensor", lambda shape_, **kw: to_ref(current["z"]))

    start = 0
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(float(ref.init_noise_sigma))
    if begin is not None:
        start = begin
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(start)
        state = ours.set_begin_index(state, start)
        x0 = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal(shape).astype(np.float32)
        t0 = ref.timesteps[start : start + 1].repeat(shape[0])
        x_ref0 = ref.add_noise(to_ref(x0), to_ref(noise), t0)
        t0_j = jnp.asarray(state.timesteps[start]).repeat(shape[0])
        x = ours.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), t0_j)
        assert_close(x, from_ref(x_ref0), tol, "add_noise")
        x = np.asarray(x)
    x_ref, x_j = to_ref(x), jnp.asarray(x)
    ref_ts = ref.timesteps
    for i in range(start, len(ref_ts)):
        t_ref, t_j = ref_ts[i], state.timesteps[i]
        xin_ref = ref.scale_model_input(x_ref, t_ref)
        xin_j = ours.scale_model_input(state, x_j, t_j)
        assert_close(xin_j, from_ref(xin_ref), tol, f"scale_model_input {i}")
        out_ref = fake_model(from_ref(xin_ref), float(t_ref), learned)
        out_j = fake_model(np.asarray(xin_j), float(t_j), learned)
        if bf16_outputs:
            out_j = jnp.asarray(out_j, jnp.bfloat16)
        z = rng.standard_normal(shape).astype(np.float32)
        current["z"] = z
        kw, rkw = dict(step_kwargs or {}), dict(ref_kwargs or {})
        if per_step is not None:
            extra, rextra = per_step(i, ref_ts, state, z)
            kw.update(extra)
            rkw.update(rextra)
        res_ref = ref.step(to_ref(out_ref), t_ref, x_ref, **rkw)
        res = ours.step(state, jnp.asarray(out_j), t_j, x_j, noise=jnp.asarray(z) if stochastic else None, **kw)
        assert res.prev_sample.dtype == x_j.dtype
        if not bf16_outputs:
            assert_step_close(res.prev_sample, from_ref(res_ref.prev_sample), x_j, tol,
                              f"prev_sample step {i} (t={float(t_ref)})")
            x0_ref = getattr(res_ref, "pred_original_sample", None)
            if x0_ref is not None and res.pred_original_sample is not None:
                assert_step_close(res.pred_original_sample, from_ref(x0_ref), x_j, tol,
                                  f"pred_original_sample step {i}")
        x_ref, x_j, state = res_ref.prev_sample, res.prev_sample, res.state
        if teacher_forcing:
            x_j = jnp.asarray(from_ref(x_ref))
    return np.asarray(x_j), from_ref(x_ref)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class StepNoise:
    """The noise of the current step, handed to diffusers by a patched `randn_tensor`."""

    def __init__(self):
        self.z = None

    def __call__(self, shape, **kwargs):
        return to_ref(self.z).to(kwargs.get("dtype") or torch.float32)


def check_close(actual, expected, scale, what, tol=TOL) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= tol, f"{what}: max error {err:.3g} x scale {scale:.3g} > {tol:g}"
    return err


def run_solver_trajectory(ours, ref, n, *, seed=0, stochastic=False, learned=False, begin=None, find_start=False,
                   shape=SHAPE_4D, noise_hook=None, size_history=True, tol=TOL) -> float:
    """Runs both samplers for n inference steps, compares every step and returns the largest error.

    `begin`: start at that schedule index from a noised x_0 (img2img strength) through `set_begin_index`,
    or, with `find_start`, by handing the scheduler the start timestep alone (diffusers then looks it
    up). `noise_hook(z)` receives each step's noise before diffusers steps (for patched samplers);
    `stochastic` also passes it to ours as `noise`.
    """
    state = ours.set_timesteps(ours.create_state(), n, shape=shape if size_history else None)
    ref.set_timesteps(n)
    np.testing.assert_allclose(np.asarray(state.timesteps, np.float64), ref.timesteps.numpy().astype(np.float64),
                               rtol=1e-6, atol=1e-4, err_msg="timesteps")
    np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-5, err_msg="sigmas")
    np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(float(ref.init_noise_sigma))
    start = 0
    if begin is not None:
        start = begin
        if not find_start:
            ref.set_begin_index(start)
            state = ours.set_begin_index(state, start)
        x0 = rng.standard_normal(shape).astype(np.float32)
        eps = rng.standard_normal(shape).astype(np.float32)
        x_ref0 = ref.add_noise(to_ref(x0), to_ref(eps), ref.timesteps[start:start + 1].repeat(shape[0]))
        x = np.asarray(ours.add_noise(state, jnp.asarray(x0), jnp.asarray(eps),
                                      jnp.repeat(state.timesteps[start], shape[0])))
        check_close(x, from_ref(x_ref0), np.abs(x).max(), "add_noise", tol)
    x_ref, x_j = to_ref(x), jnp.asarray(x)
    scale, worst = float(np.abs(x).max()), 0.0
    for i in range(start, len(ref.timesteps)):
        t_ref, t_j = ref.timesteps[i], state.timesteps[i]
        xin_ref = ref.scale_model_input(x_ref, t_ref)
        xin_j = ours.scale_model_input(state, x_j, t_j)
        check_close(xin_j, from_ref(xin_ref), scale, f"scale_model_input {i}", tol)
        out_ref = fake_model(from_ref(xin_ref), float(t_ref), "solver" if learned else None)
        out_j = fake_model(xin_j, float(t_j), "solver" if learned else None)
        z = rng.standard_normal(shape).astype(np.float32)
        kw = {}
        if noise_hook is not None:
            kw = noise_hook(z) or {}
        res_ref = ref.step(to_ref(out_ref), t_ref, x_ref, **kw)
        res = ours.step(state, jnp.asarray(out_j), t_j, x_j, noise=jnp.asarray(z) if stochastic else None)
        assert res.prev_sample.dtype == x_j.dtype
        x_ref, x_j, state = res_ref.prev_sample, res.prev_sample, res.state
        scale = max(scale, float(x_ref.abs().max()))
        worst = max(worst, check_close(x_j, from_ref(x_ref), scale, f"prev_sample step {i} (t={float(t_ref)})", tol))
        x0_ref = getattr(res_ref, "pred_original_sample", None)
        if x0_ref is not None:
            check_close(res.pred_original_sample, from_ref(x0_ref), max(scale, float(x0_ref.abs().max())),
                        f"pred_original_sample step {i}", tol)
    assert int(state.step_index) == len(ref.timesteps)
    return worst


def variance_noise_hook(z):
    return dict(variance_noise=to_ref(z))


def _sample_loop(scheduler, state, x, noises, out_dtype, traces):
    def body(i, carry):
        x, state = carry
        traces.append(i)  # runs at trace time only
        t = state.timesteps[i]
        x_in = scheduler.scale_model_input(state, x, t)
        eps = (0.3 * x_in + 0.1 * jnp.sin(t.astype(jnp.float32) / 100.0)).astype(out_dtype)
        out = scheduler.step(state, eps, t, x, noise=None if noises is None else noises[i])
        return out.prev_sample, out.state

    return jax.lax.fori_loop(0, state.timesteps.shape[0], body, (x, state))[0]


def check_compiled_loop(scheduler, ref, n=10, stochastic=False, noise_hook=None, tol=TOL):
    """The whole trajectory as one jitted `lax.fori_loop`: traced once (not per step, not again for new
    inputs), equal to diffusers' step-by-step trajectory, and finite and close to the fp32 run with bf16
    model outputs. Stochastic steps read their noise from an [N, ...] input."""
    state = scheduler.set_timesteps(scheduler.create_state(), n, shape=SHAPE_4D)
    ref.set_timesteps(n)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE_4D).astype(np.float32) * np.float32(float(ref.init_noise_sigma))
    noises = rng.standard_normal((len(ref.timesteps),) + SHAPE_4D).astype(np.float32)
    traces = []
    loop = jax.jit(lambda st, x, z, dtype: _sample_loop(scheduler, st, x, z if stochastic else None, dtype, traces),
                   static_argnums=3)
    compiled = loop(state, jnp.asarray(x), jnp.asarray(noises), jnp.float32)
    loop(state, jnp.asarray(x) + 0.5, jnp.asarray(noises), jnp.float32).block_until_ready()
    assert len(traces) == 1, f"the step was traced {len(traces)} times"

    x_ref, scale = to_ref(x), float(np.abs(x).max())
    for i, t in enumerate(ref.timesteps):
        x_in = from_ref(ref.scale_model_input(x_ref, t))
        eps = (np.float32(0.3) * x_in + np.float32(0.1) * np.sin(np.float32(t) / np.float32(100))).astype(np.float32)
        kw = (noise_hook(noises[i]) or {}) if noise_hook is not None else {}
        x_ref = ref.step(to_ref(eps), t, x_ref, **kw).prev_sample
        scale = max(scale, float(x_ref.abs().max()))
    err = check_close(compiled, from_ref(x_ref), scale, "compiled loop vs diffusers", tol)

    low = loop(state, jnp.asarray(x), jnp.asarray(noises), jnp.bfloat16)
    assert low.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(low)))
    bf16_err = float(jnp.abs(low - compiled).max()) / scale
    assert bf16_err <= BF16_TOL, f"bf16 model outputs: {bf16_err:.3g} of the sample scale > {BF16_TOL}"
    return err, bf16_err


BF16_TOL = 2e-2  # bf16 keeps 8 mantissa bits (4e-3); the solver carries that error through the steps
