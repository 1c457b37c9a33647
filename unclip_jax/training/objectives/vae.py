"""The vae objective (a pipeline's `vae`, e.g. StableUnCLIPImg2ImgPipeline's): latent diffusion's
autoencoder objective without its perceptual and adversarial terms: the L1 reconstruction of a
posterior sample, plus `kl_weight` (default 1e-6, as LDM's KL-f4/f8 configs) times the posterior's KL
divergence from N(0, 1), summed over latents and divided by the pixel values per example, so the weight
means what it means in LDM, where both terms are sums. Used to train the default model's small VAE
(issue 18).

With the option `vae_decoder_only`, only the decoder side (`decoder`, `post_quant_conv`) trains and the
encoder stays as it is, so the latents a UNet was trained on do not move: a decoder fine-tune, as
Stability's ft-EMA/ft-MSE VAEs were made (the KL term is then constant: reported, no gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.decoder import images_of, save_pipeline, vae_pixels
from unclip_jax.training.objectives.params import make_split, merge

KL_WEIGHT = 1e-6
# What `vae_decoder_only` trains: everything after the latent sample.
DECODER_SIDE = ("vae/decoder", "vae/post_quant_conv")


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


def build(pipe, params, options: dict):
    """The vae objective on a pipeline with a `vae` (options: kl_weight, default 1e-6; vae_decoder_only,
    default False)."""
    if getattr(pipe, "vae", None) is None:
        raise TypeError(f"the vae objective needs a pipeline with a VAE; got {type(pipe).__name__}")
    kl_weight = float(options.get("kl_weight", KL_WEIGHT))
    factor = pipe.vae.config.downsample_factor

    def collate(examples):
        images = images_of(examples, 1)
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"images of {images.shape[1]} x {images.shape[2]} are not multiples of the VAE "
                             f"factor {factor}")
        return {"pixel_values": vae_pixels(images)}

    def loss(trainable, frozen, batch, key):
        pixels = batch["pixel_values"]
        b, h, w, _ = pixels.shape
        noise = jax.random.normal(key, (b, h // factor, w // factor, pipe.vae.config.latent_channels), jnp.float32)
        return vae_loss(pipe.vae, merge(trainable, frozen)["vae"], pixels, noise, kl_weight)

    decoder_side = [p for p in DECODER_SIDE if p != "vae/post_quant_conv" or pipe.vae.config.use_post_quant_conv]
    split, _ = make_split(decoder_side if options.get("vae_decoder_only") else ["vae"])
    return Objective(name="vae", collate=collate, split=split, merge=merge, loss=loss, save=save_pipeline,
                     pipeline_class=type(pipe)), pipe, params
