"""The Stable unCLIP decoder objective: the UNet denoises VAE latents conditioned on the text and on a
noise-augmented CLIP image embedding (StableUnCLIPImg2ImgPipeline's components).

Per example, as Stable unCLIP was trained and as its pipeline conditions at sampling time:
  latents = VAE posterior sample of the image * scaling_factor;
  class_labels = the pipeline's `noise_image_embeddings` of the image encoder's embedding at a random
    noise_level (normalise, add_noise with the image-noising schedule, unnormalise, append the level's
    sinusoidal embedding);
  text = the text encoder's last hidden state.
For classifier-free guidance, the text is replaced by the empty prompt's encoding with probability
`text_dropout` and class_labels by zeros (the pipeline's unconditional branch) with `image_dropout`.
The UNet is trained; everything else is frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.tokenizer import maybe_convert_prompt, tokenize
from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.diffusion import Denoising, denoising_from_options
from unclip_jax.training.objectives.params import make_split, merge


def check_probability(options: dict, name: str) -> float:
    p = float(options.get(name, 0.0) or 0.0)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {options.get(name)!r}")
    return p


def images_of(examples: list[dict], factor: int) -> np.ndarray:
    """The examples' images, uint8 [B, H, W, 3], checked to be one size and a multiple of `factor`."""
    images = [np.asarray(e["image"]) for e in examples]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"image: a batch holds images of one size; got {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) != 3 or shape[2] != 3 or images[0].dtype != np.uint8:
        raise ValueError(f"image: expected uint8 [H, W, 3]; got {images[0].dtype} {shape}")
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(f"image: {shape[0]}x{shape[1]} is not a multiple of the VAE factor {factor}")
    return np.stack(images)


