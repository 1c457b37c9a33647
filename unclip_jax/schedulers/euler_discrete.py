"""Euler sampling of the probability-flow ODE in sigma (Karras et al. 2022, Alg. 2, with optional churn),
as diffusers' EulerDiscreteScheduler.

This file also holds the host-side sigma schedule that the k-diffusion family (Euler, Euler ancestral,
LMS, Heun, KDPM2) shares: timesteps from `timestep_spacing`, sigma = sqrt((1 - abar) / abar) interpolated
at them, optionally respaced (Karras / exponential / beta) with timesteps mapped back from sigma.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import _multistep as ms
from unclip_jax.schedulers import common


def discrete_sigmas(config: Any, alphas_cumprod: np.ndarray, n: int, *, sigma_min=None, sigma_max=None,
                    log_linear: bool = False):
    """(timesteps float64 [n], sigmas float64 descending, log of the training sigmas float32 [T]) for a
    k-diffusion-style config with `timestep_spacing`, `steps_offset` and the `use_*_sigmas` flags.

    Sigmas are interpolated at the timesteps, or with `log_linear` spaced evenly in log sigma over the
    whole training range (n + 1 of them, as diffusers' Euler keeps), before any respacing.
    """
    ts = common.inference_timesteps(config.timestep_spacing, config.num_train_timesteps, n,
                                    config.steps_offset, round_linspace=False).astype(np.float32)
    train = ms.train_sigmas(alphas_cumprod)
    log_sigmas = np.log(train)
    if log_linear:
        sigmas = np.exp(np.linspace(log_sigmas[-1], log_sigmas[0], n + 1).astype(np.float32))
    else:
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
    kind = ms.sigma_kind(config)
    if kind is not None:
        sigmas = ms.respaced_sigmas(kind, sigmas, n, sigma_min, sigma_max)
        ts = common.sigma_to_t(sigmas, log_sigmas)
    return ts, sigmas, log_sigmas


def init_noise_sigma_of(sigmas: np.ndarray, spacing: str) -> np.ndarray:
    """The std of the initial latent: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (whose
    first timestep is below T - 1, so diffusers treats the start as variance preserving)."""
    top = np.float32(np.max(sigmas))
    if spacing in ("linspace", "trailing"):
        return top
    return np.float32((top**2 + np.float32(1)) ** np.float32(0.5))


def denoised(prediction_type: str, model_output, sample, sigma, sigma_out=None):
    """x_0 from the model output of a sigma-parameterised model whose input was scaled by
    1 / sqrt(sigma^2 + 1). `sigma_out` is the sigma the epsilon form uses when it differs (churn)."""
    if prediction_type == "epsilon":
        return sample - (sigma if sigma_out is None else sigma_out) * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise common.SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def add_sigma_noise(state: Any, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """x_0 + sigma eps at the sigma of each timestep (or of the begin / current step, as diffusers picks)."""
    sigma = common.broadcast_to_sample(state.sigmas[ms.noise_indices(state, timesteps)], original)
    return (original + noise * sigma).astype(original.dtype)


def scale_by_sigma(sample: jax.Array, sigma: jax.Array) -> jax.Array:
    """x / sqrt(sigma^2 + 1): the model sees a unit-variance input (Karras et al. 2022, c_in)."""
    return (sample.astype(jnp.float32) / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)


def add_churn(x, sigma, num_steps: int, key, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022, Alg. 2 lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma by
    adding fresh noise, gamma = min(s_churn / num_steps, sqrt 2 - 1) inside [s_tmin, s_tmax]. Returns
    (x_hat, sigma_hat); a Python `s_churn` of 0 is a no-op that needs no noise."""
    if isinstance(s_churn, (int, float)) and s_churn == 0:
        return x, sigma
    gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), jnp.minimum(s_churn / num_steps, 2**0.5 - 1), 0.0)
    sigma_hat = sigma * (gamma + 1)
    eps = ms.gaussian(key, noise, x.shape, "a step with s_churn > 0") * s_noise
    return jnp.where(gamma > 0, x + eps * jnp.sqrt(sigma_hat**2 - sigma**2), x), sigma_hat


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
        ms.check_unsupported(self, "EulerDiscrete")
        ms.sigma_kind(self)
        if self.interpolation_type not in ("linear", "log_linear"):
            raise common.SchedulerConfigError(f"EulerDiscrete: interpolation_type {self.interpolation_type!r}")
        if self.timestep_type not in ("discrete", "continuous"):
            raise common.SchedulerConfigError(f"EulerDiscrete: timestep_type {self.timestep_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise common.SchedulerConfigError(f"EulerDiscrete: final_sigmas_type {self.final_sigmas_type!r}")


# Euler's state is shared by the schedulers whose step needs only the sigma table (Euler ancestral, EDM).
@flax.struct.dataclass
class EulerDiscreteState:
    alphas_cumprod: jax.Array  # [T] float32
    timesteps: jax.Array  # [n] float32, what the model is called with
    sigmas: jax.Array  # [n + 1] float32, the last one the end of the final step
    step_index: jax.Array  # [] int32, -1 before the first step
    begin_index: jax.Array  # [] int32, -1 unless set
    init_noise_sigma: jax.Array  # []


def euler_state(alphas_cumprod, timesteps, sigmas, spacing: str) -> EulerDiscreteState:
    """A fresh state (no step taken, no begin index) for the given host tables."""
    sigmas = np.asarray(sigmas, np.float32)
    return EulerDiscreteState(
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        timesteps=jnp.asarray(np.asarray(timesteps).astype(np.float32)),
        sigmas=jnp.asarray(sigmas),
        step_index=jnp.asarray(-1, jnp.int32),
        begin_index=jnp.asarray(-1, jnp.int32),
        init_noise_sigma=jnp.asarray(init_noise_sigma_of(sigmas, spacing)),
    )


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler:
    config: EulerDiscreteConfig = EulerDiscreteConfig()
    order: ClassVar[int] = 1

    @classmethod
    def from_config(cls, config: dict | EulerDiscreteConfig | None = None, **overrides: Any) -> EulerDiscreteScheduler:
        if isinstance(config, EulerDiscreteConfig):
            return cls(dataclasses.replace(config, **overrides))
        return cls(common.config_from_dict(EulerDiscreteConfig, config, **overrides))

    @property
    def _continuous(self) -> bool:
        # v-prediction models trained on continuous time (e.g. SD x4 upscaler) take c_noise = log(sigma) / 4.
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def _state(self, ac, ts, sigmas) -> EulerDiscreteState:
        if self._continuous:
            ts = 0.25 * np.log(np.asarray(sigmas, np.float32)[:-1])
        return euler_state(ac, ts, sigmas, self.config.timestep_spacing)

    def create_state(self, shape=None) -> EulerDiscreteState:
        ac = ms.schedule_alphas_cumprod(self.config)
        T = self.config.num_train_timesteps
        sigmas = np.concatenate([ms.train_sigmas(ac)[::-1], [0.0]])
        return self._state(ac, np.arange(T - 1, -1, -1, dtype=np.float64), sigmas)

    def set_timesteps(self, state: EulerDiscreteState, num_inference_steps: int, shape=None) -> EulerDiscreteState:
        """`shape` is accepted like the multistep schedulers' (which size their history with it); unused here."""
        c = self.config
        ac = ms.schedule_alphas_cumprod(c)
        ts, sigmas, _ = discrete_sigmas(c, ac, num_inference_steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                                        log_linear=c.interpolation_type == "log_linear")
        # "sigma_min" ends on the smallest training sigma instead of 0.
        last = ms.train_sigmas(ac)[0] if c.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return self._state(ac, ts, sigmas)

    def set_begin_index(self, state: EulerDiscreteState, begin_index: int = 0) -> EulerDiscreteState:
        return state.replace(begin_index=jnp.asarray(begin_index, jnp.int32))

    def scale_model_input(self, state: EulerDiscreteState, sample: jax.Array, timestep) -> jax.Array:
        return scale_by_sigma(sample, state.sigmas[ms.current_step_index(state, timestep)])

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
        i = ms.current_step_index(state, timestep)
        sigma = state.sigmas[i]
        x, sigma_hat = add_churn(x, sigma, state.sigmas.shape[0] - 1, key, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoised(self.config.prediction_type, out, x, sigma, sigma_out=sigma_hat)
        derivative = (x - x0) / sigma_hat
        prev = x + derivative * (state.sigmas[i + 1] - sigma_hat)
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state.replace(step_index=i + 1),
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: EulerDiscreteState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return add_sigma_noise(state, original, noise, timesteps)

    def get_velocity(self, state: EulerDiscreteState, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """diffusers indexes alpha_bar by the timesteps' schedule positions here (not by the timesteps)."""
        idx = jax.vmap(lambda t: ms.index_for_timestep(state.timesteps, t))(jnp.atleast_1d(jnp.asarray(timesteps)))
        return common.get_velocity(state.alphas_cumprod, sample, noise, idx)
