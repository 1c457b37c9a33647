"""What the schedulers share, and the only module of ours they import.

Host side (numpy, from static Python arguments): configs, the training noise schedule, inference timesteps
and sigma tables, computed in the float32 arithmetic of diffusers' torch code (so trajectories match it to
float32 precision); they become the arrays of a scheduler's frozen state. Traced side (jnp): predictions,
step bookkeeping on the state's counters, and noising, all pure and branch-free on traced values.

Two parameterisations recur: variance preserving, x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 = abar_t,
and the k-diffusion one in sigma = sqrt((1 - abar) / abar), x = x_0 + sigma eps (the model then sees
x / sqrt(sigma^2 + 1)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")

# The last abar of a zero-terminal-SNR schedule as the sigma-parameterised schedulers keep it (diffusers
# lifts it from 0 to 2**-24 there so that sigma and log-SNR stay finite at the last training step).
ZERO_SNR_SIGMA_ABAR = 2.0**-24


# ===================================================================== configs, outputs, the class base

class SchedulerConfigError(ValueError):
    """A scheduler config asks for something this scheduler does not implement."""


@flax.struct.dataclass
class SchedulerOutput:
    """What every `step` returns: the previous sample x_{t-1}, the advanced state, and (where the
    scheduler computes it) the predicted x_0."""

    prev_sample: jax.Array
    state: Any
    pred_original_sample: jax.Array | None = None


def config_from_dict(cls: type[T], d: Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Builds a scheduler config dataclass from another scheduler's config dict, as diffusers'
    `from_config` does: keys the class knows are taken, the rest (another scheduler's options,
    `_class_name`, `_diffusers_version`) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(d or {}).items() if k in names}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {sorted(unknown)}")
    kwargs.update(overrides)
    return cls(**kwargs)


class Scheduler:
    """Base of every scheduler class: a frozen dataclass whose one field, `config`, defaults to its config
    class's defaults (`XConfig()`)."""

    @classmethod
    def from_config(cls, config=None, **overrides: Any):
        """From a config dataclass or any scheduler's config dict (see `config_from_dict`)."""
        config_cls = type(cls.config)  # dataclasses keep a field's default as the class attribute
        if isinstance(config, config_cls):
            return cls(dataclasses.replace(config, **overrides))
        return cls(config_from_dict(config_cls, config, **overrides))

    def set_begin_index(self, state, begin_index: int = 0):
        """Starts at schedule index `begin_index` (img2img strength), as diffusers' `set_begin_index`."""
        return state.replace(begin_index=jnp.asarray(begin_index, jnp.int32))


