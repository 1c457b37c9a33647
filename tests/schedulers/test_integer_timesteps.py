"""Trajectory parity of the integer-timestep schedulers (DDIM, DDPM, PNDM, UnCLIP) with diffusers.

Both sides run the same sampling loop, each on its own trajectory, driven by a synthetic model output
(a fixed function of the scaled input and t); every step's prev_sample and predicted x_0 must match
diffusers within TOL relative to the sample's scale. Stochastic steps get the same noise on both sides
(diffusers' `randn_tensor` is patched to return it). The harness is tests/schedulers/harness.py.
"""

from __future__ import annotations

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from harness import QUIET_REFERENCE, SHAPE_2D, SHAPE_4D, TOL, from_ref, reference, run_trajectory, to_ref
from torch_ref import assert_close

from unclip_jax.schedulers.ddim import DDIMScheduler
from unclip_jax.schedulers.ddpm import DDPMScheduler
from unclip_jax.schedulers.pndm import PNDMScheduler
from unclip_jax.schedulers.unclip import UnCLIPScheduler

pytestmark = QUIET_REFERENCE

STEPS = (1, 7, 10, 25)

# ------------------------------------------------------------------------------------------------ DDIM

DDIM_CASES = {
    "default": {},
    "sd_like": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1),
    "v_trailing_zero_snr": dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                rescale_betas_zero_snr=True, clip_sample=False, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012),
    "sample_linspace_cos": dict(prediction_type="sample", timestep_spacing="linspace",
                                beta_schedule="squaredcos_cap_v2", clip_sample_range=0.8),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    "clip_range_offset": dict(clip_sample=True, clip_sample_range=2.0, steps_offset=3, set_alpha_to_one=False),
}


# Thresholding and the clip range act on x_0 alone, whatever the schedule, so those cases run one count; the
# others differ in spacing / offset / final alpha, which depend on the count, and run every count.
DDIM_COUNTS = {"thresholding": (10,), "clip_range_offset": (7,)}


@pytest.mark.parametrize("case,n", [(c, n) for c in DDIM_CASES for n in DDIM_COUNTS.get(c, STEPS)])
def test_ddim_deterministic(case, n):
    cfg = DDIM_CASES[case]
    # diffusers' thresholding only handles [B, C, ...] samples.
    run_trajectory(DDIMScheduler.from_config(cfg), diffusers.DDIMScheduler(**cfg), n,
                   shape=SHAPE_4D if n % 2 or "thresholding" in cfg else SHAPE_2D)


@pytest.mark.parametrize("eta,clipped,case", [(1.0, False, "default"), (0.5, True, "sd_like"),
                                              (0.3, True, "v_trailing_zero_snr"), (0.8, False, "thresholding")])
def test_ddim_eta(eta, clipped, case):
    cfg = DDIM_CASES[case]

    def per_step(i, ts, state, z):
        return {}, dict(variance_noise=to_ref(z))

    run_trajectory(DDIMScheduler.from_config(cfg), diffusers.DDIMScheduler(**cfg), 12, shape=SHAPE_4D,
                   stochastic=True, step_kwargs=dict(eta=eta, use_clipped_model_output=clipped),
                   ref_kwargs=dict(eta=eta, use_clipped_model_output=clipped), per_step=per_step)


@pytest.mark.parametrize("begin", [3, 9])
def test_ddim_img2img_start(begin):
    cfg = DDIM_CASES["sd_like"]
    run_trajectory(DDIMScheduler.from_config(cfg), diffusers.DDIMScheduler(**cfg), 15, begin=begin)


