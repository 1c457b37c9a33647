"""DDIM (Song et al. 2021): the non-Markovian sampler with eta-controlled noise, as diffusers' DDIMScheduler.

The schedule is integer timesteps into the training alpha_bar table; `step` looks everything up from the
traced timestep, so it needs no step counter.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise common.SchedulerConfigError(f"DDIM: prediction_type {self.prediction_type!r} is not supported")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and self.trained_betas is None:
            raise common.SchedulerConfigError(f"DDIM: beta_schedule {self.beta_schedule!r} is not supported")
        if self.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise common.SchedulerConfigError(f"DDIM: timestep_spacing {self.timestep_spacing!r} is not supported")


@flax.struct.dataclass
class DDIMState:
    alphas_cumprod: jax.Array  # [T] float32
    final_alpha_cumprod: jax.Array  # [] abar used past the last step
    timesteps: jax.Array  # [n] int32, descending
    step_ratio: jax.Array  # [] int32: T // n, the stride diffusers subtracts for the previous timestep
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(common.Scheduler):
    config: DDIMConfig = DDIMConfig()
    order: ClassVar[int] = 1

    def create_state(self, shape=None) -> DDIMState:
        c = self.config
        ac = common.train_alphas_cumprod(c)
        return DDIMState(
            alphas_cumprod=jnp.asarray(ac),
            final_alpha_cumprod=jnp.asarray(1.0 if c.set_alpha_to_one else ac[0], jnp.float32),
            timesteps=jnp.arange(c.num_train_timesteps - 1, -1, -1, dtype=jnp.int32),
            step_ratio=jnp.asarray(1, jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        )

    def set_timesteps(self, state: DDIMState, num_inference_steps: int, shape=None) -> DDIMState:
        """`shape` is accepted like the multistep schedulers' (which size their history with it); unused here."""
        common.check_num_inference_steps(self.config, num_inference_steps, "DDIMScheduler")
        c = self.config
        return state.replace(
            timesteps=jnp.asarray(common.integer_timesteps(c, num_inference_steps)),
            step_ratio=jnp.asarray(c.num_train_timesteps // num_inference_steps, jnp.int32),
        )

    def set_begin_index(self, state: DDIMState, begin_index: int = 0) -> DDIMState:
        """A no-op: DDIM finds its place from the timestep alone (diffusers has no begin index here)."""
        return state

    def scale_model_input(self, state: DDIMState, sample: jax.Array, timestep=None) -> jax.Array:
        return sample

    def _alphas(self, state: DDIMState, timestep):
        t = jnp.asarray(timestep, jnp.int32)
        # diffusers steps back by T // n whatever the spacing; past 0 it uses the final alpha_bar.
        prev_t = t - state.step_ratio
        abar_t = state.alphas_cumprod[t]
        abar_prev = jnp.where(prev_t >= 0, state.alphas_cumprod[jnp.maximum(prev_t, 0)], state.final_alpha_cumprod)
        return abar_t, abar_prev

    def step(
        self,
        state: DDIMState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
    ) -> common.SchedulerOutput:
        """One DDIM update (Song et al. 2021, eq. 12). `noise` plays diffusers' `variance_noise`; it or
        `key` is needed unless `eta` is the Python number 0."""
        c = self.config
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        abar_t, abar_prev = self._alphas(state, timestep)
        alpha, sigma = jnp.sqrt(abar_t), jnp.sqrt(1 - abar_t)
        x0 = common.data_prediction(c.prediction_type, out, x, alpha, sigma)
        eps = common.noise_prediction(c.prediction_type, out, x, alpha, sigma)
        x0 = common.limit_pred_original(x0, c)
        # sigma_t(eta)^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev), eq. 16.
        variance = ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)
        std = eta * jnp.sqrt(variance)
        if use_clipped_model_output:
            eps = (x - alpha * x0) / sigma
        prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev - std**2) * eps
        if not (isinstance(eta, (int, float)) and eta == 0):
            prev = prev + std * common.gaussian(key, noise, x.shape, "DDIM with eta > 0")
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: DDIMState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_noise(state.alphas_cumprod, original, noise, timesteps)

    def get_velocity(self, state: DDIMState, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.get_velocity(state.alphas_cumprod, sample, noise, timesteps)
