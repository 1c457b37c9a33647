"""Ancestral Euler sampling (k-diffusion's `sample_euler_ancestral`), as diffusers'
EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise of std sigma_up, with
sigma_down^2 + sigma_up^2 = sigma_next^2."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common

EulerAncestralDiscreteState = common.SigmaState


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        common.check_unsupported(self, "EulerAncestralDiscrete")
        if self.prediction_type == "sample":  # diffusers raises NotImplementedError at the step
            raise common.SchedulerConfigError("EulerAncestralDiscrete: prediction_type 'sample' is not supported")


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(common.Scheduler):
    config: EulerAncestralDiscreteConfig = EulerAncestralDiscreteConfig()
    order: ClassVar[int] = 1

    def create_state(self, shape=None) -> EulerAncestralDiscreteState:
        ac = common.train_alphas_cumprod(self.config, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        T = self.config.num_train_timesteps
        sigmas = np.concatenate([common.train_sigmas(ac)[::-1], [0.0]])
        return common.sigma_state(ac, np.arange(T - 1, -1, -1), sigmas, self.config.timestep_spacing)

    def set_timesteps(self, state: EulerAncestralDiscreteState, num_inference_steps: int,
                      shape=None) -> EulerAncestralDiscreteState:
        """`shape` is accepted like the multistep schedulers' (which size their history with it); unused here."""
        common.check_num_inference_steps(self.config, num_inference_steps, "EulerAncestralDiscreteScheduler")
        ac = common.train_alphas_cumprod(self.config, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        ts, sigmas, _ = common.discrete_sigmas(self.config, ac, num_inference_steps)
        return common.sigma_state(ac, ts, np.concatenate([sigmas, [0.0]]), self.config.timestep_spacing)

    def scale_model_input(self, state: EulerAncestralDiscreteState, sample: jax.Array, timestep) -> jax.Array:
        return common.scale_by_sigma(sample, state.sigmas[common.current_step_index(state, timestep)])

    def step(
        self,
        state: EulerAncestralDiscreteState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> common.SchedulerOutput:
        """Needs `key` or `noise` at every step (the last one adds zero-std noise, as diffusers draws it)."""
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        i = common.current_step_index(state, timestep)
        sigma, sigma_to = state.sigmas[i], state.sigmas[i + 1]
        x0 = common.denoised(self.config.prediction_type, out, x, sigma)
        sigma_up = jnp.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = jnp.sqrt(sigma_to**2 - sigma_up**2)
        prev = x + (x - x0) / sigma * (sigma_down - sigma)
        prev = prev + common.gaussian(key, noise, x.shape, "EulerAncestral") * sigma_up
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state.replace(step_index=i + 1),
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: EulerAncestralDiscreteState, original: jax.Array, noise: jax.Array,
                  timesteps) -> jax.Array:
        return common.add_sigma_noise(state, original, noise, timesteps)