def check_num_inference_steps(config, n, name: str) -> None:
    """A step count must be a positive int, and (where the schedule is discrete) at most the training steps."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name}: num_inference_steps must be a positive integer; got {n!r}")
    limit = getattr(config, "num_train_timesteps", None)
    if limit is not None and n > limit:
        raise ValueError(f"{name}: num_inference_steps {n} is above num_train_timesteps {limit}")


def check_unsupported(config, name: str) -> None:
    """Refuses more than one sigma respacing, and the flow-matching options: they change the meaning of
    sigma (alpha = 1 - sigma), which the epsilon/v schedules of the unCLIP and depth2img checkpoints never use."""
    sigma_kind(config)
    if getattr(config, "use_flow_sigmas", False) or getattr(config, "use_dynamic_shifting", False):
        raise SchedulerConfigError(f"{name}: flow-matching sigmas are not supported")
    if getattr(config, "prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise SchedulerConfigError(f"{name}: prediction_type {config.prediction_type!r} is not supported")
    beta = getattr(config, "beta_schedule", "linear")
    if getattr(config, "trained_betas", None) is None and beta not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise SchedulerConfigError(f"{name}: beta_schedule {beta!r} is not supported")


# ======================================================================= training noise schedule (host)

def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 [n] equal bit for bit to `torch.linspace(start, end, n, dtype=torch.float32)` on CPU.

    np.linspace rounds differently in ~30% of entries; diffusers' timesteps that are truncated rather than
    rounded (sigma_to_t of exponential / beta sigmas) can then land one integer apart. torch steps by a
    float32 increment from the start for the first half and back from the end for the second, each point
    one fused multiply-add (emulated here in float64, which is exact for these products).
    """
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.asarray([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    idx = np.arange(n)
    up = (np.float64(start32) + step * idx).astype(np.float32)
    down = (np.float64(end32) - step * (n - 1 - idx)).astype(np.float32)
    return np.where(idx < n // 2, up, down).astype(np.float32)


def alpha_bar_betas(n: int, max_beta: float = 0.999, transform: str = "cosine") -> np.ndarray:
    """Betas that discretise a continuous alpha_bar(t) (Nichol & Dhariwal 2021, eq. 17 for cosine)."""
    if transform == "cosine":
        fn = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    elif transform == "exp":
        fn = lambda t: math.exp(t * -12.0)  # noqa: E731
    elif transform == "laplace":
        def fn(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:
        raise SchedulerConfigError(f"alpha_transform_type {transform!r} is not supported")
    betas = [min(1 - fn((i + 1) / n) / fn(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def make_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
               trained_betas=None) -> np.ndarray:
    """The training noise schedule, float32 [num_train_timesteps], bit-equal to diffusers' torch tables."""
    n = num_train_timesteps
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return torch_linspace(beta_start, beta_end, n)
    if beta_schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in sqrt(beta).
        return torch_linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    if beta_schedule in ("squaredcos_cap_v2", "laplace"):
        return alpha_bar_betas(n, transform="cosine" if beta_schedule == "squaredcos_cap_v2" else "laplace")
    if beta_schedule == "sigmoid":
        x = torch_linspace(-6, 6, n)
        return ((1 / (1 + np.exp(-x))) * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)
    raise SchedulerConfigError(f"beta_schedule {beta_schedule!r} is not supported")


def alphas_cumprod_of(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod(1 - beta), float32 bit-equal to `torch.cumprod` on CPU, which accumulates float32 in
    float64 (np.cumprod in float32 drifts by a few ulp over 1000 steps; the solvers truncate some derived
    timesteps, so an ulp matters)."""
    alphas = 1.0 - np.asarray(betas, np.float32)
    return np.cumprod(alphas, dtype=np.float64).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    s = np.sqrt(alphas_cumprod_of(betas))
    s0, st = s[0].copy(), s[-1].copy()
    s = (s - st) * (s0 / (s0 - st))
    ab = s**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1 - alphas).astype(np.float32)


def train_alphas_cumprod(config: Any, *, zero_snr_last: float = 0.0) -> np.ndarray:
    """abar_t of a config's training schedule (its beta fields and, if it has it, `rescale_betas_zero_snr`),
    float32 [T]. A zero-terminal-SNR schedule ends at abar = 0; the sigma schedulers pass
    `ZERO_SNR_SIGMA_ABAR` to end there instead, as diffusers does."""
    betas = make_betas(config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps,
                       config.trained_betas)
    zero_snr = getattr(config, "rescale_betas_zero_snr", False)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ac = alphas_cumprod_of(betas)
    if zero_snr:
        ac[-1] = zero_snr_last
    return ac


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma of every training timestep, float32 [T]."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return (((1 - ac) / ac) ** np.float32(0.5)).astype(np.float32)


def train_lambdas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Half log-SNR lambda_t = log(alpha_t) - log(sigma_t) of every training timestep, float32 [T]."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return (np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))).astype(np.float32)


# ============================================================================ inference timesteps (host)

def inference_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0,
                        *, round_linspace: bool = True) -> np.ndarray:
    """The n descending inference timesteps of diffusers' `timestep_spacing` (Lin et al. 2023, Table 2),
    float64 [n] holding the exact values diffusers computes before its final cast.

    "linspace" spreads n points over [0, T-1] (rounded for integer-timestep schedulers such as DDIM,
    fractional for the sigma schedulers); "leading" takes the multiples of T // n plus `steps_offset`;
    "trailing" counts down from T in steps of T / n and subtracts one.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported")


def integer_timesteps(config: Any, n: int) -> np.ndarray:
    """DDIM's and DDPM's n inference timesteps (the config's spacing and offset), int32 [n], descending
    (`set_timesteps` has checked n, see `check_num_inference_steps`)."""
    ts = inference_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
    return ts.astype(np.int64).astype(np.int32)


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
    raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported")


# ================================================================================ sigma tables (host)

def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), descending."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(a, b) law (Lee et al. 2024, "Beta sampling is all you need")."""
    import scipy.stats  # jax depends on scipy; imported here as only this spacing needs it

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def sigma_kind(config) -> str | None:
    """Which respacing of sigmas a config asks for (None: sigmas interpolated at the timesteps)."""
    flags = {"karras": getattr(config, "use_karras_sigmas", False),
             "exponential": getattr(config, "use_exponential_sigmas", False),
             "beta": getattr(config, "use_beta_sigmas", False)}
    chosen = [k for k, v in flags.items() if v]
    if len(chosen) > 1:
        raise SchedulerConfigError(f"only one sigma respacing may be set, got {chosen}")
    return chosen[0] if chosen else None


def respaced_sigmas(kind: str, sigmas_desc: np.ndarray, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """n sigmas between the ends of `sigmas_desc` (or the configured ends), float64 [n], descending."""
    lo = float(sigmas_desc[-1]) if sigma_min is None else sigma_min
    hi = float(sigmas_desc[0]) if sigma_max is None else sigma_max
    spacing = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[kind]
    return spacing(lo, hi, n)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Continuous timestep of each sigma by linear interpolation in log-sigma of the training table.
    NaN sigmas (the unused last entries of KDPM2's midpoint tables) give NaN quietly, as in diffusers."""
    with np.errstate(invalid="ignore"):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, None]
        low_idx = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), None, log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def discrete_sigmas(config: Any, alphas_cumprod: np.ndarray, n: int, *, sigma_min=None, sigma_max=None,
                    log_linear: bool = False, timestep_dtype=np.float32):
    """The k-diffusion family's schedule (Euler, Euler ancestral, LMS, Heun, KDPM2, DPM-Solver SDE):
    (timesteps [n], sigmas float64 descending, log of the training sigmas float32 [T]) for a config with
    `timestep_spacing`, `steps_offset` and the `use_*_sigmas` flags. Timesteps are interpolated in
    `timestep_dtype` (float32, but float64 in diffusers' DPM-Solver SDE).

    Sigmas are interpolated at the (fractional) timesteps, or with `log_linear` spaced evenly in log sigma
    over the whole training range (n + 1 of them, as diffusers' Euler keeps), then optionally respaced
    between the ends of that table with timesteps mapped back from sigma.
    """
    ts = inference_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset,
                             round_linspace=False).astype(timestep_dtype)
    train = train_sigmas(alphas_cumprod)
    log_sigmas = np.log(train)
    if log_linear:
        sigmas = np.exp(torch_linspace(log_sigmas[-1], log_sigmas[0], n + 1))
    else:
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
    kind = sigma_kind(config)
    if kind is not None:
        sigmas = respaced_sigmas(kind, sigmas, n, sigma_min, sigma_max)
        ts = sigma_to_t(sigmas, log_sigmas)
    return ts, sigmas, log_sigmas


def init_noise_sigma_of(sigmas: np.ndarray, spacing: str) -> np.ndarray:
    """The std of the initial latent of a sigma schedule: sigma_max, or sqrt(sigma_max^2 + 1) for "leading"
    spacing (whose first timestep is below T - 1, so diffusers treats the start as variance preserving)."""
    top = np.float32(np.max(sigmas))
    if spacing in ("linspace", "trailing"):
        return top
    return np.float32((top**2 + np.float32(1)) ** np.float32(0.5))


def kdpm2_sigmas(config: Any, n: int):
    """KDPM2's (and KDPM2-ancestral's) schedule before interleaving: (alphas_cumprod [T], timesteps [n],
    sigmas [n + 1] float32 ending in 0, log training sigmas). diffusers rounds the Karras timesteps (only)
    for these two schedulers."""
    ac = train_alphas_cumprod(config)
    ts, sigmas, log_sigmas = discrete_sigmas(config, ac, n)
    if config.use_karras_sigmas:
        ts = np.round(ts)
    return ac, np.asarray(ts), np.concatenate([sigmas, [0.0]]).astype(np.float32), log_sigmas


def log_midpoints(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KDPM2's log-sigma midpoints exp((log a + log b) / 2), float32 with torch.lerp's rounding at weight 1/2
    (end - (end - start) / 2); a zero end gives 0, and 0 with 0 NaN, as in diffusers (never used entries)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(a.astype(np.float32)), np.log(b.astype(np.float32))
        return np.exp(lb - (lb - la) * np.float32(0.5)).astype(np.float32)


def interleave(x: np.ndarray, tail: bool = True) -> np.ndarray:
    """x0, x1, x1, x2, x2, ... (each entry after the first twice), with the last entry once more if
    `tail`: the second-order schedulers' layout of per-call tables."""
    parts = [x[:1], np.repeat(x[1:], 2)] + ([x[-1:]] if tail else [])
    return np.concatenate(parts)


# ======================================================================= family states (host builders)

@flax.struct.dataclass
class SigmaState:
    """The state of the schedulers whose step needs only the sigma table (Euler, Euler ancestral)."""

    alphas_cumprod: jax.Array  # [T] float32
    timesteps: jax.Array  # [n] float32, what the model is called with
    sigmas: jax.Array  # [n + 1] float32, the last one the end of the final step
    step_index: jax.Array  # [] int32, -1 before the first step
    begin_index: jax.Array  # [] int32, -1 unless set
    init_noise_sigma: jax.Array  # []


def sigma_state(alphas_cumprod, timesteps, sigmas, spacing: str) -> SigmaState:
    """A fresh `SigmaState` (no step taken, no begin index) for the given host tables."""
    sigmas = np.asarray(sigmas, np.float32)
    return SigmaState(
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        timesteps=jnp.asarray(np.asarray(timesteps).astype(np.float32)),
        sigmas=jnp.asarray(sigmas),
        step_index=jnp.asarray(-1, jnp.int32),
        begin_index=jnp.asarray(-1, jnp.int32),
        init_noise_sigma=jnp.asarray(init_noise_sigma_of(sigmas, spacing)),
    )


@flax.struct.dataclass
class MultistepState:
    """The state of the linear multistep solvers (DPM-Solver multistep, DEIS). timesteps [N] int32; sigmas
    [N + 1] (the last one ends the last step); model_outputs [order, ...] the converted outputs of the last
    `solver_order` steps, newest last; lower_order_nums: how many of them are real (the solver warms up
    through the lower orders); step_index / begin_index: -1 = unset."""

    timesteps: jax.Array
    sigmas: jax.Array
    alphas_cumprod: jax.Array
    init_noise_sigma: jax.Array
    model_outputs: jax.Array
    lower_order_nums: jax.Array
    step_index: jax.Array
    begin_index: jax.Array


def multistep_state(timesteps, sigmas, alphas_cumprod, solver_order: int, shape) -> MultistepState:
    """A fresh `MultistepState` (empty history sized for `shape`, no step taken, no begin index)."""
    return MultistepState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        sigmas=jnp.asarray(sigmas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        init_noise_sigma=jnp.float32(1.0),
        model_outputs=jnp.zeros(history_shape(solver_order, shape), jnp.float32),
        lower_order_nums=jnp.int32(0),
        step_index=jnp.int32(-1),
        begin_index=jnp.int32(-1),
    )


def history_shape(order: int, shape) -> tuple[int, ...]:
    """[order, *sample shape] for a multistep history; [order, 0] until a sample shape is known."""
    return (order,) + (tuple(shape) if shape is not None else (0,))


# ============================================================================== predictions (traced)

def alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) of the variance-preserving process whose noise-to-signal ratio is `sigma`."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def log_snr(alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """lambda = log(alpha / sigma), the time variable of DPM-Solver (Lu et al. 2022, sec. 3.1)."""
    return jnp.log(alpha) - jnp.log(sigma)


def data_prediction(prediction_type: str, model_output, sample, alpha, sigma):
    """x_0 predicted from a variance-preserving model output (Ho et al. 2020 eq. 15; Salimans & Ho 2022 for v)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def noise_prediction(prediction_type: str, model_output, sample, alpha, sigma):
    """eps predicted from a variance-preserving model output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def denoised(prediction_type: str, model_output, sample, sigma, sigma_out=None):
    """x_0 from the model output of a sigma-parameterised model whose input was scaled by
    1 / sqrt(sigma^2 + 1). `sigma_out` is the sigma the epsilon form uses when it differs (churn)."""
    if prediction_type == "epsilon":
        return sample - (sigma if sigma_out is None else sigma_out) * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def threshold_sample(sample: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, clip x0 to the `ratio`
    quantile of |x0| (at least 1, at most `max_value`) and rescale into [-1, 1]."""
    dtype = sample.dtype
    flat = sample.astype(jnp.float32).reshape(sample.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(sample.shape).astype(dtype)


def limit_pred_original(x0: jax.Array, config: Any) -> jax.Array:
    """Keeps a predicted x_0 in range: dynamic thresholding when `config.thresholding`, otherwise a
    clip to +-`clip_sample_range` when `config.clip_sample`."""
    if getattr(config, "thresholding", False):
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if getattr(config, "clip_sample", False):
        return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0


def ancestral_posterior(x0, x, abar_t, abar_prev, alpha_t, beta_t, variance_type: str, predicted_variance=None):
    """(mean, std) of q(x_prev | x_t, x_0) for a step whose noise is beta_t = 1 - alpha_t (Ho et al. 2020,
    eqs. 6-7), the std as `variance_type` asks (DDPM's options; UnCLIP uses two of them)."""
    mean = (jnp.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (jnp.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)) * x
    # Posterior variance beta~_t, floored so its log stays finite at the last step (whose noise is unused).
    small = jnp.maximum((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
    if variance_type == "fixed_small":
        return mean, jnp.sqrt(small)
    if variance_type == "fixed_small_log":
        return mean, jnp.exp(0.5 * jnp.log(small))
    if variance_type == "fixed_large":
        return mean, jnp.sqrt(beta_t)
    if variance_type == "learned":
        return mean, jnp.sqrt(predicted_variance)
    # learned_range: log-variance interpolated between beta~_t and beta_t (Nichol & Dhariwal 2021, eq. 15).
    frac = (predicted_variance + 1) / 2
    return mean, jnp.exp(0.5 * (frac * jnp.log(beta_t) + (1 - frac) * jnp.log(small)))


def split_learned_variance(model_output: jax.Array, sample: jax.Array, variance_type: str):
    """(eps-or-x0 prediction, predicted variance or None) for the DDPM-style schedulers. A learned-variance
    model returns twice the sample's channels; channels are the last axis here (diffusers splits dim 1)."""
    if variance_type not in ("learned", "learned_range"):
        return model_output, None
    if model_output.shape[-1] != 2 * sample.shape[-1]:  # diffusers fails here too
        raise ValueError(f"variance_type {variance_type!r} needs a model output with twice the sample's channels")
    return model_output[..., : sample.shape[-1]], model_output[..., sample.shape[-1]:]


def learned_variance_mean(model_output, variance_type):
    """The DPM-Solver family's reading of a learned-variance output: diffusers keeps the first three
    channels (dim 1 of NCHW) whatever the sample has; ours are channels-last, so the last axis is sliced."""
    if variance_type in ("learned", "learned_range"):
        return model_output[..., :3]
    return model_output


# ======================================================================== step bookkeeping (traced)

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


def multistep_order(solver_order: int, lower_order_nums, i, n: int, lower_order_final: bool,
                    final_first_order: bool = False) -> jax.Array:
    """The order of a linear multistep update at step i of n (DPM-Solver multistep, DEIS): `solver_order`,
    limited by the outputs stored so far (the warm-up), and, with `lower_order_final` on fewer than 15 steps
    (where high-order extrapolation is unstable), at most 2 and then 1 over the last two steps;
    `final_first_order` forces first order at the last step."""
    if solver_order == 1:
        return jnp.int32(1)
    small = lower_order_final and n < 15
    lower_final = (i == n - 1) & (small or final_first_order)
    lower_second = (i == n - 2) & small
    lon = lower_order_nums
    return jnp.where((lon < 1) | lower_final, 1, jnp.where((solver_order == 2) | (lon < 2) | lower_second, 2, 3))


def gaussian(key, noise, shape, what: str) -> jax.Array:
    """Supplied noise if given, otherwise a standard normal draw from `key`."""
    if noise is not None:
        return jnp.asarray(noise, jnp.float32)
    if key is None:
        raise ValueError(f"{what} is stochastic: pass `key` or `noise`")
    return jax.random.normal(key, shape, jnp.float32)


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
    eps = gaussian(key, noise, x.shape, "a step with s_churn > 0") * s_noise
    return jnp.where(gamma > 0, x + eps * jnp.sqrt(sigma_hat**2 - sigma**2), x), sigma_hat


# ==================================================================================== noising (traced)

def broadcast_to_sample(x: jax.Array, sample: jax.Array) -> jax.Array:
    """A per-batch (or scalar) coefficient shaped to multiply a [B, ...] sample."""
    x = jnp.asarray(x, dtype=jnp.float32)
    return x.reshape(x.shape + (1,) * (sample.ndim - x.ndim))


def add_noise(alphas_cumprod: jax.Array, original: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
    abar = broadcast_to_sample(alphas_cumprod[jnp.asarray(timesteps)], original)
    return (jnp.sqrt(abar) * original + jnp.sqrt(1 - abar) * noise).astype(original.dtype)


def get_velocity(alphas_cumprod: jax.Array, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    abar = broadcast_to_sample(alphas_cumprod[jnp.asarray(timesteps)], sample)
    return (jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * sample).astype(sample.dtype)


def noise_indices(state, timesteps: jax.Array) -> jax.Array:
    """Sigma index per batch entry for a sigma table's `add_noise`, with diffusers' precedence: positions
    of the given timesteps if no begin index was set, else the current step index, else the begin index."""
    timesteps = jnp.atleast_1d(jnp.asarray(timesteps))
    by_t = jax.vmap(lambda t: index_for_timestep(state.timesteps, t))(timesteps)
    fixed = jnp.where(state.step_index >= 0, state.step_index, state.begin_index)
    return jnp.where(state.begin_index >= 0, jnp.broadcast_to(fixed, by_t.shape), by_t)


def add_sigma_noise(state: Any, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """x_0 + sigma eps (variance exploding) at the sigma of each timestep (see `noise_indices`)."""
    sigma = broadcast_to_sample(state.sigmas[noise_indices(state, timesteps)], original)
    return (original + noise * sigma).astype(original.dtype)


def add_noise_vp(state, original, noise, timesteps):
    """alpha_t x_0 + sigma_t eps with (alpha_t, sigma_t) from the state's sigma table (see `noise_indices`)."""
    sigma = broadcast_to_sample(state.sigmas[noise_indices(state, timesteps)], original)
    alpha_t, sigma_t = alpha_sigma(sigma)
    return (alpha_t * original + sigma_t * noise).astype(original.dtype)
