"""Trajectory parity of the DPM-Solver family (DPM-Solver multistep here; singlestep, DEIS, UniPC and the
SDE solver in the other `test_schedulers_b_*` files, which share this harness) with diffusers.

Both sides run the same sampling loop, each on its own trajectory, driven by a synthetic model output (a
fixed function of the scaled input and t). Every step's prev_sample must match diffusers within TOL
relative to the largest sample magnitude seen so far: a few solver steps pass through large intermediate
samples (x_0 predicted from sigma ~ 150), and the float32 error they carry is relative to that scale.
Stochastic steps receive the same noise on both sides. The last part checks the compiled loop (one
trace, no retrace per step), bf16 model outputs, and the scheduler plumbing.
"""

from __future__ import annotations

import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unclip_jax.schedulers import common
from unclip_jax.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler

TOL = 1e-5  # fp32, relative to the sample scale, every step
SHAPE = (2, 4, 3, 5)  # [B, H, W, C] on our side; diffusers gets the same values as NCHW


def to_ref(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float32), -1, 1)))


def from_ref(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().float().numpy(), 1, -1)


def fake_model(x_in, t, learned: bool = False) -> np.ndarray:
    """The denoiser stand-in: 0.3 x + 0.1 sin(t / 100); `learned` appends variance channels."""
    x_in = np.asarray(x_in, np.float32)
    out = (np.float32(0.3) * x_in + np.float32(0.1 * np.sin(float(t) / 100.0))).astype(np.float32)
    if learned:
        out = np.concatenate([out, np.tanh(0.5 * x_in).astype(np.float32)], axis=-1)
    return out


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


def run_trajectory(ours, ref, n, *, seed=0, stochastic=False, learned=False, begin=None, find_start=False,
                   shape=SHAPE, noise_hook=None, size_history=True, tol=TOL) -> float:
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
        out_ref = fake_model(from_ref(xin_ref), float(t_ref), learned)
        out_j = fake_model(xin_j, float(t_j), learned)
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


# ----------------------------------------------------------------------------------- DPM-Solver multistep

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# (config, step count): every option value at least once, and the ones that interact (order x solver type
# x algorithm, karras x final sigma, thresholding x prediction type, lambda clipping x cosine).
DPM_CASES = {
    "default": ({}, 10),
    "order3_sd": (dict(solver_order=3, **SD), 11),
    "order3_heun_no_lof": (dict(solver_order=3, solver_type="heun", lower_order_final=False), 10),
    "order1_leading": (dict(solver_order=1, timestep_spacing="leading", steps_offset=1), 7),
    "heun_trailing_v": (dict(solver_type="heun", timestep_spacing="trailing", prediction_type="v_prediction"), 13),
    "eps_algo_order3": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3), 12),
    "eps_algo_heun_sample": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun",
                                  prediction_type="sample"), 10),
    "eps_algo_thresh": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True,
                             sample_max_value=1.5, dynamic_thresholding_ratio=0.9), 10),
    "karras_order3": (dict(use_karras_sigmas=True, solver_order=3, **SD), 10),
    "karras_sigma_min_euler": (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", euler_at_final=True), 10),
    "exponential": (dict(use_exponential_sigmas=True, lower_order_final=False), 10),
    "beta_sigmas_sd": (dict(use_beta_sigmas=True, **SD), 10),
    "lu_lambdas": (dict(use_lu_lambdas=True, solver_order=3), 10),
    "v_thresh_cos_clipped": (dict(prediction_type="v_prediction", thresholding=True, sample_max_value=1.5,
                                  beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 10),
    "sample_zero_snr_trailing": (dict(prediction_type="sample", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing"), 10),
    "many_steps_order3": (dict(solver_order=3), 20),
}


@pytest.mark.parametrize("case", list(DPM_CASES))
def test_dpm_multistep(case):
    cfg, n = DPM_CASES[case]
    run_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_dpm_multistep_few_steps(n):
    cfg = dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False)
    run_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("cfg", [dict(algorithm_type="sde-dpmsolver++", solver_order=3),
                                 dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True),
                                 dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
                                 dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min",
                                      solver_type="heun", prediction_type="v_prediction")])
def test_dpm_multistep_sde_supplied_noise(cfg):
    run_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), 11,
                   stochastic=True, noise_hook=variance_noise_hook)


def test_dpm_multistep_learned_variance():
    # diffusers keeps channels [:, :3] of NCHW; ours [..., :3] of channels-last.
    cfg = dict(variance_type="learned_range", solver_order=3)
    run_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), 10,
                   shape=(2, 4, 3, 3), learned=True)


@pytest.mark.parametrize("begin,find_start", [(4, False), (7, True)])
def test_dpm_multistep_img2img_start(begin, find_start):
    cfg = dict(solver_order=3, **SD)
    run_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), 14,
                   begin=begin, find_start=find_start, size_history=False)


def test_dpm_multistep_config_handling():
    # A UniPC / DEIS config loads as DPM-Solver++ midpoint, as in diffusers; unknown keys are ignored.
    unipc = dict(diffusers.UniPCMultistepScheduler(solver_type="bh1").config)
    ours = DPMSolverMultistepScheduler.from_config(unipc)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(unipc)
    assert ours.config.solver_type == ref.config.solver_type == "midpoint"
    assert DPMSolverMultistepScheduler.from_config(dict(algorithm_type="deis")).config.algorithm_type == "dpmsolver++"
    with pytest.raises(common.SchedulerConfigError):
        DPMSolverMultistepScheduler.from_config(dict(algorithm_type="dpmsolver"))  # zero final sigma
    with pytest.raises(common.SchedulerConfigError):
        DPMSolverMultistepScheduler.from_config(dict(use_flow_sigmas=True))
    with pytest.raises(ValueError):
        diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="key"):
        s = DPMSolverMultistepScheduler.from_config(dict(algorithm_type="sde-dpmsolver++"))
        st = s.set_timesteps(s.create_state(), 5, shape=(1, 2))
        s.step(st, jnp.zeros((1, 2)), st.timesteps[0], jnp.zeros((1, 2)))


# ---------------------------------------------------------------------------------- compiled loop, bf16

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
    state = scheduler.set_timesteps(scheduler.create_state(), n, shape=SHAPE)
    ref.set_timesteps(n)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(float(ref.init_noise_sigma))
    noises = rng.standard_normal((len(ref.timesteps),) + SHAPE).astype(np.float32)
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


def test_dpm_multistep_compiled_loop():
    cfg = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    check_compiled_loop(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg),
                        stochastic=True, noise_hook=variance_noise_hook)


def test_key_noise_is_standard_normal_draw():
    # Without supplied noise, the SDE solvers draw N(0, 1) from `key`.
    s = DPMSolverMultistepScheduler.from_config(dict(algorithm_type="sde-dpmsolver++", solver_order=1))
    st = s.set_timesteps(s.create_state(), 6, shape=(2, 8))
    x = jax.random.normal(jax.random.key(0), (2, 8))
    step = jax.jit(lambda key, noise: s.step(st, 0.3 * x, st.timesteps[0], x, key=key, noise=noise).prev_sample)
    key = jax.random.key(9)
    a = step(key, None)
    b = step(None, jax.random.normal(key, (2, 8)))
    c = step(jax.random.key(10), None)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(a - c).max()) > 1e-2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
