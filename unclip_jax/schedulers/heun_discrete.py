"""Heun's second-order method in sigma (Karras et al. 2022, Alg. 1 without churn), as diffusers'
HeunDiscreteScheduler: every interval but the last takes two model calls (an Euler predictor, then the
trapezoidal corrector), so the schedule lists each inner timestep twice."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import _multistep as ms
from unclip_jax.schedulers import common
from unclip_jax.schedulers.euler_discrete import (
    add_sigma_noise,
    denoised,
    discrete_sigmas,
    init_noise_sigma_of,
    scale_by_sigma,
)


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
        ms.check_unsupported(self, "HeunDiscrete")
        ms.sigma_kind(self)


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


def interleave(x: np.ndarray, tail: bool = True) -> np.ndarray:
    """x0, x1, x1, x2, x2, ... (each entry after the first twice), with the last entry once more if
    `tail`: the second-order schedulers' layout of per-call tables."""
    parts = [x[:1], np.repeat(x[1:], 2)] + ([x[-1:]] if tail else [])
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class HeunDiscreteScheduler:
    config: HeunDiscreteConfig = HeunDiscreteConfig()
    order: ClassVar[int] = 2

    @classmethod
    def from_config(cls, config: dict | HeunDiscreteConfig | None = None, **overrides: Any) -> HeunDiscreteScheduler:
        if isinstance(config, HeunDiscreteConfig):
            return cls(dataclasses.replace(config, **overrides))
        return cls(common.config_from_dict(HeunDiscreteConfig, config, **overrides))

    def create_state(self, shape=None) -> HeunDiscreteState:
        return self.set_timesteps(None, self.config.num_train_timesteps, shape)

    def set_timesteps(self, state: HeunDiscreteState | None, num_inference_steps: int, shape=None) -> HeunDiscreteState:
        """`shape` (the sample's) fixes the saved predictor's shape, as a compiled loop needs."""
        ac = ms.schedule_alphas_cumprod(self.config)
        ts, sigmas, _ = discrete_sigmas(self.config, ac, num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        ts = interleave(np.asarray(ts), tail=False).astype(np.float32)
        return HeunDiscreteState(
            alphas_cumprod=jnp.asarray(ac),
            timesteps=jnp.asarray(ts),
            sigmas=jnp.asarray(sigmas),
            first_order=jnp.asarray(True),
            saved=jnp.zeros(ms.history_shape(2, shape), jnp.float32),
            dt=jnp.asarray(0.0, jnp.float32),
            step_index=jnp.asarray(-1, jnp.int32),
            begin_index=jnp.asarray(-1, jnp.int32),
            init_noise_sigma=jnp.asarray(init_noise_sigma_of(sigmas, self.config.timestep_spacing)),
        )

    def set_begin_index(self, state: HeunDiscreteState, begin_index: int = 0) -> HeunDiscreteState:
        return state.replace(begin_index=jnp.asarray(begin_index, jnp.int32))

    def scale_model_input(self, state: HeunDiscreteState, sample: jax.Array, timestep) -> jax.Array:
        return scale_by_sigma(sample, state.sigmas[ms.current_step_index(state, timestep)])

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
        saved = ms.history_for(state.saved, x)
        i = ms.current_step_index(state, timestep)
        first = state.first_order
        sigma = jnp.where(first, state.sigmas[i], ms.sigma_at(state.sigmas, i - 1))
        sigma_next = jnp.where(first, ms.sigma_at(state.sigmas, i + 1), state.sigmas[i])
        # The corrector evaluates the model at the predicted point, i.e. at sigma_next.
        x0 = denoised(c.prediction_type, out, x, jnp.where(first, sigma, sigma_next))
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
        return add_sigma_noise(state, original, noise, timesteps)
