"""DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler, including the learned-variance
parameterisation of Nichol & Dhariwal 2021 (`learned_range`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from unclip_jax.schedulers import common

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


@dataclasses.dataclass(frozen=True)
class DDPMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise common.SchedulerConfigError(f"DDPM: prediction_type {self.prediction_type!r} is not supported")
        # fixed_large_log takes the square root of log(beta) < 0 in diffusers (NaN); not offered.
        if self.variance_type not in VARIANCE_TYPES:
            raise common.SchedulerConfigError(f"DDPM: variance_type {self.variance_type!r} is not supported")
        schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
        if self.beta_schedule not in schedules and self.trained_betas is None:
            raise common.SchedulerConfigError(f"DDPM: beta_schedule {self.beta_schedule!r} is not supported")
        if self.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise common.SchedulerConfigError(f"DDPM: timestep_spacing {self.timestep_spacing!r} is not supported")


@flax.struct.dataclass
class DDPMState:
    alphas_cumprod: jax.Array  # [T] float32
    timesteps: jax.Array  # [n] int32, descending
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(common.Scheduler):
    config: DDPMConfig = DDPMConfig()
    order: ClassVar[int] = 1

    def create_state(self, shape=None) -> DDPMState:
        c = self.config
        ac = common.train_alphas_cumprod(c)
        return DDPMState(
            alphas_cumprod=jnp.asarray(ac),
            timesteps=jnp.arange(c.num_train_timesteps - 1, -1, -1, dtype=jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        )

    def set_timesteps(self, state: DDPMState, num_inference_steps: int, shape=None) -> DDPMState:
        """`shape` is accepted like the multistep schedulers' (which size their history with it); unused here."""
        common.check_num_inference_steps(self.config, num_inference_steps, "DDPMScheduler")
        return state.replace(timesteps=jnp.asarray(common.integer_timesteps(self.config, num_inference_steps)))

    def set_begin_index(self, state: DDPMState, begin_index: int = 0) -> DDPMState:
        """A no-op: DDPM finds its place from the timestep alone (diffusers has no begin index here)."""
        return state

    def scale_model_input(self, state: DDPMState, sample: jax.Array, timestep=None) -> jax.Array:
        return sample

    def previous_timestep(self, state: DDPMState, timestep) -> jax.Array:
        """The schedule entry after `timestep` (its first occurrence), -1 after the last."""
        t = jnp.asarray(timestep, jnp.int32)
        i = jnp.argmax(state.timesteps == t)
        n = state.timesteps.shape[0]
        return jnp.where(i + 1 < n, state.timesteps[jnp.minimum(i + 1, n - 1)], -1)

    def step(
        self,
        state: DDPMState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> common.SchedulerOutput:
        """One ancestral step x_t -> x_{t-1} (Ho et al. 2020, eqs. 6-7); noise is added when t > 0, so
        `key` or `noise` is always needed (the traced t is not known at trace time)."""
        c = self.config
        x = sample.astype(jnp.float32)
        out, predicted_variance = common.split_learned_variance(model_output.astype(jnp.float32), x, c.variance_type)
        t = jnp.asarray(timestep, jnp.int32)
        prev_t = self.previous_timestep(state, t)
        abar_t = state.alphas_cumprod[t]
        abar_prev = jnp.where(prev_t >= 0, state.alphas_cumprod[jnp.maximum(prev_t, 0)], 1.0)
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        x0 = common.data_prediction(c.prediction_type, out, x, jnp.sqrt(abar_t), jnp.sqrt(1 - abar_t))
        x0 = common.limit_pred_original(x0, c)
        mean, std = common.ancestral_posterior(x0, x, abar_t, abar_prev, alpha_t, beta_t, c.variance_type,
                                               predicted_variance)
        z = common.gaussian(key, noise, x.shape, "DDPM")
        prev = mean + jnp.where(t > 0, std * z, 0.0)
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: DDPMState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_noise(state.alphas_cumprod, original, noise, timesteps)

    def get_velocity(self, state: DDPMState, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.get_velocity(state.alphas_cumprod, sample, noise, timesteps)
