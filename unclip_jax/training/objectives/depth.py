"""The depth objective: the 5-channel UNet of StableDiffusionDepth2ImgPipeline.

train_text_to_image's loss, with the pipeline's depth conditioning: the depth map (the batch's "depth", any
scale, or the DPT depth estimator's prediction on the image when the examples carry none) is resized
bicubically to the latent grid and normalised per example to [-1, 1] exactly as the pipeline does
(`_depth_mask`), then concatenated after the noisy latents' channels. With probability `text_dropout` the
caption's encoding becomes the empty prompt's. The UNet is trained; the rest is frozen.

Depth maps in the data: an example's optional "depth" is float32 [H, W], the image's size; a batch either
has a depth map for every example or for none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.tokenizer import tokenize
from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.decoder import (
    batch_latents,
    cached_posterior,
    check_probability,
    encode_text,
    images_of,
    latent_shape,
    save_pipeline,
    text_ids,
    vae_pixels,
)
from unclip_jax.training.objectives.diffusion import Denoising, denoising_from_options
from unclip_jax.training.objectives.params import make_split, merge


def depth_of(examples: list[dict], size: tuple[int, int]) -> np.ndarray | None:
    """The examples' depth maps float32 [B, H, W], or None when none has one."""
    have = ["depth" in e and e["depth"] is not None for e in examples]
    if not any(have):
        return None
    if not all(have):
        raise ValueError("depth: some examples of the batch have a depth map and some do not")
    depth = [np.asarray(e["depth"], np.float32) for e in examples]
    for d in depth:
        if d.shape != size:
            raise ValueError(f"depth: a depth map must be [H, W] = {size}, the image's size; got {d.shape}")
    return np.stack(depth)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a jit closure's constant
class DepthLoss:
    """`loss(trainable, frozen, batch, key)`; `draw(key, batch)` and `given(..., draws)` expose the draws."""

    pipe: Any
    denoising: Denoising
    text_dropout: float
    empty_ids: Any

    def draw(self, key: jax.Array, batch: dict) -> dict[str, jax.Array]:
        k_diff, k_post, k_drop = jax.random.split(key, 3)
        shape = latent_shape(self.pipe, batch)
        d = self.denoising.draw(k_diff, shape)
        d["posterior_noise"] = jax.random.normal(k_post, shape, jnp.float32)
        d["drop_text"] = jax.random.bernoulli(k_drop, self.text_dropout, (shape[0],))
        return d

    def depth_mask(self, params, batch) -> jax.Array:
        """The UNet's depth channel [B, h, w, 1] in [-1, 1]."""
        depth = batch["depth"] if "depth" in batch else self.pipe._depth(params, batch["dpt_pixel_values"])
        b, h, w, _ = latent_shape(self.pipe, batch)
        return self.pipe._depth_mask(depth.astype(jnp.float32), jnp.arange(b), size=(h, w))

    def given(self, trainable, frozen, batch, draws) -> tuple[jax.Array, dict]:
        pipe, params = self.pipe, merge(trainable, frozen)
        latents = batch_latents(pipe.vae, params["vae"], batch, draws["posterior_noise"])
        text = encode_text(pipe.text_encoder, params["text_encoder"], batch["input_ids"],
                           jnp.broadcast_to(self.empty_ids, batch["input_ids"].shape), draws["drop_text"])
        depth = self.depth_mask(params, batch)

        def model_fn(x, t):
            x_in = jnp.concatenate([x, depth.astype(x.dtype)], axis=-1)
            return pipe.unet.apply({"params": params["unet"]}, x_in, t, text)

        return self.denoising(model_fn, latents, draws)

    def __call__(self, trainable, frozen, batch, key):
        return self.given(trainable, frozen, batch, self.draw(key, batch))


def build(pipe, params, options: dict):
    """The depth objective on a StableDiffusionDepth2ImgPipeline (see the module docstring)."""
    from unclip_jax.image_processing_dpt import dpt_input  # noqa: PLC0415
    from unclip_jax.pipelines.depth2img import StableDiffusionDepth2ImgPipeline  # noqa: PLC0415

    if not isinstance(pipe, StableDiffusionDepth2ImgPipeline):
        raise TypeError(f"the depth objective trains a StableDiffusionDepth2ImgPipeline; got {type(pipe).__name__}")
    loss = DepthLoss(pipe, denoising_from_options(pipe.scheduler.config, options),
                     check_probability(options, "text_dropout"), tokenize(pipe.tokenizer, [""])[0])
    factor = pipe.vae_scale_factor

    def collate(examples: list[dict]) -> dict[str, np.ndarray]:
        images = images_of(examples, factor)
        batch = {"pixel_values": vae_pixels(images), "input_ids": text_ids(pipe.tokenizer, examples)}
        depth = depth_of(examples, images.shape[1:3])
        if depth is None:
            batch["dpt_pixel_values"] = pipe.feature_extractor([dpt_input(im) for im in images])
        else:
            batch["depth"] = depth
        return batch

    split, merge_ = make_split(["unet"])
    objective = Objective(name="depth", collate=collate, split=split, merge=merge_, loss=loss,
                          save=save_pipeline, pipeline_class=type(pipe),
                          cache=lambda p, batch: cached_posterior(pipe.vae, p["vae"], batch["pixel_values"]),
                          cache_replaces=("pixel_values",))
    return objective, pipe, params


__all__ = ["DepthLoss", "build", "depth_of"]
