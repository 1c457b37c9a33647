"""Trajectory parity of the DPM-Solver family (DPM-Solver multistep here; singlestep, DEIS, UniPC and the
SDE solver beside it, all through tests/schedulers/harness.py) with diffusers.

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
from harness import SD, check_compiled_loop, run_solver_trajectory, variance_noise_hook

from unclip_jax.schedulers import common
from unclip_jax.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler

# ----------------------------------------------------------------------------------- DPM-Solver multistep

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
    run_solver_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_dpm_multistep_few_steps(n):
    cfg = dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False)
    run_solver_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("cfg", [dict(algorithm_type="sde-dpmsolver++", solver_order=3),
                                 dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True),
                                 dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
                                 dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min",
                                      solver_type="heun", prediction_type="v_prediction")])
def test_dpm_multistep_sde_supplied_noise(cfg):
    run_solver_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), 11,
                   stochastic=True, noise_hook=variance_noise_hook)


def test_dpm_multistep_learned_variance():
    # diffusers keeps channels [:, :3] of NCHW; ours [..., :3] of channels-last.
    cfg = dict(variance_type="learned_range", solver_order=3)
    run_solver_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), 10,
                   shape=(2, 4, 3, 3), learned=True)


@pytest.mark.parametrize("begin,find_start", [(4, False), (7, True)])
def test_dpm_multistep_img2img_start(begin, find_start):
    cfg = dict(solver_order=3, **SD)
    run_solver_trajectory(DPMSolverMultistepScheduler.from_config(cfg), diffusers.DPMSolverMultistepScheduler(**cfg), 14,
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
