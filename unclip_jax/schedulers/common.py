"""What every scheduler shares: configs from scheduler_config.json, noise schedules, sigma spacings.

Schedules are computed on the host with numpy, in the float32 arithmetic diffusers uses (so trajectories
match it to float32 precision), from static arguments (`num_inference_steps` is a Python int); they
become the arrays of a scheduler's frozen state. Everything a `step` calls is jnp and traceable.
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


def make_betas(
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas=None,
) -> np.ndarray:
    """The training noise schedule, float32 [num_train_timesteps]."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in sqrt(beta).
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return alpha_bar_betas(num_train_timesteps)
    if beta_schedule == "sigmoid":
        x = np.linspace(-6, 6, num_train_timesteps, dtype=np.float32)
        return (1 / (1 + np.exp(-x))) * (beta_end - beta_start) + beta_start
    raise SchedulerConfigError(f"beta_schedule {beta_schedule!r} is not supported")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    s = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    s0, st = s[0].copy(), s[-1].copy()
    s = (s - st) * (s0 / (s0 - st))
    ab = s**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod_of(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas, dtype=np.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), descending."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Continuous timestep of each sigma by linear interpolation in log-sigma of the training table."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low_idx = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), None, log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def threshold_sample(sample: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, clip x0 to the `ratio`
    quantile of |x0| (at least 1, at most `max_value`) and rescale into [-1, 1]."""
    dtype = sample.dtype
    flat = sample.astype(jnp.float32).reshape(sample.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(sample.shape).astype(dtype)


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


def inference_timesteps(
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int = 0,
    *,
    round_linspace: bool = True,
) -> np.ndarray:
    """The n descending inference timesteps of diffusers' `timestep_spacing` (Lin et al. 2023, Table 2),
    float64 [n] holding the exact values diffusers computes before its final cast.

    "linspace" spreads n points over [0, T-1] (rounded for integer-timestep schedulers such as DDIM,
    fractional for the sigma schedulers); "leading" takes the multiples of T // n plus `steps_offset`;
    "trailing" counts down from T in steps of T / n and subtracts one.
    """
    T, n = num_train_timesteps, num_inference_steps
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported")


def limit_pred_original(x0: jax.Array, config: Any) -> jax.Array:
    """Keeps a predicted x_0 in range: dynamic thresholding when `config.thresholding`, otherwise a
    clip to +-`clip_sample_range` when `config.clip_sample` (DDPM/DDIM `clip_sample` options)."""
    if getattr(config, "thresholding", False):
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if getattr(config, "clip_sample", False):
        return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0


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


def torch_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """float32 prod(1 - beta) equal bit for bit to `torch.cumprod` on CPU, which accumulates float32 in
    float64 (np.cumprod in float32 drifts by a few ulp over 1000 steps)."""
    alphas = 1.0 - np.asarray(betas, np.float32)
    return np.cumprod(alphas, dtype=np.float64).astype(np.float32)
