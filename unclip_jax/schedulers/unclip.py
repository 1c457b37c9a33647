"""The Karlo/unCLIP ancestral sampler (Ramesh et al. 2022), as diffusers' UnCLIPScheduler: DDPM on the
cosine schedule, with strided steps whose previous timestep the caller passes, and the
`fixed_small_log` (prior) and `learned_range` (decoder, Nichol & Dhariwal 2021) variances."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class UnCLIPConfig:
    num_train_timesteps: int = 1000
    variance_type: str = "fixed_small_log"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self):
        if self.beta_schedule != "squaredcos_cap_v2":
            raise common.SchedulerConfigError(
                f"UnCLIP: beta_schedule {self.beta_schedule!r} is not supported (only 'squaredcos_cap_v2')")
        if self.variance_type not in ("fixed_small_log", "learned_range"):
            raise common.SchedulerConfigError(f"UnCLIP: variance_type {self.variance_type!r} is not supported")
        if self.prediction_type not in ("epsilon", "sample"):
            raise common.SchedulerConfigError(f"UnCLIP: prediction_type {self.prediction_type!r} is not supported")


@flax.struct.dataclass
class UnCLIPState:
    betas: jax.Array  # [T] float32
    alphas_cumprod: jax.Array  # [T] float32
    timesteps: jax.Array  # [n] int32, descending
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class UnCLIPScheduler(common.Scheduler):
    config: UnCLIPConfig = UnCLIPConfig()
    order: ClassVar[int] = 1

    def create_state(self, shape=None) -> UnCLIPState:
        T = self.config.num_train_timesteps
        betas = common.alpha_bar_betas(T)
        return UnCLIPState(
            betas=jnp.asarray(betas),
            alphas_cumprod=jnp.asarray(common.alphas_cumprod_of(betas)),
            timesteps=jnp.arange(T - 1, -1, -1, dtype=jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        )

    def set_timesteps(self, state: UnCLIPState, num_inference_steps: int, shape=None) -> UnCLIPState:
        """n timesteps from T-1 down to 0 inclusive, evenly strided (needs n >= 2, as in diffusers); `shape` is
        accepted like the multistep schedulers' and unused."""
        common.check_num_inference_steps(self.config, num_inference_steps, "UnCLIPScheduler")
        if num_inference_steps < 2:
            raise ValueError("UnCLIPScheduler needs num_inference_steps >= 2 (its stride is (T - 1) / (n - 1))")
        ratio = (self.config.num_train_timesteps - 1) / (num_inference_steps - 1)
        ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64)
        return state.replace(timesteps=jnp.asarray(ts, jnp.int32))

    def set_begin_index(self, state: UnCLIPState, begin_index: int = 0) -> UnCLIPState:
        """A no-op: the step is fully determined by (timestep, prev_timestep)."""
        return state

    def scale_model_input(self, state: UnCLIPState, sample: jax.Array, timestep=None) -> jax.Array:
        return sample

    def previous_timestep(self, state: UnCLIPState, i) -> jax.Array:
        """What the Karlo pipeline passes as `prev_timestep` at loop index i: the next scheduled timestep,
        or t - 1 (its `None`) at the last step."""
        n = state.timesteps.shape[0]
        i = jnp.asarray(i, jnp.int32)
        return jnp.where(i + 1 < n, state.timesteps[jnp.minimum(i + 1, n - 1)], state.timesteps[i] - 1)

    def step(
        self,
        state: UnCLIPState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        prev_timestep=None,
    ) -> common.SchedulerOutput:
        """x_t -> x_prev for an arbitrary earlier `prev_timestep` (default t - 1). `key` or `noise` is
        needed (noise is added whenever t > 0)."""
        c = self.config
        x = sample.astype(jnp.float32)
        out, predicted_variance = common.split_learned_variance(model_output.astype(jnp.float32), x, c.variance_type)
        t = jnp.asarray(timestep, jnp.int32)
        prev_t = t - 1 if prev_timestep is None else jnp.asarray(prev_timestep, jnp.int32)
        abar_t = state.alphas_cumprod[t]
        abar_prev = jnp.where(prev_t >= 0, state.alphas_cumprod[jnp.maximum(prev_t, 0)], 1.0)
        # A unit stride uses the table's beta_t; a longer one the beta of the combined jump.
        beta = jnp.where(prev_t == t - 1, state.betas[t], 1 - abar_t / abar_prev)
        alpha = jnp.where(prev_t == t - 1, 1 - state.betas[t], 1 - beta)
        x0 = common.data_prediction(c.prediction_type, out, x, jnp.sqrt(abar_t), jnp.sqrt(1 - abar_t))
        x0 = common.limit_pred_original(x0, c)
        mean, std = common.ancestral_posterior(x0, x, abar_t, abar_prev, alpha, beta, c.variance_type,
                                               predicted_variance)
        z = common.gaussian(key, noise, x.shape, "UnCLIP")
        prev = mean + jnp.where(t > 0, std * z, 0.0)
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: UnCLIPState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_noise(state.alphas_cumprod, original, noise, timesteps)
