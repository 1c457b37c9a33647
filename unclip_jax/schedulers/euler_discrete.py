"""Euler sampling of the probability-flow ODE in sigma (Karras et al. 2022, Alg. 2, with optional churn),
as diffusers' EulerDiscreteScheduler.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class EulerDiscreteConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        common.check_unsupported(self, "EulerDiscrete")
        if self.interpolation_type not in ("linear", "log_linear"):
            raise common.SchedulerConfigError(f"EulerDiscrete: interpolation_type {self.interpolation_type!r}")
        if self.timestep_type not in ("discrete", "continuous"):
            raise common.SchedulerConfigError(f"EulerDiscrete: timestep_type {self.timestep_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise common.SchedulerConfigError(f"EulerDiscrete: final_sigmas_type {self.final_sigmas_type!r}")


EulerDiscreteState = common.SigmaState


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(common.Scheduler):
    config: EulerDiscreteConfig = EulerDiscreteConfig()
    order: ClassVar[int] = 1

    @property
    def _continuous(self) -> bool:
        # v-prediction models trained on continuous time (e.g. SD x4 upscaler) take c_noise = log(sigma) / 4.
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def _state(self, ac, ts, sigmas) -> EulerDiscreteState:
        if self._continuous:
            ts = 0.25 * np.log(np.asarray(sigmas, np.float32)[:-1])
        return common.sigma_state(ac, ts, sigmas, self.config.timestep_spacing)

    def create_state(self, shape=None) -> EulerDiscreteState:
        ac = common.train_alphas_cumprod(self.config, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        T = self.config.num_train_timesteps
        sigmas = np.concatenate([common.train_sigmas(ac)[::-1], [0.0]])
        return self._state(ac, np.arange(T - 1, -1, -1, dtype=np.float64), sigmas)

    def set_timesteps(self, state: EulerDiscreteState, num_inference_steps: int, shape=None) -> EulerDiscreteState:
        """`shape` is accepted like the multistep schedulers' (which size their history with it); unused here."""
        common.check_num_inference_steps(self.config, num_inference_steps, "EulerDiscreteScheduler")
        c = self.config
        ac = common.train_alphas_cumprod(c, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        ts, sigmas, _ = common.discrete_sigmas(c, ac, num_inference_steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                                        log_linear=c.interpolation_type == "log_linear")
        # "sigma_min" ends on the smallest training sigma instead of 0.
        last = common.train_sigmas(ac)[0] if c.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return self._state(ac, ts, sigmas)

    def scale_model_input(self, state: EulerDiscreteState, sample: jax.Array, timestep) -> jax.Array:
        return common.scale_by_sigma(sample, state.sigmas[common.current_step_index(state, timestep)])

    def step(
        self,
        state: EulerDiscreteState,
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
    ) -> common.SchedulerOutput:
        """One Euler step from sigma_i to sigma_{i+1}; with `s_churn` > 0 the sample is first pushed up to
        sigma_hat = sigma (1 + gamma) with fresh noise (needs `key` or `noise`)."""
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        i = common.current_step_index(state, timestep)
        sigma = state.sigmas[i]
        x, sigma_hat = common.add_churn(x, sigma, state.sigmas.shape[0] - 1, key, noise, s_churn, s_tmin, s_tmax,
                                        s_noise)
        x0 = common.denoised(self.config.prediction_type, out, x, sigma, sigma_out=sigma_hat)
        derivative = (x - x0) / sigma_hat
        prev = x + derivative * (state.sigmas[i + 1] - sigma_hat)
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state.replace(step_index=i + 1),
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: EulerDiscreteState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_sigma_noise(state, original, noise, timesteps)

    def get_velocity(self, state: EulerDiscreteState, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """diffusers indexes alpha_bar by the timesteps' schedule positions here (not by the timesteps)."""
        idx = jax.vmap(lambda t: common.index_for_timestep(state.timesteps, t))(jnp.atleast_1d(jnp.asarray(timesteps)))
        return common.get_velocity(state.alphas_cumprod, sample, noise, idx)