def test_ddim_velocity_and_config_roundtrip():
    ref = diffusers.DDIMScheduler(**DDIM_CASES["v_trailing_zero_snr"])
    ours = DDIMScheduler.from_config(dict(ref.config))
    assert ours.config.prediction_type == "v_prediction" and ours.config.rescale_betas_zero_snr
    state = ours.create_state()
    rng = np.random.default_rng(1)
    x, e = rng.standard_normal((2, 4, 4, 3)).astype(np.float32), rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    t = np.array([10, 999])
    v = ours.get_velocity(state, jnp.asarray(x), jnp.asarray(e), jnp.asarray(t))
    assert_close(v, from_ref(ref.get_velocity(to_ref(x), to_ref(e), torch.from_numpy(t))), TOL, "velocity")
    # from_config takes another scheduler's config and ignores what DDIM does not know.
    other = DDIMScheduler.from_config(dict(diffusers.EulerDiscreteScheduler().config), clip_sample=False)
    assert other.config.timestep_spacing == "linspace" and not other.config.clip_sample


# ------------------------------------------------------------------------------------------------ DDPM

DDPM_CASES = {
    "fixed_small": dict(),
    "fixed_small_log_sd": dict(variance_type="fixed_small_log", beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012, clip_sample=False, steps_offset=1),
    "fixed_large_v_trailing": dict(variance_type="fixed_large", prediction_type="v_prediction",
                                   timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False),
    "learned_range_cos": dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
                              timestep_spacing="linspace"),
    "learned_sample_thresh": dict(variance_type="learned", prediction_type="sample", thresholding=True,
                                  dynamic_thresholding_ratio=0.95, sample_max_value=2.0),
    "sigmoid_clip": dict(beta_schedule="sigmoid", clip_sample_range=0.5),
}


# As for DDIM: the x_0 limits and the beta schedule do not depend on the count; the spacings and variances do.
DDPM_COUNTS = {"learned_sample_thresh": (13,), "sigmoid_clip": (13,)}


@pytest.mark.parametrize("case,n", [(c, n) for c in DDPM_CASES for n in DDPM_COUNTS.get(c, (1, 10, 13))])
def test_ddpm(case, n, monkeypatch):
    cfg = DDPM_CASES[case]
    learned = {"learned": "positive", "learned_range": "range"}.get(cfg.get("variance_type"))
    run_trajectory(DDPMScheduler.from_config(cfg), diffusers.DDPMScheduler(**cfg), n, stochastic=True,
                   learned=learned, shape=SHAPE_4D if learned or "thresholding" in cfg else SHAPE_2D,
                   monkeypatch=monkeypatch)


def test_ddpm_img2img_start(monkeypatch):
    cfg = DDPM_CASES["fixed_small_log_sd"]
    run_trajectory(DDPMScheduler.from_config(cfg), diffusers.DDPMScheduler(**cfg), 12, begin=4, stochastic=True,
                   monkeypatch=monkeypatch)


# ------------------------------------------------------------------------------------------------ PNDM

