"""What the sigma-parameterised solvers share (DPM-Solver multistep / singlestep, DEIS, UniPC, DPM-Solver SDE).

These schedulers work on a table `sigmas[i]` (noise-to-signal ratio, sigma = sqrt((1 - abar) / abar)) with one
extra entry for the end of the last step, and keep a `step_index` in their state as diffusers does. Host-side
helpers (numpy) build the tables; the rest is jnp and traceable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


# ----------------------------------------------------------------------------------------------- host side

def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma of every training timestep, float32 [T]."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return (((1 - ac) / ac) ** np.float32(0.5)).astype(np.float32)


def train_lambdas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Half log-SNR lambda_t = log(alpha_t) - log(sigma_t) of every training timestep, float32 [T]."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return (np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))).astype(np.float32)


def schedule_alphas_cumprod(config) -> np.ndarray:
    """abar_t from a config with diffusers' beta fields, bit-equal to diffusers' float32 tables (these
    solvers truncate some derived timesteps, so an ulp matters); the zero-SNR variant keeps the last abar
    a hair above zero (2**-24) so sigma and lambda stay finite at the final training step."""
    n = config.num_train_timesteps
    if config.trained_betas is None and config.beta_schedule == "linear":
        betas = common.torch_linspace(config.beta_start, config.beta_end, n)
    elif config.trained_betas is None and config.beta_schedule == "scaled_linear":
        betas = common.torch_linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    else:
        betas = common.make_betas(config.beta_schedule, config.beta_start, config.beta_end, n, config.trained_betas)
    if getattr(config, "rescale_betas_zero_snr", False):
        betas = common.rescale_zero_terminal_snr(betas)
    ac = common.torch_alphas_cumprod(betas)
    if getattr(config, "rescale_betas_zero_snr", False):
        ac[-1] = 2.0**-24
    return ac


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0,
                     last_timestep: int | None = None) -> np.ndarray:
    """The n integer timesteps (descending) of the DPM-Solver family's spacings, which drop the
    trailing zero of an (n + 1)-point grid. int64 [n]."""
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / n
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
    raise common.SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported")


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(a, b) law (Lee et al. 2024, "Beta sampling is all you need")."""
    import scipy.stats  # jax depends on scipy; imported here as only this spacing needs it

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def respaced_sigmas(kind: str, sigmas_desc: np.ndarray, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """n sigmas between the ends of `sigmas_desc` (or the configured ends), float64 [n], descending."""
    lo = float(sigmas_desc[-1]) if sigma_min is None else sigma_min
    hi = float(sigmas_desc[0]) if sigma_max is None else sigma_max
    if kind == "karras":
        return common.karras_sigmas(lo, hi, n)
    if kind == "exponential":
        return common.exponential_sigmas(lo, hi, n)
    if kind == "beta":
        return beta_sigmas(lo, hi, n)
    raise ValueError(kind)


def sigma_kind(config) -> str | None:
    """Which respacing of sigmas a config asks for (None: sigmas interpolated at the timesteps)."""
    flags = {"karras": getattr(config, "use_karras_sigmas", False),
             "exponential": getattr(config, "use_exponential_sigmas", False),
             "beta": getattr(config, "use_beta_sigmas", False)}
    chosen = [k for k, v in flags.items() if v]
    if len(chosen) > 1:
        raise common.SchedulerConfigError(f"only one sigma respacing may be set, got {chosen}")
    return chosen[0] if chosen else None


def check_unsupported(config, name: str) -> None:
    """Refuses the flow-matching options: they change the meaning of sigma (alpha = 1 - sigma), which the
    epsilon/v schedules of the unCLIP and depth2img checkpoints never use."""
    if getattr(config, "use_flow_sigmas", False) or getattr(config, "use_dynamic_shifting", False):
        raise common.SchedulerConfigError(f"{name}: flow-matching sigmas are not supported")
    if getattr(config, "prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise common.SchedulerConfigError(f"{name}: prediction_type {config.prediction_type!r} is not supported")
    beta = getattr(config, "beta_schedule", "linear")
    if getattr(config, "trained_betas", None) is None and beta not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise common.SchedulerConfigError(f"{name}: beta_schedule {beta!r} is not supported")


# ---------------------------------------------------------------------------------------------- traced side

def alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) of the variance-preserving process whose noise-to-signal ratio is `sigma`."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def log_snr(alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """lambda = log(alpha / sigma), the time variable of DPM-Solver (Lu et al. 2022, sec. 3.1)."""
    return jnp.log(alpha) - jnp.log(sigma)


def index_for_timestep(timesteps: jax.Array, timestep: jax.Array) -> jax.Array:
    """Position of `timestep` in the schedule as diffusers finds it: the second match when it occurs twice
    (so an img2img start that repeats the first timestep does not skip a sigma), the last step when absent."""
    match = timesteps == jnp.asarray(timestep, timesteps.dtype)
    count = jnp.sum(match)
    first = jnp.argmax(match)
    second = jnp.argmax(match & (jnp.cumsum(match) >= 2))
    return jnp.where(count == 0, timesteps.shape[0] - 1, jnp.where(count > 1, second, first)).astype(jnp.int32)


def current_step_index(state, timestep) -> jax.Array:
    """The state's step index, or, before the first step, where diffusers would start: `begin_index` if
    set, otherwise the position of `timestep`."""
    found = jnp.where(state.begin_index >= 0, state.begin_index, index_for_timestep(state.timesteps, timestep))
    return jnp.where(state.step_index >= 0, state.step_index, found).astype(jnp.int32)


def noise_indices(state, timesteps: jax.Array) -> jax.Array:
    """Sigma index per batch entry for `add_noise`, with diffusers' precedence: positions of the given
    timesteps if no begin index was set, else the current step index, else the begin index."""
    timesteps = jnp.atleast_1d(jnp.asarray(timesteps))
    by_t = jax.vmap(lambda t: index_for_timestep(state.timesteps, t))(timesteps)
    fixed = jnp.where(state.step_index >= 0, state.step_index, state.begin_index)
    return jnp.where(state.begin_index >= 0, jnp.broadcast_to(fixed, by_t.shape), by_t)


def sigma_at(sigmas: jax.Array, i: jax.Array) -> jax.Array:
    """sigmas[i] with the index clipped into range: lookbacks of the unused orders stay finite."""
    return sigmas[jnp.clip(i, 0, sigmas.shape[0] - 1)]


def push(history: jax.Array, x: jax.Array) -> jax.Array:
    """Appends x as the newest entry of a fixed-size [K, ...] history, dropping the oldest."""
    return jnp.roll(history, -1, axis=0).at[-1].set(x.astype(history.dtype))


def history_for(history: jax.Array, sample: jax.Array) -> jax.Array:
    """A zero history shaped for `sample` when `set_timesteps` was not told the sample shape."""
    if history.shape[1:] == sample.shape:
        return history
    return jnp.zeros((history.shape[0],) + sample.shape, jnp.float32)


def history_shape(order: int, shape) -> tuple[int, ...]:
    return (order,) + (tuple(shape) if shape is not None else (0,))


def data_prediction(prediction_type: str, model_output, sample, alpha, sigma):
    """x_0 predicted from the model output (Ho et al. 2020 eq. 15; Salimans & Ho 2022 for v)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    raise common.SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def noise_prediction(prediction_type: str, model_output, sample, alpha, sigma):
    """eps predicted from the model output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    raise common.SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def learned_variance_mean(model_output, variance_type):
    """Models trained with a learned variance put [eps, variance] on the channel axis; diffusers keeps the
    first three channels (dim 1 of NCHW). Our samples are channels-last, so the last axis is sliced."""
    if variance_type in ("learned", "learned_range"):
        return model_output[..., :3]
    return model_output


def gaussian(key, noise, shape, what: str) -> jax.Array:
    """Supplied noise if given, otherwise a standard normal draw from `key`."""
    if noise is not None:
        return jnp.asarray(noise, jnp.float32)
    if key is None:
        raise ValueError(f"{what} is stochastic: pass `key` or `noise`")
    return jax.random.normal(key, shape, jnp.float32)


def add_noise_vp(state, original, noise, timesteps):
    """alpha_t x_0 + sigma_t eps with (alpha_t, sigma_t) from the inference sigma table."""
    sigma = common.broadcast_to_sample(state.sigmas[noise_indices(state, timesteps)], original)
    alpha_t, sigma_t = alpha_sigma(sigma)
    return (alpha_t * original + sigma_t * noise).astype(original.dtype)

