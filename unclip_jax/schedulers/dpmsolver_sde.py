"""DPM-Solver++(2S) SDE sampling in the variance-exploding sigma parameterisation (Lu et al. 2022b,
Alg. 1 with the ancestral noise of k-diffusion's `sample_dpmpp_sde`), the counterpart of diffusers'
`DPMSolverSDEScheduler`.

Every interval [sigma_{k+1}, sigma_k] takes two model evaluations: a first step to the log-sigma midpoint
and a second one over the whole interval from the stored start sample, each an exponential-integrator
step to a reduced sigma plus fresh noise. The schedule therefore lists 2N - 1 timesteps (the last interval
ends at sigma = 0 with one Euler step).

Noise. diffusers queries a Brownian tree over sigma: the second step's noise is the normalised Brownian
increment over [sigma_next, sigma], which contains the first step's interval [sigma_mid, sigma], so the two
draws are correlated (coefficient sqrt((sigma - sigma_mid) / (sigma - sigma_next))). Our source reproduces
that law exactly from `key`: the first step draws its increment W1 and keeps it in the state; the second
adds an independent increment over [sigma_next, sigma_mid]. Intervals of different pairs do not overlap,
so they are independent, as in the tree. The draws are not the tree's bit for bit (that needs torchsde's
PRNG); pass `noise` to reproduce a given run.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class DPMSolverSDEConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    noise_sampler_seed: int | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise common.SchedulerConfigError(f"prediction_type {self.prediction_type!r} is not supported")
        common.check_unsupported(self, "DPMSolverSDEScheduler")


@flax.struct.dataclass
class DPMSolverSDEState:
    """timesteps [2N - 1] (float: the midpoints fall between training steps); sigmas [2N] each interval's
    start repeated, then 0; in_second_step whether the next step is an interval's second evaluation, with
    sample (its start) and mid_point_sigma; brownian the first step's unnormalised increment W1."""

    timesteps: jax.Array
    sigmas: jax.Array
    alphas_cumprod: jax.Array
    init_noise_sigma: jax.Array
    sample: jax.Array
    mid_point_sigma: jax.Array
    brownian: jax.Array
    in_second_step: jax.Array
    step_index: jax.Array
    begin_index: jax.Array


