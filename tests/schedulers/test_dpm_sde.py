"""DPMSolverSDEScheduler: trajectory parity with diffusers on supplied noise, and the law of our own
Brownian noise source (harness: harness.py).

diffusers draws the noise from a torchsde Brownian tree and imports torchsde at module level. torchsde is
not installed here, so the reference module is imported with a stand-in `torchsde` module and its
`BrownianTreeNoiseSampler` is replaced by one that returns the noise we also hand to our step.
"""

from __future__ import annotations

import sys
import types

import diffusers  # noqa: F401  (imported before the stand-in so diffusers' availability checks stay honest)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import SD, check_compiled_loop, run_solver_trajectory, to_ref

from unclip_jax.schedulers.dpmsolver_sde import DPMSolverSDEScheduler


@pytest.fixture(scope="module")
def ref_module():
    saved = sys.modules.get("torchsde")
    sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        import diffusers.schedulers.scheduling_dpmsolver_sde as module
    finally:
        if saved is None:
            del sys.modules["torchsde"]
        else:
            sys.modules["torchsde"] = saved
    return module


class SuppliedSampler:
    """Stands in for diffusers' BrownianTreeNoiseSampler: returns the current step's noise."""

    z = None

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, sigma, sigma_next):
        return to_ref(SuppliedSampler.z)


def hook(z):
    SuppliedSampler.z = z


SDE_CASES = {
    "default": ({}, 10),
    "karras": (dict(use_karras_sigmas=True), 10),
    "v_leading_sd": (dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1, **SD), 9),
    "exponential_trailing": (dict(use_exponential_sigmas=True, timestep_spacing="trailing"), 10),
    "beta_sigmas_cos": (dict(use_beta_sigmas=True, beta_schedule="squaredcos_cap_v2"), 7),
    "one_step": ({}, 1),
    "two_steps_karras": (dict(use_karras_sigmas=True, **SD), 2),
}


@pytest.mark.parametrize("case", list(SDE_CASES))
def test_dpm_sde_supplied_noise(case, ref_module, monkeypatch):
    monkeypatch.setattr(ref_module, "BrownianTreeNoiseSampler", SuppliedSampler)
    cfg, n = SDE_CASES[case]
    run_solver_trajectory(DPMSolverSDEScheduler.from_config(cfg), ref_module.DPMSolverSDEScheduler(**cfg), n,
                   stochastic=True, noise_hook=hook)


@pytest.mark.parametrize("begin,find_start", [(4, False), (6, True)])
def test_dpm_sde_img2img_start(begin, find_start, ref_module, monkeypatch):
    # Pipelines start at t_start * order (an interval's first evaluation).
    monkeypatch.setattr(ref_module, "BrownianTreeNoiseSampler", SuppliedSampler)
    cfg = dict(use_karras_sigmas=True, **SD)
    run_solver_trajectory(DPMSolverSDEScheduler.from_config(cfg), ref_module.DPMSolverSDEScheduler(**cfg), 8,
                   begin=begin, find_start=find_start, stochastic=True, noise_hook=hook, size_history=False)


def test_dpm_sde_brownian_noise_law():
    """From `key`, the two noises of an interval are standard normal with the Brownian-tree correlation
    sqrt((sigma - sigma_mid) / (sigma - sigma_next)), and the next interval's are independent of them."""
    s = DPMSolverSDEScheduler.from_config(dict(use_karras_sigmas=True))
    m = 20000
    st = s.set_timesteps(s.create_state(), 4, shape=(m,))
    x = jnp.zeros((m,))

    @jax.jit
    def noises(st):
        # A zero model output on a zero sample leaves only the noise term, z * sigma_up.
        out = []
        for i in range(4):
            res = s.step(st, jnp.zeros((m,)), st.timesteps[i], x, key=jax.random.fold_in(jax.random.key(0), i))
            sigma = jnp.where(st.in_second_step, st.sigmas[i - 1], st.sigmas[i])
            sigma_to = jnp.where(st.in_second_step, st.sigmas[i], jnp.sqrt(st.sigmas[i] * st.sigmas[i + 1]))
            sigma_up = jnp.minimum(sigma_to, jnp.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2))
            out.append(res.prev_sample / sigma_up)
            st = res.state
        return jnp.stack(out)

    z = np.asarray(noises(st), np.float64)
    sig = np.asarray(st.sigmas, np.float64)
    mid = np.sqrt(sig[0] * sig[1])  # midpoint in log sigma
    expected = np.sqrt((sig[0] - mid) / (sig[0] - sig[1]))
    se = 4.0 / np.sqrt(m)  # four standard errors
    assert np.all(np.abs(z.std(axis=1) - 1) < se), z.std(axis=1)
    assert np.all(np.abs(z.mean(axis=1)) < se)
    corr = np.corrcoef(z)
    assert abs(corr[0, 1] - expected) < se, (corr[0, 1], expected)
    assert abs(corr[2, 3] - np.sqrt((sig[2] - np.sqrt(sig[2] * sig[3])) / (sig[2] - sig[3]))) < se
    assert abs(corr[0, 2]) < se and abs(corr[1, 3]) < se and abs(corr[1, 2]) < se


def test_dpm_sde_compiled_loop(ref_module, monkeypatch):
    monkeypatch.setattr(ref_module, "BrownianTreeNoiseSampler", SuppliedSampler)
    cfg = dict(use_karras_sigmas=True)
    check_compiled_loop(DPMSolverSDEScheduler.from_config(cfg), ref_module.DPMSolverSDEScheduler(**cfg), n=6,
                        stochastic=True, noise_hook=hook)
