"""Trajectory parity of the sigma (k-diffusion family) schedulers with diffusers: Euler, Euler ancestral,
LMS, Heun, KDPM2, KDPM2 ancestral and EDM Euler; harness and tolerance from harness.py."""

from __future__ import annotations

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from harness import (
    QUIET_REFERENCE, SHAPE_2D, SHAPE_4D, TOL, from_ref, reference, run_trajectory, to_ref,
)
from torch_ref import assert_close

from unclip_jax.schedulers.edm_euler import EDMEulerScheduler
from unclip_jax.schedulers.euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from unclip_jax.schedulers.euler_discrete import EulerDiscreteScheduler
from unclip_jax.schedulers.heun_discrete import HeunDiscreteScheduler
from unclip_jax.schedulers.k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteScheduler
from unclip_jax.schedulers.k_dpm_2_discrete import KDPM2DiscreteScheduler
from unclip_jax.schedulers.lms_discrete import LMSDiscreteScheduler

pytestmark = QUIET_REFERENCE
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = (1, 11)

# (ours, diffusers, config, stochastic)
CASES = {
    "euler/default": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, {}, False),
    "euler/sd_leading": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                         dict(SD, timestep_spacing="leading", steps_offset=1), False),
    "euler/karras_v_trailing": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                                dict(SD, use_karras_sigmas=True, prediction_type="v_prediction",
                                     timestep_spacing="trailing"), False),
    "euler/karras_bounds_sample": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                                   dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=20.0,
                                        prediction_type="sample"), False),
    "euler/exponential_cos": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                              dict(use_exponential_sigmas=True, beta_schedule="squaredcos_cap_v2"), False),
    "euler/beta_sigmas": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, dict(SD, use_beta_sigmas=True),
                          False),
    "euler/zero_snr_v_trailing": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                                  dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                       timestep_spacing="trailing"), False),
    "euler/log_linear_sigma_min": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                                   dict(interpolation_type="log_linear", final_sigmas_type="sigma_min"), False),
    "euler/continuous_v": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                           dict(timestep_type="continuous", prediction_type="v_prediction"), False),
    "euler_a/default": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler, {}, True),
    "euler_a/sd_leading": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler,
                           dict(SD, timestep_spacing="leading", steps_offset=1), True),
    "euler_a/zero_snr_v_trailing": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler,
                                    dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                         timestep_spacing="trailing"), True),
    "lms/default": (LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler, {}, False),
    "lms/karras_sd": (LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler, dict(SD, use_karras_sigmas=True), False),
    "lms/exponential_v_trailing": (LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler,
                                   dict(use_exponential_sigmas=True, prediction_type="v_prediction",
                                        timestep_spacing="trailing"), False),
    "lms/leading_sample": (LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler,
                           dict(timestep_spacing="leading", steps_offset=1, prediction_type="sample"), False),
    "heun/default": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, {}, False),
    "heun/karras_v": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler,
                      dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), False),
    "heun/exponential_sample_clip": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler,
                                     dict(use_exponential_sigmas=True, prediction_type="sample", clip_sample=True,
                                          clip_sample_range=2.0), False),
    "heun/leading_clip_eps": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler,
                              dict(SD, timestep_spacing="leading", steps_offset=1, clip_sample=True), False),
    "kdpm2/default": (KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler, {}, False),
    "kdpm2/karras_sd": (KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler, dict(SD, use_karras_sigmas=True),
                        False),
    "kdpm2/exponential_v_trailing": (KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler,
                                     dict(use_exponential_sigmas=True, prediction_type="v_prediction",
                                          timestep_spacing="trailing"), False),
    "kdpm2/leading_cos": (KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler,
                          dict(timestep_spacing="leading", steps_offset=1, beta_schedule="squaredcos_cap_v2"), False),
    "kdpm2_a/default": (KDPM2AncestralDiscreteScheduler, diffusers.KDPM2AncestralDiscreteScheduler, {}, True),
    "kdpm2_a/karras_v": (KDPM2AncestralDiscreteScheduler, diffusers.KDPM2AncestralDiscreteScheduler,
                         dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), True),
    "kdpm2_a/beta_leading": (KDPM2AncestralDiscreteScheduler, diffusers.KDPM2AncestralDiscreteScheduler,
                             dict(use_beta_sigmas=True, timestep_spacing="leading", steps_offset=1), True),
    "edm/karras": (EDMEulerScheduler, diffusers.EDMEulerScheduler, {}, False),
    "edm/exponential_v": (EDMEulerScheduler, diffusers.EDMEulerScheduler,
                          dict(sigma_schedule="exponential", prediction_type="v_prediction", sigma_data=0.7), False),
    "edm/sigma_min_rho5": (EDMEulerScheduler, diffusers.EDMEulerScheduler,
                           dict(final_sigmas_type="sigma_min", rho=5.0, sigma_max=40.0), False),
}


