"""The two objectives the default model needs that issue 17's list lacks: the VAE and the DPT.

Both follow the training contract (`unclip_jax.training.objective.Objective`; `build_*(pipe, params,
options) -> (Objective, pipe, params)`, the signature of the modules under
`unclip_jax.training.objectives`), so registering them there makes `unclip-jax train vae|dpt` run them
with the generic machinery (data, AdamW, EMA, checkpoints, resume). Their losses are plain functions,
testable without the machinery.

vae   (StableUnCLIPImg2ImgPipeline's `vae`): latent diffusion's autoencoder objective without its
      perceptual and adversarial terms: the L1 reconstruction of a posterior sample, plus
      `kl_weight` (default 1e-6, as LDM's KL-f4/f8 configs) times the posterior's KL divergence from
      N(0, 1), summed over latents and divided by the pixel values per example, so the weight means
      what it means in LDM, where both terms are sums.
dpt   (StableDiffusionDepth2ImgPipeline's `depth_estimator`): MiDaS's scale-and-shift-invariant loss
      on the disparity: per example, the prediction's least-squares scale and shift onto the target
      (the data's "depth", larger = nearer) are solved in closed form, and the loss is the mean squared
      residual after that alignment. The depth2img pipeline normalises the estimated depth per example,
      so scale and shift are the freedom it leaves; the target is resized to the prediction's size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KL_WEIGHT = 1e-6


def vae_loss(vae, vae_params, pixels: jax.Array, noise: jax.Array, kl_weight: float = KL_WEIGHT):
    """(loss, metrics) of the VAE objective on pixels [B, H, W, 3] in [-1, 1], with the posterior's
    standard-normal draw `noise` [B, h, w, latent_channels]."""
    posterior = vae.apply({"params": vae_params}, pixels, method=vae.encode)
    recon = vae.apply({"params": vae_params}, posterior.sample(None, noise), method=vae.decode)
    l1 = jnp.mean(jnp.abs(recon.astype(jnp.float32) - pixels))
    kl = gaussian_kl(posterior.mean, posterior.logvar)
    per_pixel_kl = jnp.mean(kl) / np.prod(pixels.shape[1:])
    return l1 + kl_weight * per_pixel_kl, {"l1": l1, "kl": jnp.mean(kl)}


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """[B]: KL(N(mean, exp(logvar)) || N(0, 1)) summed over every axis but the first."""
    terms = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def scale_shift_invariant_mse(prediction: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """MiDaS's scale-and-shift-invariant MSE of prediction and target [B, H, W] (f32 scalar).

    Per example, (s, t) = argmin sum (s * p + t - d)^2 by the 2 x 2 normal equations; a prediction
    that is constant over an example is only shifted (s = 0)."""
    p = prediction.astype(jnp.float32).reshape(prediction.shape[0], -1)
    d = target.astype(jnp.float32).reshape(target.shape[0], -1)
    p_mean, d_mean = p.mean(axis=1, keepdims=True), d.mean(axis=1, keepdims=True)
    pc = p - p_mean
    var = jnp.mean(pc * pc, axis=1, keepdims=True)
    scale = jnp.where(var > eps, jnp.mean(pc * (d - d_mean), axis=1, keepdims=True) / jnp.maximum(var, eps), 0.0)
    aligned = scale * pc + d_mean
    return jnp.mean(jnp.square(aligned - d))


def dpt_loss(depth_estimator, dpt_params, pixel_values: jax.Array, target: jax.Array):
    """(loss, metrics): the DPT's prediction on processed pixel values [B, S, S, 3] against target
    disparities [B, H, W], resized (bilinear) to the prediction's size first."""
    pred = depth_estimator.apply({"params": dpt_params}, pixel_values).predicted_depth
    if target.shape[1:] != pred.shape[1:]:
        target = jax.image.resize(target, (target.shape[0], *pred.shape[1:]), "linear")
    loss = scale_shift_invariant_mse(pred, target)
    return loss, {"ssi_mse": loss}


def _images(examples: list[dict]) -> np.ndarray:
    images = [np.asarray(e["image"]) for e in examples]
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"the batch's images differ in size: {sorted({im.shape for im in images})}")
    return np.stack(images)


def _split(component: str):
    def split(params: dict[str, Any]):
        if component not in params:
            raise KeyError(f"the pipeline has no {component!r} params to train")
        return {component: params[component]}, {k: v for k, v in params.items() if k != component}

    def merge(trainable, frozen):
        return {**frozen, **trainable}

    return split, merge


def _save(out_dir: str, pipe, params) -> None:
    pipe.save_pretrained(out_dir, params)


def build_vae(pipe, params, options: dict):
    """The vae objective on a pipeline with a `vae` (options: kl_weight, default 1e-6)."""
    from unclip_jax.training.objective import Objective  # noqa: PLC0415

    if getattr(pipe, "vae", None) is None:
        raise TypeError(f"the vae objective needs a pipeline with a VAE; got {type(pipe).__name__}")
    kl_weight = float(options.get("kl_weight", KL_WEIGHT))
    factor = pipe.vae.config.downsample_factor

    def collate(examples):
        images = _images(examples)
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"images of {images.shape[1]} x {images.shape[2]} are not multiples of the VAE "
                             f"factor {factor}")
        return {"pixel_values": images.astype(np.float32) / 127.5 - 1.0}

    def loss(trainable, frozen, batch, key):
        pixels = batch["pixel_values"]
        b, h, w, _ = pixels.shape
        noise = jax.random.normal(key, (b, h // factor, w // factor, pipe.vae.config.latent_channels), jnp.float32)
        return vae_loss(pipe.vae, trainable["vae"], pixels, noise, kl_weight)

    split, merge = _split("vae")
    return Objective(name="vae", collate=collate, split=split, merge=merge, loss=loss, save=_save,
                     pipeline_class=type(pipe)), pipe, params


def build_dpt(pipe, params, options: dict):
    """The dpt objective on a pipeline with a `depth_estimator`; examples carry "depth" (disparity)."""
    del options
    from unclip_jax.training.objective import Objective  # noqa: PLC0415

    if getattr(pipe, "depth_estimator", None) is None:
        raise TypeError(f"the dpt objective needs a pipeline with a depth estimator; got {type(pipe).__name__}")

    def collate(examples):
        images = _images(examples)
        missing = [i for i, e in enumerate(examples) if e.get("depth") is None]
        if missing:
            raise ValueError(f"dpt: examples {missing[:5]} of the batch have no depth map")
        depth = np.stack([np.asarray(e["depth"], np.float32) for e in examples])
        if depth.shape[1:] != images.shape[1:3]:
            raise ValueError(f"dpt: depth maps {depth.shape[1:]} differ from the images' {images.shape[1:3]}")
        return {"pixel_values": np.asarray(pipe.feature_extractor(list(images)), np.float32), "depth": depth}

    def loss(trainable, frozen, batch, key):
        del frozen, key
        return dpt_loss(pipe.depth_estimator, trainable["depth_estimator"], batch["pixel_values"], batch["depth"])

    split, merge = _split("depth_estimator")
    return Objective(name="dpt", collate=collate, split=split, merge=merge, loss=loss, save=_save,
                     pipeline_class=type(pipe)), pipe, params