@dataclasses.dataclass(frozen=True)
class DPMSolverSDEScheduler(common.Scheduler):
    config: DPMSolverSDEConfig = DPMSolverSDEConfig()

    order = 2

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps float64 [2N - 1], sigmas float32 [2N]) as diffusers' `set_timesteps` builds them."""
        cfg, n = self.config, num_inference_steps
        ac = common.train_alphas_cumprod(cfg)
        timesteps, sigmas, log_sig = common.discrete_sigmas(cfg, ac, n, timestep_dtype=np.float64)
        # The second evaluation of each interval sits at its midpoint in log sigma.
        log_mid = np.log(sigmas[:-1]) + np.diff(np.log(sigmas)) * 0.5
        mid_timesteps = common.sigma_to_t(np.exp(log_mid), log_sig)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        ts = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        ts[1::2] = mid_timesteps
        return ts, sigmas

    def _state(self, timesteps, sigmas, shape) -> DPMSolverSDEState:
        cfg = self.config
        zeros = jnp.zeros(common.history_shape(1, shape)[1:], jnp.float32)
        return DPMSolverSDEState(
            timesteps=jnp.asarray(timesteps, jnp.float32),
            sigmas=jnp.asarray(sigmas, jnp.float32),
            alphas_cumprod=jnp.asarray(common.train_alphas_cumprod(cfg)),
            init_noise_sigma=jnp.asarray(common.init_noise_sigma_of(sigmas, cfg.timestep_spacing)),
            sample=zeros,
            mid_point_sigma=jnp.float32(0.0),
            brownian=zeros,
            in_second_step=jnp.bool_(False),
            step_index=jnp.int32(-1),
            begin_index=jnp.int32(-1),
        )

    def create_state(self, shape=None) -> DPMSolverSDEState:
        return self._state(*self.schedule(self.config.num_train_timesteps), shape)

    def set_timesteps(self, state, num_inference_steps: int, shape=None) -> DPMSolverSDEState:
        """`shape`: the sample shape, which sizes the stored sample (needed before a `lax.fori_loop`)."""
        common.check_num_inference_steps(self.config, num_inference_steps, "DPMSolverSDEScheduler")
        return self._state(*self.schedule(num_inference_steps), shape)

    def scale_model_input(self, state, sample, timestep):
        """x / sqrt(sigma^2 + 1): the VP-scaled input the model was trained on, at the interval start for a
        first evaluation and at the log-sigma midpoint for a second."""
        i = common.current_step_index(state, timestep)
        sigma = jnp.where(state.in_second_step, state.mid_point_sigma, common.sigma_at(state.sigmas, i))
        return common.scale_by_sigma(sample, sigma)

    def step(self, state, model_output, timestep, sample, *, key=None, noise=None,
             s_noise: float = 1.0) -> common.SchedulerOutput:
        """`noise`: the standard-normal draw diffusers' Brownian sampler would return for this step
        (ignored by the final Euler step); otherwise drawn from `key` (see the module docstring)."""
        cfg = self.config
        i = common.current_step_index(state, timestep)
        second = state.in_second_step
        x = sample.astype(jnp.float32)
        eps_or_v = model_output.astype(jnp.float32)
        sigma = jnp.where(second, common.sigma_at(state.sigmas, i - 1), common.sigma_at(state.sigmas, i))
        sigma_next = jnp.where(second, common.sigma_at(state.sigmas, i), common.sigma_at(state.sigmas, i + 1))
        t, t_next = -jnp.log(sigma), -jnp.log(sigma_next)
        t_mid = t + (t_next - t) * 0.5
        sigma_in = jnp.where(second, jnp.exp(-t_mid), sigma)
        x0 = common.denoised(cfg.prediction_type, eps_or_v, x, sigma_in)

        # The last interval ends at sigma = 0: one Euler step of the probability-flow ODE.
        last = sigma_next == 0
        euler = x + (x - x0) / sigma * (sigma_next - sigma)

        target_t = jnp.where(second, t_next, t_mid)
        stored = state.sample if state.sample.shape == x.shape else jnp.zeros_like(x)
        base = jnp.where(second, stored, x)
        sigma_from, sigma_to = jnp.exp(-t), jnp.exp(-target_t)
        # Ancestral split of the move to sigma_to into a deterministic part to sigma_down and noise sigma_up.
        sigma_up = jnp.minimum(sigma_to, jnp.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
        sigma_down = jnp.sqrt(sigma_to**2 - sigma_up**2)
        t_down = -jnp.log(sigma_down)
        stepped = jnp.exp(-t_down) / jnp.exp(-t) * base - jnp.expm1(t - t_down) * x0

        brownian_prev = state.brownian if state.brownian.shape == x.shape else jnp.zeros_like(x)
        if noise is not None:
            z = jnp.asarray(noise, jnp.float32)
            w1 = z * jnp.sqrt(sigma_from - sigma_to)
        else:
            if key is None:
                raise ValueError("DPMSolverSDEScheduler.step is stochastic: pass `key` or `noise`")
            fresh = jax.random.normal(key, x.shape, jnp.float32)
            mid = state.mid_point_sigma
            # Second step: W over [sigma_next, sigma] = W1 over [sigma_mid, sigma] + new W over [sigma_next, sigma_mid].
            w_second = brownian_prev + fresh * jnp.sqrt(jnp.maximum(mid - sigma_to, 0.0))
            w1 = fresh * jnp.sqrt(sigma_from - sigma_to)
            z = jnp.where(second, w_second, w1) / jnp.sqrt(sigma_from - sigma_to)
        stepped = stepped + z * s_noise * sigma_up
        prev = jnp.where(last, euler, stepped)

        started = ~second & ~last
        state = state.replace(
            sample=jnp.where(started, x, base),
            mid_point_sigma=jnp.where(started, sigma_to, state.mid_point_sigma),
            brownian=jnp.where(started, w1, brownian_prev),
            in_second_step=jnp.where(last, second, ~second),
            step_index=(i + 1).astype(jnp.int32),
        )
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state, original, noise, timesteps):
        return common.add_sigma_noise(state, original, noise, timesteps)
