"""Euler sampling with EDM preconditioning (Karras et al. 2022, Table 1 and Alg. 2), as diffusers'
EDMEulerScheduler: sigmas from the Karras (or exponential) schedule directly, model input scaled by
c_in, timestep c_noise = log(sigma) / 4, and x_0 = c_skip x + c_out F(x)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class EDMEulerConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rho: float = 7.0
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        if self.sigma_schedule not in ("karras", "exponential"):
            raise common.SchedulerConfigError(f"EDMEuler: sigma_schedule {self.sigma_schedule!r} is not supported")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise common.SchedulerConfigError(f"EDMEuler: prediction_type {self.prediction_type!r} is not supported")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise common.SchedulerConfigError(f"EDMEuler: final_sigmas_type {self.final_sigmas_type!r}")


@flax.struct.dataclass
class EDMEulerState:
    timesteps: jax.Array  # [n] float32, c_noise = log(sigma) / 4
    sigmas: jax.Array  # [n + 1] float32
    step_index: jax.Array  # [] int32, -1 before the first step
    begin_index: jax.Array  # [] int32, -1 unless set
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class EDMEulerScheduler(common.Scheduler):
    config: EDMEulerConfig = EDMEulerConfig()
    order: ClassVar[int] = 1

    def _sigmas(self, ramp: np.ndarray) -> np.ndarray:
        """sigma_max -> sigma_min along `ramp` in [0, 1] (float64 [n]), float32."""
        c = self.config
        if c.sigma_schedule == "karras":
            lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
            return ((hi + ramp * (lo - hi)) ** c.rho).astype(np.float32)
        # diffusers spaces log sigma in float32 here, whatever the ramp.
        logs = common.torch_linspace(math.log(c.sigma_min), math.log(c.sigma_max), len(ramp))
        return np.exp(logs)[::-1].astype(np.float32)

    def _state(self, sigmas: np.ndarray) -> EDMEulerState:
        c = self.config
        last = sigmas[-1] if c.final_sigmas_type == "sigma_min" else 0.0
        return EDMEulerState(
            timesteps=jnp.asarray((np.float32(0.25) * np.log(sigmas)).astype(np.float32)),
            sigmas=jnp.asarray(np.concatenate([sigmas, [last]]).astype(np.float32)),
            step_index=jnp.asarray(-1, jnp.int32),
            begin_index=jnp.asarray(-1, jnp.int32),
            init_noise_sigma=jnp.asarray((c.sigma_max**2 + 1) ** 0.5, jnp.float32),
        )

    def create_state(self, shape=None) -> EDMEulerState:
        T = self.config.num_train_timesteps
        return self._state(self._sigmas(np.arange(T + 1, dtype=np.float64) / T))

    def set_timesteps(self, state: EDMEulerState | None, num_inference_steps: int, shape=None) -> EDMEulerState:
        """`shape` is accepted like the multistep schedulers' (which size their history with it); unused here."""
        common.check_num_inference_steps(self.config, num_inference_steps, "EDMEulerScheduler")
        return self._state(self._sigmas(np.linspace(0, 1, num_inference_steps)))

    def precondition_outputs(self, sample: jax.Array, model_output: jax.Array, sigma) -> jax.Array:
        """x_0 = c_skip(sigma) x + c_out(sigma) F (Karras et al. 2022, eq. 7 and Table 1)."""
        sd = self.config.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, state: EDMEulerState, sample: jax.Array, timestep) -> jax.Array:
        """c_in x = x / sqrt(sigma^2 + sigma_data^2)."""
        sigma = state.sigmas[common.current_step_index(state, timestep)]
        c_in = 1 / (sigma**2 + self.config.sigma_data**2) ** 0.5
        return (sample.astype(jnp.float32) * c_in).astype(sample.dtype)

    def step(
        self,
        state: EDMEulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        pred_original_sample: jax.Array | None = None,
    ) -> common.SchedulerOutput:
        """One Euler step (with churn when `s_churn` > 0, which needs `key` or `noise`); a given
        `pred_original_sample` replaces the preconditioned model output."""
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        i = common.current_step_index(state, timestep)
        sigma = state.sigmas[i]
        x, sigma_hat = common.add_churn(x, sigma, state.sigmas.shape[0] - 1, key, noise, s_churn, s_tmin, s_tmax,
                                        s_noise)
        if pred_original_sample is None:
            x0 = self.precondition_outputs(x, out, sigma_hat)
        else:
            x0 = jnp.asarray(pred_original_sample, jnp.float32)
        prev = x + (x - x0) / sigma_hat * (state.sigmas[i + 1] - sigma_hat)
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state.replace(step_index=i + 1),
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: EDMEulerState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_sigma_noise(state, original, noise, timesteps)
