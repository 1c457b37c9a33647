"""Heun's second-order method in sigma (Karras et al. 2022, Alg. 1 without churn), as diffusers'
HeunDiscreteScheduler: every interval but the last takes two model calls (an Euler predictor, then the
trapezoidal corrector), so the schedule lists each inner timestep twice."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class HeunDiscreteConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        common.check_unsupported(self, "HeunDiscrete")


@flax.struct.dataclass
class HeunDiscreteState:
    alphas_cumprod: jax.Array  # [T] float32
    timesteps: jax.Array  # [2n - 1] float32
    sigmas: jax.Array  # [2n] float32: s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0
    first_order: jax.Array  # [] bool: the next call is a predictor
    saved: jax.Array  # [2, ...] float32: (predictor derivative, sample at the interval's start)
    dt: jax.Array  # [] float32, the interval's sigma step
    step_index: jax.Array  # [] int32, -1 before the first step
    begin_index: jax.Array  # [] int32, -1 unless set
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class HeunDiscreteScheduler(common.Scheduler):
    config: HeunDiscreteConfig = HeunDiscreteConfig()
    order: ClassVar[int] = 2

    def create_state(self, shape=None) -> HeunDiscreteState:
        return self.set_timesteps(None, self.config.num_train_timesteps, shape)

    def set_timesteps(self, state: HeunDiscreteState | None, num_inference_steps: int, shape=None) -> HeunDiscreteState:
        """`shape` (the sample's) fixes the saved predictor's shape, as a compiled loop needs."""
        common.check_num_inference_steps(self.config, num_inference_steps, "HeunDiscreteScheduler")
        ac = common.train_alphas_cumprod(self.config)
        ts, sigmas, _ = common.discrete_sigmas(self.config, ac, num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        ts = common.interleave(np.asarray(ts), tail=False).astype(np.float32)
        return HeunDiscreteState(
            alphas_cumprod=jnp.asarray(ac),
            timesteps=jnp.asarray(ts),
            sigmas=jnp.asarray(sigmas),
            first_order=jnp.asarray(True),
            saved=jnp.zeros(common.history_shape(2, shape), jnp.float32),
            dt=jnp.asarray(0.0, jnp.float32),
            step_index=jnp.asarray(-1, jnp.int32),
            begin_index=jnp.asarray(-1, jnp.int32),
            init_noise_sigma=jnp.asarray(common.init_noise_sigma_of(sigmas, self.config.timestep_spacing)),
        )

    def scale_model_input(self, state: HeunDiscreteState, sample: jax.Array, timestep) -> jax.Array:
        return common.scale_by_sigma(sample, state.sigmas[common.current_step_index(state, timestep)])

    def step(
        self,
        state: HeunDiscreteState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> common.SchedulerOutput:
        """A predictor or corrector call, as the state says (deterministic)."""
        c = self.config
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        saved = common.history_for(state.saved, x)
        i = common.current_step_index(state, timestep)
        first = state.first_order
        sigma = jnp.where(first, state.sigmas[i], common.sigma_at(state.sigmas, i - 1))
        sigma_next = jnp.where(first, common.sigma_at(state.sigmas, i + 1), state.sigmas[i])
        # The corrector evaluates the model at the predicted point, i.e. at sigma_next.
        x0 = common.denoised(c.prediction_type, out, x, jnp.where(first, sigma, sigma_next))
        if c.clip_sample:
            x0 = jnp.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        d_pred = (x - x0) / sigma
        dt_pred = sigma_next - sigma
        d_corr = (saved[0] + (x - x0) / sigma_next) / 2
        prev = jnp.where(first, x + d_pred * dt_pred, saved[1] + d_corr * state.dt)
        new_state = state.replace(
            first_order=jnp.logical_not(first),
            saved=jnp.where(first, jnp.stack([d_pred, x]), saved),
            dt=jnp.where(first, dt_pred, state.dt),
            step_index=i + 1,
        )
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=new_state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: HeunDiscreteState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_sigma_noise(state, original, noise, timesteps)
