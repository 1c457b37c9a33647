"""Trajectory parity of the integer-timestep schedulers (DDIM, DDPM, PNDM, UnCLIP) with diffusers.

Both sides run the same sampling loop, each on its own trajectory, driven by a synthetic model output
(a fixed function of the scaled input and t); every step's prev_sample and predicted x_0 must match
diffusers within TOL relative to the sample's scale. Stochastic steps get the same noise on both sides
(diffusers' `randn_tensor` is patched to return it). The harness here is shared by the other
`test_schedulers_a_*` files.
"""

from __future__ import annotations

import copy
import functools
import sys

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_ref import assert_close

from unclip_jax.schedulers.ddim import DDIMScheduler
from unclip_jax.schedulers.ddpm import DDPMScheduler
from unclip_jax.schedulers.pndm import PNDMScheduler
from unclip_jax.schedulers.unclip import UnCLIPScheduler

TOL = 1e-5  # fp32, relative to the sample's scale (that of the step's input or output, whichever is larger)

# diffusers' k-diffusion schedulers warn (numpy 2 deprecations of torch tensors in numpy calls) at every sigma
# lookup: tens of thousands of records per file that pytest would otherwise collect and count.
QUIET_REFERENCE = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
                   pytest.mark.filterwarnings("ignore::DeprecationWarning:numpy")]
pytestmark = QUIET_REFERENCE

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
    """A deterministic stand-in for the denoiser. `learned` appends a second half of channels for a
    learned variance: "range" in [-1, 1] (the `learned_range` interpolation), "positive" a variance."""
    x_in = np.asarray(x_in, np.float32)
    out = (np.float32(0.3) * x_in + np.float32(0.1 * np.sin(t / 100.0))).astype(np.float32)
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