def make(case):
    ours_cls, ref_cls, cfg, stochastic = CASES[case]
    return ours_cls.from_config(cfg), reference(ref_cls, **cfg), stochastic


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory(case, n, monkeypatch):
    ours, ref, stochastic = make(case)
    # Zero terminal SNR starts at sigma = 4096: the first step cancels ~12 bits of its input, so each side's
    # float32 rounding there (~1 ulp of 4096) would be compared downstream; step from diffusers' samples.
    run_trajectory(ours, ref, n, stochastic=stochastic, monkeypatch=monkeypatch if stochastic else None,
                   shape=SHAPE_4D if "karras" in case else SHAPE_2D, teacher_forcing="zero_snr" in case)


# img2img strength: start at t_start * order with the begin index set, from x_0 noised by add_noise.
@pytest.mark.parametrize("case", ["euler/sd_leading", "euler_a/default", "lms/karras_sd", "heun/karras_v",
                                  "kdpm2/default", "kdpm2_a/karras_v", "edm/karras"])
def test_img2img_start(case, monkeypatch):
    ours, ref, stochastic = make(case)
    run_trajectory(ours, ref, 10, begin=3 * ours.order, stochastic=stochastic,
                   monkeypatch=monkeypatch if stochastic else None)


@pytest.mark.parametrize("case", ["euler/karras_v_trailing", "edm/exponential_v"])
def test_churn(case, monkeypatch):
    """s_churn > 0 adds noise before the Euler step (here only inside [s_tmin, s_tmax])."""
    ours, ref, _ = make(case)
    kw = dict(s_churn=3.0, s_tmin=0.3, s_tmax=8.0, s_noise=1.003)
    run_trajectory(ours, ref, 12, stochastic=True, step_kwargs=kw, ref_kwargs=kw, monkeypatch=monkeypatch)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lms_lower_order(order):
    ours, ref, _ = make("lms/karras_sd")
    run_trajectory(ours, ref, 9, step_kwargs=dict(order=order), ref_kwargs=dict(order=order))


def test_edm_given_pred_original_sample():
    ours, ref, _ = make("edm/karras")
    x0 = np.full(SHAPE_2D, 0.25, np.float32)
    run_trajectory(ours, ref, 6, step_kwargs=dict(pred_original_sample=jnp.asarray(x0)),
                   ref_kwargs=dict(pred_original_sample=torch.from_numpy(x0)))


@pytest.mark.parametrize("case", ["euler/default", "heun/default", "kdpm2/karras_sd", "lms/default"])
def test_add_noise_by_timestep(case):
    """Without a begin index, add_noise finds each timestep in the schedule (the second occurrence of a
    repeated one, as diffusers does)."""
    ours, ref, _ = make(case)
    state = ours.set_timesteps(ours.create_state(), 8)
    ref.set_timesteps(8)
    rng = np.random.default_rng(3)
    x0, z = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    idx = np.array([0, 3, len(ref.timesteps) - 1])
    got = ours.add_noise(state, jnp.asarray(x0), jnp.asarray(z), state.timesteps[idx])
    assert_close(got, from_ref(ref.add_noise(to_ref(x0), to_ref(z), ref.timesteps[idx])), TOL, "add_noise")


def test_euler_velocity():
    ours, ref, _ = make("euler/zero_snr_v_trailing")
    state = ours.set_timesteps(ours.create_state(), 10)
    ref.set_timesteps(10)
    rng = np.random.default_rng(4)
    x, z = rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((2, 6)).astype(np.float32)
    got = ours.get_velocity(state, jnp.asarray(x), jnp.asarray(z), state.timesteps[np.array([1, 9])])
    assert_close(got, from_ref(ref.get_velocity(to_ref(x), to_ref(z), ref.timesteps[[1, 9]])), TOL, "velocity")


def test_training_state_matches_construction():
    """create_state mirrors what diffusers holds before set_timesteps (e.g. for training-time add_noise)."""
    for case in ("euler/continuous_v", "euler_a/default", "lms/default", "heun/default", "kdpm2/default",
                 "kdpm2_a/default", "edm/exponential_v"):
        ours, ref, _ = make(case)
        state = ours.create_state()
        np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=2e-6, err_msg=case)
        np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy().astype(np.float32),
                                   rtol=1e-6, atol=1e-4, err_msg=case)
