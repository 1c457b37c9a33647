"""The vae objective (a pipeline's `vae`, e.g. StableUnCLIPImg2ImgPipeline's): latent diffusion's
autoencoder objective without its perceptual and adversarial terms: the L1 reconstruction of a
posterior sample, plus `kl_weight` (default 1e-6, as LDM's KL-f4/f8 configs) times the posterior's KL
divergence from N(0, 1), summed over latents and divided by the pixel values per example, so the weight
means what it means in LDM, where both terms are sums. Used to train the default model's small VAE
(issue 18).

With the option `vae_decoder_only`, only the decoder side (`decoder`, `post_quant_conv`) trains and the
encoder stays as it is, so the latents a UNet was trained on do not move: a decoder fine-tune, as
Stability's ft-EMA/ft-MSE VAEs were made (the KL term is then constant: reported, no gradient).

Two options shape the latent space for a latent-diffusion decoder (the default model's choice, issue 18;
not in LDM, both off by default):
- `mask_weight`: latent channel 0 (the posterior mean, times the VAE's `scaling_factor`) is pulled towards
  the picture's foreground mask, +1 on the object and -1 on the background, as the share of each latent
  cell's pixels that are foreground (`foreground_coverage`: pixels far from the colour of the picture's
  border, `unclip_jax.toy.measure.shape_mask`, for pictures of objects on a plain background): the mean
  squared error times `mask_weight`.
- `smooth_weight`: the other channels' high frequencies are penalised: the mean squared difference between
  those channels (scaled the same way) and their 5 x 5 box blur (edge-padded), times `smooth_weight`.
Together they make the outline a channel of its own, the same for every colour, while the other channels
carry smooth colour fields: the VAE's decoder learns to draw the edge from channel 0. A UNet then learns
one outline for all colours instead of one per colour pair (measured in unclip_jax/toy/README.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.decoder import images_of, save_pipeline, vae_pixels
from unclip_jax.training.objectives.params import make_split, merge

KL_WEIGHT = 1e-6
SMOOTH_WINDOW = 5  # the box blur of `smooth_weight`
# What `vae_decoder_only` trains: everything after the latent sample.
DECODER_SIDE = ("vae/decoder", "vae/post_quant_conv")


def vae_loss(vae, vae_params, pixels: jax.Array, noise: jax.Array, kl_weight: float = KL_WEIGHT, posterior=None):
    """(loss, metrics) of the VAE objective on pixels [B, H, W, 3] in [-1, 1], with the posterior's
    standard-normal draw `noise` [B, h, w, latent_channels] (`posterior`: the encoding, when it is made)."""
    if posterior is None:
        posterior = vae.apply({"params": vae_params}, pixels, method=vae.encode)
    recon = vae.apply({"params": vae_params}, posterior.sample(None, noise), method=vae.decode)
    l1 = jnp.mean(jnp.abs(recon.astype(jnp.float32) - pixels))
    kl = gaussian_kl(posterior.mean, posterior.logvar)
    per_pixel_kl = jnp.mean(kl) / np.prod(pixels.shape[1:])
    return l1 + kl_weight * per_pixel_kl, {"l1": l1, "kl": jnp.mean(kl)}


def foreground_coverage(images: np.ndarray, factor: int) -> np.ndarray:
    """float32 [B, H / factor, W / factor]: the share of each factor x factor cell's pixels that are
    foreground in uint8 pictures [B, H, W, 3] (`unclip_jax.toy.measure.shape_mask`)."""
    from unclip_jax.toy.measure import shape_mask  # noqa: PLC0415

    b, h, w, _ = images.shape
    masks = np.stack([shape_mask(image) for image in images]).astype(np.float32)
    return masks.reshape(b, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def latent_shaping(mean: jax.Array, coverage: jax.Array | None, scaling_factor: float, mask_weight: float,
                   smooth_weight: float):
    """(loss, metrics) of the `mask_weight` and `smooth_weight` terms (module docstring) on the posterior
    mean [B, h, w, C] and the foreground coverage [B, h, w] (None without `mask_weight`)."""
    z = mean.astype(jnp.float32) * scaling_factor
    loss, metrics = jnp.zeros((), jnp.float32), {}
    if mask_weight:
        metrics["mask"] = jnp.mean(jnp.square(z[..., 0] - (2.0 * coverage - 1.0)))
        loss = loss + mask_weight * metrics["mask"]
    if smooth_weight:
        rest, r = z[..., 1:], SMOOTH_WINDOW // 2
        padded = jnp.pad(rest, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
        window = (1, SMOOTH_WINDOW, SMOOTH_WINDOW, 1)
        blurred = jax.lax.reduce_window(padded, 0.0, jax.lax.add, window, (1, 1, 1, 1), "VALID") / SMOOTH_WINDOW ** 2
        metrics["smooth"] = jnp.mean(jnp.square(rest - blurred))
        loss = loss + smooth_weight * metrics["smooth"]
    return loss, metrics


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """[B]: KL(N(mean, exp(logvar)) || N(0, 1)) summed over every axis but the first."""
    terms = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def build(pipe, params, options: dict):
    """The vae objective on a pipeline with a `vae` (options: kl_weight, default 1e-6; vae_decoder_only,
    default False; mask_weight and smooth_weight, default 0: see the module docstring)."""
    if getattr(pipe, "vae", None) is None:
        raise TypeError(f"the vae objective needs a pipeline with a VAE; got {type(pipe).__name__}")
    kl_weight = float(options.get("kl_weight", KL_WEIGHT))
    mask_weight = float(options.get("mask_weight", 0.0))
    smooth_weight = float(options.get("smooth_weight", 0.0))
    factor, channels = pipe.vae.config.downsample_factor, pipe.vae.config.latent_channels
    for name, value in (("mask_weight", mask_weight), ("smooth_weight", smooth_weight)):
        if value < 0:
            raise ValueError(f"{name} {value}: must be >= 0")
        if value and options.get("vae_decoder_only"):
            raise ValueError(f"{name} shapes the encoder's latents, which vae_decoder_only keeps fixed")
    if smooth_weight and channels < 2:
        raise ValueError(f"smooth_weight: the VAE has {channels} latent channel; it acts on channels 1 and up")
    scaling_factor = float(pipe.vae.config.scaling_factor)

    def collate(examples):
        images = images_of(examples, 1)
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"images of {images.shape[1]} x {images.shape[2]} are not multiples of the VAE "
                             f"factor {factor}")
        batch = {"pixel_values": vae_pixels(images)}
        if mask_weight:
            batch["foreground"] = foreground_coverage(images, factor)
        return batch

    def loss(trainable, frozen, batch, key):
        pixels = batch["pixel_values"]
        b, h, w, _ = pixels.shape
        noise = jax.random.normal(key, (b, h // factor, w // factor, channels), jnp.float32)
        vae_params = merge(trainable, frozen)["vae"]
        posterior = pipe.vae.apply({"params": vae_params}, pixels, method=pipe.vae.encode)
        value, metrics = vae_loss(pipe.vae, vae_params, pixels, noise, kl_weight, posterior=posterior)
        if mask_weight or smooth_weight:
            extra, shaping = latent_shaping(posterior.mean, batch.get("foreground"), scaling_factor, mask_weight,
                                            smooth_weight)
            value, metrics = value + extra, {**metrics, **shaping}
        return value, metrics

    decoder_side = [p for p in DECODER_SIDE if p != "vae/post_quant_conv" or pipe.vae.config.use_post_quant_conv]
    split, _ = make_split(decoder_side if options.get("vae_decoder_only") else ["vae"])
    return Objective(name="vae", collate=collate, split=split, merge=merge, loss=loss, save=save_pipeline,
                     pipeline_class=type(pipe)), pipe, params