PNDM_CASES = {
    "prk_default": dict(),
    "prk_v_linspace": dict(prediction_type="v_prediction", timestep_spacing="linspace", set_alpha_to_one=True),
    "plms_sd": dict(skip_prk_steps=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    steps_offset=1),
    "plms_trailing_cos": dict(skip_prk_steps=True, timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("n", (1, 2, 4, 5, 10, 21))
@pytest.mark.parametrize("case", list(PNDM_CASES))
def test_pndm(case, n):
    cfg = PNDM_CASES[case]
    ours, ref = PNDMScheduler.from_config(cfg), diffusers.PNDMScheduler(**cfg)
    if not cfg.get("skip_prk_steps") and n < 4:
        with pytest.raises(ValueError):
            ours.set_timesteps(ours.create_state(), n)
        return
    run_trajectory(ours, ref, n, shape=SHAPE_4D if n % 2 else SHAPE_2D)


def test_pndm_img2img_start():
    cfg = PNDM_CASES["plms_sd"]
    run_trajectory(PNDMScheduler.from_config(cfg), diffusers.PNDMScheduler(**cfg), 12, begin=3)


# ---------------------------------------------------------------------------------------------- UnCLIP

def unclip_prev(i, ts, state, z):
    """The Karlo pipeline's prev_timestep: the next timestep, None at the last step."""
    ours = UnCLIPScheduler().previous_timestep(state, i)
    return dict(prev_timestep=ours), dict(prev_timestep=None if i + 1 == len(ts) else ts[i + 1])


UNCLIP_CASES = {
    "prior": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=10.0),
    "decoder": dict(variance_type="learned_range"),
    "super_res_eps_noclip": dict(variance_type="fixed_small_log", clip_sample=False),
}


@pytest.mark.parametrize("n", (2, 7, 25))
@pytest.mark.parametrize("case", list(UNCLIP_CASES))
def test_unclip(case, n, monkeypatch):
    cfg = UNCLIP_CASES[case]
    learned = "range" if cfg["variance_type"] == "learned_range" else None
    run_trajectory(UnCLIPScheduler.from_config(cfg), diffusers.UnCLIPScheduler(**cfg), n, stochastic=True,
                   learned=learned, shape=SHAPE_4D if learned else SHAPE_2D, per_step=unclip_prev,
                   monkeypatch=monkeypatch)


def test_unclip_unit_stride(monkeypatch):
    """prev_timestep left out: every step is a unit stride t -> t - 1 (diffusers' default)."""
    cfg = UNCLIP_CASES["decoder"]
    run_trajectory(UnCLIPScheduler.from_config(cfg), diffusers.UnCLIPScheduler(**cfg), 10, stochastic=True,
                   learned="range", shape=SHAPE_4D, monkeypatch=monkeypatch)


def test_unclip_rejects_one_step():
    with pytest.raises(ValueError):
        UnCLIPScheduler().set_timesteps(UnCLIPScheduler().create_state(), 1)


# ------------------------------------------------------------------------------------------------ configs

def _all_pairs():
    from unclip_jax.schedulers import (edm_euler, euler_ancestral_discrete, euler_discrete, heun_discrete,
                                       k_dpm_2_ancestral_discrete, k_dpm_2_discrete, lms_discrete)
    return [(DDIMScheduler, "DDIMScheduler"), (DDPMScheduler, "DDPMScheduler"), (PNDMScheduler, "PNDMScheduler"),
            (UnCLIPScheduler, "UnCLIPScheduler"), (lms_discrete.LMSDiscreteScheduler, "LMSDiscreteScheduler"),
            (euler_discrete.EulerDiscreteScheduler, "EulerDiscreteScheduler"),
            (euler_ancestral_discrete.EulerAncestralDiscreteScheduler, "EulerAncestralDiscreteScheduler"),
            (heun_discrete.HeunDiscreteScheduler, "HeunDiscreteScheduler"),
            (k_dpm_2_discrete.KDPM2DiscreteScheduler, "KDPM2DiscreteScheduler"),
            (k_dpm_2_ancestral_discrete.KDPM2AncestralDiscreteScheduler, "KDPM2AncestralDiscreteScheduler"),
            (edm_euler.EDMEulerScheduler, "EDMEulerScheduler")]


@pytest.mark.parametrize("ours_cls,ref_name", _all_pairs(), ids=lambda v: v if isinstance(v, str) else "")
def test_config_fields_and_defaults_match_diffusers(ours_cls, ref_name):
    """Every config field is a diffusers key with diffusers' default, and every diffusers key is a field."""
    import dataclasses

    ref_cls = getattr(diffusers, ref_name)
    ref_config = dict(reference(ref_cls).config)
    ours = ours_cls.from_config(ref_config)
    fields = {f.name: getattr(ours.config, f.name) for f in dataclasses.fields(ours.config)}
    keys = {k for k in ref_config if not k.startswith("_")}
    assert set(fields) == keys, f"missing {keys - set(fields)}, extra {set(fields) - keys}"
    for k, v in fields.items():
        assert v == ref_config[k] or (v is None and ref_config[k] is None), k
    assert ours_cls.order == (getattr(ref_cls, "order", None) or 1)
    assert hash(ours) == hash(ours_cls.from_config(ref_config))  # static argument of a jit
