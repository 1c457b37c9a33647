"""Trajectory parity of UniPC multistep with diffusers (harness: harness.py)."""

from __future__ import annotations

import diffusers
import pytest
from harness import SD, check_compiled_loop, run_solver_trajectory

from unclip_jax.schedulers import common
from unclip_jax.schedulers.unipc_multistep import UniPCMultistepScheduler

UNIPC_CASES = {
    "default": ({}, 10),
    "order3_sd": (dict(solver_order=3, **SD), 11),
    "order1": (dict(solver_order=1), 7),
    "order3_bh1_no_lof": (dict(solver_order=3, solver_type="bh1", lower_order_final=False,
                               final_sigmas_type="sigma_min"), 12),
    "order4": (dict(solver_order=4), 13),
    "karras_order3": (dict(use_karras_sigmas=True, solver_order=3), 10),
    "karras_sigma_range": (dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=50.0,
                                final_sigmas_type="sigma_min"), 10),
    "exponential": (dict(use_exponential_sigmas=True, **SD), 10),
    "beta_sigmas": (dict(use_beta_sigmas=True, solver_order=3, **SD), 10),
    "noise_pred_order3": (dict(predict_x0=False, final_sigmas_type="sigma_min", solver_order=3), 11),
    "noise_pred_sample_bh1": (dict(predict_x0=False, prediction_type="sample", solver_type="bh1",
                                   final_sigmas_type="sigma_min"), 10),
    "noise_pred_v_leading": (dict(predict_x0=False, prediction_type="v_prediction", timestep_spacing="leading",
                                  steps_offset=1, final_sigmas_type="sigma_min", **SD), 10),
    "disable_corrector": (dict(disable_corrector=[0, 2, 5], solver_order=3), 10),
    "v_thresh_trailing_zero_snr": (dict(prediction_type="v_prediction", thresholding=True, timestep_spacing="trailing",
                                        rescale_betas_zero_snr=True, **SD), 10),
    "sample_cos": (dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2", solver_order=3), 20),
}


@pytest.mark.parametrize("case", list(UNIPC_CASES))
def test_unipc(case):
    cfg, n = UNIPC_CASES[case]
    run_solver_trajectory(UniPCMultistepScheduler.from_config(cfg), diffusers.UniPCMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_unipc_few_steps(n):
    cfg = dict(solver_order=3, lower_order_final=False, solver_type="bh1", final_sigmas_type="sigma_min")
    run_solver_trajectory(UniPCMultistepScheduler.from_config(cfg), diffusers.UniPCMultistepScheduler(**cfg), n)


@pytest.mark.parametrize("begin,find_start", [(3, False), (8, True)])
def test_unipc_img2img_start(begin, find_start):
    cfg = dict(solver_order=3, **SD)
    run_solver_trajectory(UniPCMultistepScheduler.from_config(cfg), diffusers.UniPCMultistepScheduler(**cfg), 14,
                   begin=begin, find_start=find_start, size_history=False)


def test_unipc_config_handling():
    dpm = dict(diffusers.DPMSolverMultistepScheduler(solver_type="heun").config)
    ours, ref = UniPCMultistepScheduler.from_config(dpm), diffusers.UniPCMultistepScheduler.from_config(dpm)
    assert ours.config.solver_type == ref.config.solver_type == "bh2"
    assert UniPCMultistepScheduler.from_config(dict(disable_corrector=[1, 2])).config.disable_corrector == (1, 2)
    with pytest.raises(common.SchedulerConfigError):
        UniPCMultistepScheduler.from_config(dict(use_flow_sigmas=True))


def test_unipc_compiled_loop():
    cfg = dict(solver_order=3, disable_corrector=[1])
    check_compiled_loop(UniPCMultistepScheduler.from_config(cfg), diffusers.UniPCMultistepScheduler(**cfg))
