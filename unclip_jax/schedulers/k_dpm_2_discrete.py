"""DPM-Solver-2 in sigma (k-diffusion's `sample_dpm_2`, Karras et al. 2022 sec. 3), as diffusers'
KDPM2DiscreteScheduler: each interval [sigma_i, sigma_{i+1}] takes a half step to the log-midpoint
sigma_int = sqrt(sigma_i sigma_{i+1}), evaluates the model there, and redoes the full step with that slope.
The schedule interleaves the midpoint timesteps with the regular ones."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class KDPM2DiscreteConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        common.check_unsupported(self, "KDPM2Discrete")
        if self.prediction_type == "sample":  # diffusers raises NotImplementedError at the step
            raise common.SchedulerConfigError("KDPM2Discrete: prediction_type 'sample' is not supported")


@flax.struct.dataclass
class KDPM2DiscreteState:
    alphas_cumprod: jax.Array  # [T] float32
    timesteps: jax.Array  # [2n - 1] float32: t0, t_mid1, t1, t_mid2, t2, ...
    sigmas: jax.Array  # [2n + 2] float32, interleaved
    sigmas_interpol: jax.Array  # [2n + 2] float32, the log-midpoints, interleaved
    first_order: jax.Array  # [] bool: the next call starts an interval
    saved: jax.Array  # [1, ...] float32: the sample at the interval's start
    step_index: jax.Array  # [] int32, -1 before the first step
    begin_index: jax.Array  # [] int32, -1 unless set
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class KDPM2DiscreteScheduler(common.Scheduler):
    config: KDPM2DiscreteConfig = KDPM2DiscreteConfig()
    order: ClassVar[int] = 2

    def create_state(self, shape=None) -> KDPM2DiscreteState:
        return self.set_timesteps(None, self.config.num_train_timesteps, shape)

    def set_timesteps(self, state, num_inference_steps: int, shape=None) -> KDPM2DiscreteState:
        """`shape` (the sample's) fixes the saved sample's shape, as a compiled loop needs."""
        common.check_num_inference_steps(self.config, num_inference_steps, "KDPM2DiscreteScheduler")
        c = self.config
        ac, ts, sigmas, log_sigmas = common.kdpm2_sigmas(c, num_inference_steps)
        mids = common.log_midpoints(sigmas, np.roll(sigmas, 1))
        ts_mid = common.sigma_to_t(mids, log_sigmas)
        ts = np.concatenate([ts[:1], np.stack([ts_mid[1:-1], ts[1:]], axis=-1).reshape(-1)]).astype(np.float32)
        return KDPM2DiscreteState(
            alphas_cumprod=jnp.asarray(ac),
            timesteps=jnp.asarray(ts),
            sigmas=jnp.asarray(common.interleave(sigmas)),
            sigmas_interpol=jnp.asarray(common.interleave(mids)),
            first_order=jnp.asarray(True),
            saved=jnp.zeros(common.history_shape(1, shape), jnp.float32),
            step_index=jnp.asarray(-1, jnp.int32),
            begin_index=jnp.asarray(-1, jnp.int32),
            init_noise_sigma=jnp.asarray(common.init_noise_sigma_of(common.interleave(sigmas), c.timestep_spacing)),
        )

    def scale_model_input(self, state: KDPM2DiscreteState, sample: jax.Array, timestep) -> jax.Array:
        i = common.current_step_index(state, timestep)
        return common.scale_by_sigma(sample, jnp.where(state.first_order, state.sigmas[i], state.sigmas_interpol[i]))

    def step(
        self,
        state: KDPM2DiscreteState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> common.SchedulerOutput:
        """The midpoint call or the full-step call, as the state says (deterministic)."""
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        saved = common.history_for(state.saved, x)
        i = common.current_step_index(state, timestep)
        first = state.first_order
        sigma = jnp.where(first, state.sigmas[i], common.sigma_at(state.sigmas, i - 1))
        sigma_mid = jnp.where(first, common.sigma_at(state.sigmas_interpol, i + 1), state.sigmas_interpol[i])
        sigma_next = jnp.where(first, common.sigma_at(state.sigmas, i + 1), state.sigmas[i])
        x0 = common.denoised(self.config.prediction_type, out, x, jnp.where(first, sigma, sigma_mid))
        # First call: Euler to the midpoint. Second: the full step from the saved start with the slope
        # evaluated at the midpoint.
        half = x + (x - x0) / sigma * (sigma_mid - sigma)
        full = saved[0] + (x - x0) / sigma_mid * (sigma_next - sigma)
        prev = jnp.where(first, half, full)
        new_state = state.replace(first_order=jnp.logical_not(first), saved=jnp.where(first, x[None], saved),
                                  step_index=i + 1)
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=new_state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: KDPM2DiscreteState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_sigma_noise(state, original, noise, timesteps)
