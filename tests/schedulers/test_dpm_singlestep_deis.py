"""Trajectory parity of singlestep DPM-Solver and DEIS with diffusers (harness: harness.py)."""

from __future__ import annotations

import diffusers
import diffusers.schedulers.scheduling_dpmsolver_singlestep as ref_singlestep
import numpy as np
import pytest
from harness import SD, StepNoise, check_compiled_loop, run_solver_trajectory

from unclip_jax.schedulers import common
from unclip_jax.schedulers.deis_multistep import DEISMultistepScheduler
from unclip_jax.schedulers.dpmsolver_singlestep import DPMSolverSinglestepScheduler, order_list

# --------------------------------------------------------------------------------- DPM-Solver singlestep

SINGLE_CASES = {
    "default": ({}, 10),
    "order3_odd": (dict(solver_order=3, **SD), 11),
    "order3_heun_sigma_min": (dict(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min"), 12),
    "order2_heun_no_lof": (dict(solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False), 10),
    "order1": (dict(solver_order=1), 7),
    "karras_order3": (dict(use_karras_sigmas=True, solver_order=3), 10),
    "exponential": (dict(use_exponential_sigmas=True, **SD), 10),
    "beta_sigmas": (dict(use_beta_sigmas=True, solver_order=3), 13),
    "eps_algo_order3": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3), 12),
    # The eps-form solver from sigma ~ 157 in very few steps cancels catastrophically in fp32 on both
    # sides (8e-5 apart at 2 steps), so the v / heun case runs a longer schedule.
    "eps_algo_heun_v": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3,
                             solver_type="heun", prediction_type="v_prediction"), 12),
    "v_thresh_cos_clipped": (dict(prediction_type="v_prediction", thresholding=True, sample_max_value=1.5,
                                  beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3), 10),
    "sample_pred": (dict(prediction_type="sample", solver_type="heun"), 9),
}


@pytest.mark.parametrize("case", list(SINGLE_CASES))
def test_dpm_singlestep(case):
    cfg, n = SINGLE_CASES[case]
    ours, ref = DPMSolverSinglestepScheduler.from_config(cfg), diffusers.DPMSolverSinglestepScheduler(**cfg)
    run_solver_trajectory(ours, ref, n)
    np.testing.assert_array_equal(np.asarray(ours.set_timesteps(ours.create_state(), n).order_list), ref.order_list)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_dpm_singlestep_few_steps(n):
    cfg = dict(solver_order=3, final_sigmas_type="sigma_min")
    run_solver_trajectory(DPMSolverSinglestepScheduler.from_config(cfg), diffusers.DPMSolverSinglestepScheduler(**cfg), n)


@pytest.mark.parametrize("cfg", [dict(algorithm_type="sde-dpmsolver++", solver_order=3),
                                 dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"),
                                 dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True)])
def test_dpm_singlestep_sde_supplied_noise(cfg, monkeypatch):
    noise = StepNoise()
    monkeypatch.setattr(ref_singlestep, "randn_tensor", noise)
    run_solver_trajectory(DPMSolverSinglestepScheduler.from_config(cfg), diffusers.DPMSolverSinglestepScheduler(**cfg), 11,
                   stochastic=True, noise_hook=lambda z: setattr(noise, "z", z))


def test_dpm_singlestep_learned_variance_and_start():
    cfg = dict(variance_type="learned", solver_order=3, **SD)
    run_solver_trajectory(DPMSolverSinglestepScheduler.from_config(cfg), diffusers.DPMSolverSinglestepScheduler(**cfg), 10,
                   shape=(2, 4, 3, 3), learned=True)
    cfg = dict(solver_order=3, **SD)
    run_solver_trajectory(DPMSolverSinglestepScheduler.from_config(cfg), diffusers.DPMSolverSinglestepScheduler(**cfg), 12,
                   begin=5, size_history=False)


def test_dpm_singlestep_order_lists():
    for p in (1, 2, 3):
        for lof in (False, True):
            for zero in (False, True):
                ref = diffusers.DPMSolverSinglestepScheduler(solver_order=p, lower_order_final=lof,
                                                             final_sigmas_type="zero" if zero else "sigma_min")
                for n in range(1, 14):
                    if n % p == 0 or lof:  # diffusers' own order list only tiles the schedule in these cases
                        assert order_list(n, p, lof, zero) == ref.get_order_list(n), (p, n, lof, zero)
    with pytest.raises(common.SchedulerConfigError):
        DPMSolverSinglestepScheduler.from_config(dict(algorithm_type="dpmsolver", thresholding=True,
                                                      final_sigmas_type="sigma_min"))


def test_dpm_singlestep_compiled_loop(monkeypatch):
    cfg = dict(solver_order=3, algorithm_type="sde-dpmsolver++")
    noise = StepNoise()
    monkeypatch.setattr(ref_singlestep, "randn_tensor", noise)
    check_compiled_loop(DPMSolverSinglestepScheduler.from_config(cfg), diffusers.DPMSolverSinglestepScheduler(**cfg),
                        stochastic=True, noise_hook=lambda z: setattr(noise, "z", z))


# ------------------------------------------------------------------------------------------------- DEIS

DEIS_CASES = {
    "default": ({}, 10),
    "order3_sd": (dict(solver_order=3, **SD), 11),
    "order3_no_lof": (dict(solver_order=3, lower_order_final=False), 12),
    "order1_leading": (dict(solver_order=1, timestep_spacing="leading", steps_offset=1), 7),
    "karras_order3": (dict(use_karras_sigmas=True, solver_order=3), 10),
    "exponential_sample_leading": (dict(use_exponential_sigmas=True, prediction_type="sample",
                                        timestep_spacing="leading", steps_offset=1), 10),
    "beta_sigmas": (dict(use_beta_sigmas=True, **SD), 10),
    "v_thresh_trailing": (dict(prediction_type="v_prediction", thresholding=True, timestep_spacing="trailing",
                               solver_order=3), 10),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2", solver_order=3), 20),
}


@pytest.mark.parametrize("case", list(DEIS_CASES))
def test_deis(case):
    cfg, n = DEIS_CASES[case]
    run_solver_trajectory(DEISMultistepScheduler.from_config(cfg), diffusers.DEISMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_deis_few_steps(n):
    cfg = dict(solver_order=3, lower_order_final=False)
    run_solver_trajectory(DEISMultistepScheduler.from_config(cfg), diffusers.DEISMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("begin,find_start", [(3, False), (6, True)])
def test_deis_img2img_start(begin, find_start):
    cfg = dict(solver_order=3, **SD)
    run_solver_trajectory(DEISMultistepScheduler.from_config(cfg), diffusers.DEISMultistepScheduler(**cfg), 12,
                   begin=begin, find_start=find_start)


def test_deis_compiled_loop():
    cfg = dict(solver_order=3)
    check_compiled_loop(DEISMultistepScheduler.from_config(cfg), diffusers.DEISMultistepScheduler(**cfg))