def vae_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1] (the scripts' ToTensor then Normalize([0.5], [0.5]))."""
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


def text_ids(tokenizer, examples: list[dict]) -> np.ndarray:
    """The captions' token ids [B, T] (textual-inversion tokens spelled out first, as the pipelines do)."""
    texts = [e["text"] for e in examples]
    return tokenize(tokenizer, maybe_convert_prompt(texts, tokenizer), "text")[0]


def dropout_masks(key: jax.Array, batch: int, p_text: float, p_image: float) -> dict[str, jax.Array]:
    k_text, k_image = jax.random.split(key)
    return {"drop_text": jax.random.bernoulli(k_text, p_text, (batch,)),
            "drop_image": jax.random.bernoulli(k_image, p_image, (batch,))}


def encode_text(text_encoder, params, ids, empty_ids=None, drop=None) -> jax.Array:
    """The text encoder's last hidden state [B, T, D]; rows where `drop` is set get the empty prompt's."""
    hidden = text_encoder.apply({"params": params}, ids).last_hidden_state
    if drop is None:
        return hidden
    empty = text_encoder.apply({"params": params}, empty_ids).last_hidden_state
    return jnp.where(drop[:, None, None], empty.astype(hidden.dtype), hidden)


def latent_shape(pipe, batch: dict) -> tuple[int, ...]:
    """[B, H/f, W/f, C]: the VAE latents' shape of the batch's `pixel_values` [B, H, W, 3] (or of its cached
    posterior `latent_mean`)."""
    if "latent_mean" in batch:
        return tuple(batch["latent_mean"].shape)
    b, h, w, _ = batch["pixel_values"].shape
    f = pipe.vae_scale_factor
    return (b, h // f, w // f, pipe.vae.config.latent_channels)


def cached_posterior(vae, params, pixels) -> dict[str, jax.Array]:
    """{"latent_mean", "latent_std"} [B, h, w, C]: the VAE posterior of `pixels`, what `batch_latents` samples."""
    post = vae.apply({"params": params}, pixels, method="encode")
    return {"latent_mean": post.mean, "latent_std": post.std}


def batch_latents(vae, params, batch: dict, noise) -> jax.Array:
    """The VAE posterior sample (mean + std * noise) times the scaling factor, [B, h, w, C] float32, of the
    batch's `pixel_values`, or from its cached posterior (`cached_posterior`) when it holds one."""
    post = batch if "latent_mean" in batch else cached_posterior(vae, params, batch["pixel_values"])
    return (post["latent_mean"] + post["latent_std"] * noise) * vae.config.scaling_factor


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a jit closure's constant
class DecoderLoss:
    """`loss(trainable, frozen, batch, key)`; `draw(key, batch)` and `given(..., draws)` expose the
    draws (tests feed the same ones to a PyTorch reference)."""

    pipe: Any
    denoising: Denoising
    text_dropout: float
    image_dropout: float
    noise_level: tuple[int, int]
    empty_ids: Any  # the empty prompt's ids [1, T] (numpy, static)

    def draw(self, key: jax.Array, batch: dict) -> dict[str, jax.Array]:
        k_diff, k_post, k_level, k_embed, k_drop = jax.random.split(key, 5)
        shape = latent_shape(self.pipe, batch)
        b = shape[0]
        d = self.denoising.draw(k_diff, shape)
        d["posterior_noise"] = jax.random.normal(k_post, shape, jnp.float32)
        lo, hi = self.noise_level
        d["noise_level"] = jax.random.randint(k_level, (b,), lo, hi + 1, jnp.int32)
        dim = self.pipe.image_normalizer.config.embedding_dim
        d["image_embeds_noise"] = jax.random.normal(k_embed, (b, dim), jnp.float32)
        d.update(dropout_masks(k_drop, b, self.text_dropout, self.image_dropout))
        return d

    def image_embeds(self, params, batch) -> jax.Array:
        """The image encoder's embedding [B, D] of the batch's `clip_pixel_values` (or its cached one)."""
        if "image_embeds" in batch:
            return batch["image_embeds"]
        return self.pipe.image_encoder.apply({"params": params["image_encoder"]}, batch["clip_pixel_values"]).embeds

    def cache(self, params, batch) -> dict[str, jax.Array]:
        """The frozen encoders' outputs on the batch (Objective.cache): the VAE posterior and the embedding."""
        return {**cached_posterior(self.pipe.vae, params["vae"], batch["pixel_values"]),
                "image_embeds": self.image_embeds(params, batch)}

    def class_labels(self, params, batch, draws) -> jax.Array:
        pipe = self.pipe
        embeds = self.image_embeds(params, batch)
        labels = pipe.noise_image_embeddings(params, embeds, draws["noise_level"], noise=draws["image_embeds_noise"])
        return jnp.where(draws["drop_image"][:, None], 0.0, labels)

    def given(self, trainable, frozen, batch, draws) -> tuple[jax.Array, dict]:
        pipe, params = self.pipe, merge(trainable, frozen)
        latents = batch_latents(pipe.vae, params["vae"], batch, draws["posterior_noise"])
        text = encode_text(pipe.text_encoder, params["text_encoder"], batch["input_ids"],
                           jnp.broadcast_to(self.empty_ids, batch["input_ids"].shape), draws["drop_text"])
        labels = self.class_labels(params, batch, draws)

        def model_fn(x, t):
            return pipe.unet.apply({"params": params["unet"]}, x, t, text, labels)

        return self.denoising(model_fn, latents, draws)

    def __call__(self, trainable, frozen, batch, key):
        return self.given(trainable, frozen, batch, self.draw(key, batch))


def noise_level_range(pipe, options: dict) -> tuple[int, int]:
    n = pipe.image_noising_scheduler.config.num_train_timesteps
    value = options.get("noise_level", (0, n - 1))
    lo, hi = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if not 0 <= lo <= hi < n:
        raise ValueError(f"noise_level must be a level or a range (min, max) within [0, {n - 1}]; got {value!r}")
    return lo, hi


def build(pipe, params, options: dict):
    """The decoder objective on a StableUnCLIPImg2ImgPipeline (see the module docstring)."""
    from unclip_jax.pipelines.stable_unclip import StableUnCLIPImg2ImgPipeline  # noqa: PLC0415

    if not isinstance(pipe, StableUnCLIPImg2ImgPipeline):
        raise TypeError("the decoder objective trains a StableUnCLIPImg2ImgPipeline (it needs the image encoder); "
                        f"got {type(pipe).__name__}")
    loss = DecoderLoss(pipe, denoising_from_options(pipe.scheduler.config, options),
                       check_probability(options, "text_dropout"), check_probability(options, "image_dropout"),
                       noise_level_range(pipe, options), tokenize(pipe.tokenizer, [""])[0])
    factor = pipe.vae_scale_factor

    def collate(examples: list[dict]) -> dict[str, np.ndarray]:
        images = images_of(examples, factor)
        return {"pixel_values": vae_pixels(images), "clip_pixel_values": pipe.feature_extractor(images),
                "input_ids": text_ids(pipe.tokenizer, examples)}

    split, merge_ = make_split(["unet"])
    objective = Objective(name="decoder", collate=collate, split=split, merge=merge_, loss=loss,
                          save=save_pipeline, pipeline_class=type(pipe), cache=loss.cache,
                          cache_replaces=("pixel_values", "clip_pixel_values"))
    return objective, pipe, params


def save_pipeline(out_dir: str, pipe, params) -> None:
    """The whole pipeline folder (save_pretrained)."""
    pipe.save_pretrained(out_dir, params)


__all__ = ["DecoderLoss", "build"]
