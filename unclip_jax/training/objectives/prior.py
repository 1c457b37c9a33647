"""The prior objective: the PriorTransformer of StableUnCLIPPipeline as a DDPM on the CLIP image
embedding, as diffusers' Kandinsky 2.2 prior script trains it.

Per example: the image encoder's embedding, normalised with the prior's own (fixed) clip_mean and
clip_std, is noised at t ~ U{0, T-1} with the prior scheduler's training schedule; the prior reads it with
the prior text encoder's projected embedding, last hidden state and attention mask of the caption and
predicts the target of the prior scheduler's prediction type (Karlo's: the clean sample). With probability
`text_dropout` the caption's encoding is replaced by the empty prompt's, the unconditional branch of the
pipeline's prior guidance. The prior is trained except clip_mean and clip_std; the rest is frozen.

StableUnCLIPPipeline has no image encoder: `options["image_encoder"]` names one whose projection width is
the prior's embedding width (a CLIPVisionModelWithProjection folder beside its preprocessor config, or a
pipeline folder holding image_encoder/ and feature_extractor/). Its params travel in the frozen half under
"image_encoder"; `save` leaves them out of the pipeline folder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.tokenizer import tokenize
from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.decoder import check_probability, images_of
from unclip_jax.training.objectives.diffusion import Denoising, denoising_from_options
from unclip_jax.training.objectives.params import make_split, merge

CLIP_STATS = ("prior/clip_mean", "prior/clip_std")


def image_encoder_folders(path: str) -> tuple[str, str]:
    """(encoder folder, preprocessor folder) of an `image_encoder` option (see module doc)."""
    if os.path.isdir(os.path.join(path, "image_encoder")):
        return os.path.join(path, "image_encoder"), os.path.join(path, "feature_extractor")
    return path, path


def load_image_encoder(path: str, dtype=jnp.float32):
    """(module, params, CLIPImageProcessor) of a CLIP vision encoder with projection (see module doc)."""
    from unclip_jax.weights.components import load_component  # noqa: PLC0415

    encoder, processor = image_encoder_folders(path)
    if not os.path.isfile(os.path.join(encoder, "config.json")):
        raise FileNotFoundError(f"image_encoder: {path} holds no image encoder (config.json or image_encoder/)")
    if not os.path.isfile(os.path.join(processor, "preprocessor_config.json")):
        raise FileNotFoundError(f"image_encoder: no preprocessor_config.json in {processor}")
    module, params = load_component(encoder, dtype=dtype, name="image_encoder")
    if not getattr(module, "with_projection", False):
        raise ValueError(f"image_encoder: {encoder} is not a CLIP vision model with projection")
    return module, params, CLIPImageProcessor.from_pretrained(processor)


def image_encoder_option(options: dict, objective: str, dtype, width: int, against: str):
    """(module, params, CLIPImageProcessor) of `options["image_encoder"]` (see module doc), which must
    project to `width`, the width of `against` (named in the errors)."""
    source = options.get("image_encoder")
    if source is None:
        raise ValueError(f"the {objective} objective needs options['image_encoder']: a CLIP vision model with "
                         f"projection as wide as {against} ({width})")
    encoder, params, processor = load_image_encoder(str(source), dtype)
    got = encoder.config.projection_dim
    if got != width:
        raise ValueError(f"image_encoder: {source} projects to width {got}; {against} is {width} wide")
    return encoder, params, processor


def caption_image_collate(pipe, processor):
    """collate(examples): the images' CLIP pixel values and the captions' prior-tokenizer ids and mask."""

    def collate(examples: list[dict]) -> dict[str, np.ndarray]:
        images = images_of(examples, 1)
        ids, mask = tokenize(pipe.prior_tokenizer, [e["text"] for e in examples], "text")
        return {"clip_pixel_values": processor(images), "prior_input_ids": ids, "prior_attention_mask": mask}

    return collate


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a jit closure's constant
class PriorLoss:
    """`loss(trainable, frozen, batch, key)`; `draw(key, batch)` and `given(..., draws)` expose the draws."""

    pipe: Any
    image_encoder: Any
    denoising: Denoising
    text_dropout: float
    empty_ids: Any  # the prior tokenizer's empty prompt [1, T] (ids, mask)
    empty_mask: Any

    def draw(self, key: jax.Array, batch: dict) -> dict[str, jax.Array]:
        k_diff, k_drop = jax.random.split(key)
        b = batch["prior_input_ids"].shape[0]
        d = self.denoising.draw(k_diff, (b, self.pipe.prior.config.clip_dim))
        d["drop_text"] = jax.random.bernoulli(k_drop, self.text_dropout, (b,))
        return d

    def given(self, trainable, frozen, batch, draws) -> tuple[jax.Array, dict]:
        pipe, params = self.pipe, merge(trainable, frozen)
        ids, mask = batch["prior_input_ids"], batch["prior_attention_mask"].astype(bool)
        drop = draws["drop_text"]
        ids = jnp.where(drop[:, None], jnp.asarray(self.empty_ids), ids)
        mask = jnp.where(drop[:, None], jnp.asarray(self.empty_mask, bool), mask)
        text_embeds, text_hidden = pipe._encode_prior_prompt(params, ids)
        embeds = self.image_encoder.apply({"params": params["image_encoder"]}, batch["clip_pixel_values"]).embeds
        prior = params["prior"]
        x0 = (embeds.astype(jnp.float32) - prior["clip_mean"]) / prior["clip_std"]

        def model_fn(x, t):
            return pipe.prior.apply({"params": prior}, x, t, text_embeds, text_hidden, mask)

        return self.denoising(model_fn, x0, draws)

    def __call__(self, trainable, frozen, batch, key):
        return self.given(trainable, frozen, batch, self.draw(key, batch))


def build(pipe, params, options: dict):
    """The prior objective on a StableUnCLIPPipeline (see the module docstring)."""
    from unclip_jax.pipelines.stable_unclip import StableUnCLIPPipeline  # noqa: PLC0415

    if not isinstance(pipe, StableUnCLIPPipeline):
        raise TypeError(f"the prior objective trains a StableUnCLIPPipeline's prior; got {type(pipe).__name__}")
    encoder, encoder_params, processor = image_encoder_option(
        options, "prior", pipe.prior.dtype, pipe.prior.config.clip_dim, "the prior's embedding")
    empty_ids, empty_mask = tokenize(pipe.prior_tokenizer, [""])
    loss = PriorLoss(pipe, encoder, denoising_from_options(pipe.prior_scheduler.config, options),
                     check_probability(options, "text_dropout"), empty_ids, empty_mask)
    split, merge_ = make_split(["prior"], exclude=CLIP_STATS)

    def save(out_dir: str, pipe_, params_) -> None:
        pipe_.save_pretrained(out_dir, {k: v for k, v in params_.items() if k != "image_encoder"})

    objective = Objective(name="prior", collate=caption_image_collate(pipe, processor), split=split, merge=merge_,
                          loss=loss, save=save, pipeline_class=type(pipe))
    return objective, pipe, {**params, "image_encoder": encoder_params}


__all__ = ["PriorLoss", "build", "caption_image_collate", "image_encoder_folders", "image_encoder_option",
           "load_image_encoder"]
