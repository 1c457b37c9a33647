"""The denoising loss that the diffusion objectives share (decoder, prior, depth, LoRA, textual inversion).

What diffusers' training scripts compute (train_text_to_image, the Kandinsky 2.2 prior script), written
over arrays: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at t ~ U{0, T-1} (Ho et al. 2020, eq. 4); the
target is eps, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022) or x_0, as the training
scheduler's prediction type says; the squared error is averaged per example and weighted by min-SNR-gamma
(Hang et al. 2023: min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v, min(SNR_t, gamma) alone for
x_0, as the scripts leave it), then averaged over the batch. The noise offset (Guttenberg 2023) adds one extra draw per example and
channel, scaled by `noise_offset`, to the noise.

The training schedule is a DDPM one built from the pipeline scheduler's config, as the scripts'
`DDPMScheduler.from_pretrained(model, subfolder="scheduler")` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.schedulers.ddpm import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def training_scheduler(config: Any, prediction_type: str | None = None) -> DDPMScheduler:
    """A DDPM training schedule from any scheduler's config (dataclass or dict); `prediction_type`
    overrides the config's (diffusers' `--prediction_type`)."""
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        d["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(d)


@dataclasses.dataclass(frozen=True)
class Denoising:
    """One training schedule with its loss options.

    scheduler: the DDPM training schedule (its config's prediction_type is the target's).
    snr_gamma: min-SNR-gamma weighting (None: plain mean squared error).
    noise_offset: the scale of the per-example, per-channel noise offset (0: none).
    """

    scheduler: DDPMScheduler
    snr_gamma: float | None = None
    noise_offset: float = 0.0

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> jax.Array:
        return self.scheduler.create_state().alphas_cumprod

    def draw(self, key: jax.Array, shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """The draws of one step for x_0 of `shape` [B, ..., C]: timesteps [B] int32 and noise (offset
        included) of `shape`."""
        k_t, k_noise, k_offset = jax.random.split(key, 3)
        b = shape[0]
        timesteps = jax.random.randint(k_t, (b,), 0, self.scheduler.config.num_train_timesteps, jnp.int32)
        noise = jax.random.normal(k_noise, shape, jnp.float32)
        if self.noise_offset:
            # One value per example and channel (channels last), broadcast over the other axes.
            offset_shape = (b,) + (1,) * (len(shape) - 2) + (shape[-1],)
            noise = noise + self.noise_offset * jax.random.normal(k_offset, offset_shape, jnp.float32)
        return {"timesteps": timesteps, "noise": noise}

    def noisy_and_target(self, x0: jax.Array, noise: jax.Array, timesteps: jax.Array):
        """(x_t, the regression target) for clean x_0 [B, ...]."""
        state = self.scheduler.create_state()
        noisy = self.scheduler.add_noise(state, x0, noise, timesteps)
        target = {"epsilon": noise, "sample": x0}.get(self.prediction_type)
        if target is None:
            target = self.scheduler.get_velocity(state, x0, noise, timesteps)
        return noisy, target

    def snr(self, timesteps: jax.Array) -> jax.Array:
        """SNR_t = abar_t / (1 - abar_t), [B]."""
        abar = self.alphas_cumprod[timesteps]
        return abar / (1.0 - abar)

    def loss(self, pred: jax.Array, target: jax.Array, timesteps: jax.Array) -> tuple[jax.Array, dict]:
        """The (min-SNR weighted) mean squared error in float32, and metrics."""
        err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
        per_example = err.reshape(err.shape[0], -1).mean(axis=1)
        metrics = {"mse": per_example.mean()}
        if self.snr_gamma is None:
            return metrics["mse"], metrics
        snr = self.snr(timesteps)
        weight = jnp.minimum(snr, self.snr_gamma)
        if self.prediction_type == "epsilon":
            weight = weight / snr
        elif self.prediction_type == "v_prediction":
            weight = weight / (snr + 1.0)
        return (per_example * weight).mean(), metrics

    def __call__(self, model_fn, x0: jax.Array, draws: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """`model_fn(x_t, timesteps)` -> prediction; the loss at the given draws (see `draw`)."""
        noisy, target = self.noisy_and_target(x0, draws["noise"], draws["timesteps"])
        return self.loss(model_fn(noisy, draws["timesteps"]), target, draws["timesteps"])


def denoising_from_options(scheduler_config: Any, options: dict) -> Denoising:
    """The `Denoising` of an objective's options (snr_gamma, noise_offset, prediction_type)."""
    gamma = options.get("snr_gamma")
    if gamma is not None and not float(gamma) > 0:
        raise ValueError(f"snr_gamma must be positive (or None: off); got {gamma!r}")
    offset = float(options.get("noise_offset", 0.0) or 0.0)
    if offset < 0:
        raise ValueError(f"noise_offset must be >= 0; got {offset!r}")
    return Denoising(training_scheduler(scheduler_config, options.get("prediction_type")),
                     None if gamma is None else float(gamma), offset)


__all__ = ["Denoising", "PREDICTION_TYPES", "denoising_from_options", "training_scheduler"]
