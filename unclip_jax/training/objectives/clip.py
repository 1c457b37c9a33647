"""The CLIP objective (Radford et al. 2021): the text and vision towers, with their projections, trained
contrastively, as transformers' CLIPModel computes its loss with `return_loss=True`: the projected
embeddings are L2-normalised, logits = exp(logit_scale) * text @ image^T, and the loss is the mean of the
cross-entropies over rows (text -> image) and columns (image -> text) with the diagonal as the labels.

The towers are those of a Karlo-style prior: StableUnCLIPPipeline's prior text encoder
(CLIPTextModelWithProjection) and the image encoder that `options["image_encoder"]` names (as for the prior
objective; its projection width must be the text tower's). Both towers and `logit_scale` (a scalar param,
`options["logit_scale"]`, default log(1 / 0.07) as CLIP starts) are trained.

`save` writes the pipeline folder (its prior text encoder trained), the image encoder as a component
folder `image_encoder/` inside it (config and processor files, orbax params) and `logit_scale.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.params import make_split, merge
from unclip_jax.training.objectives.prior import caption_image_collate, image_encoder_folders, image_encoder_option

EXTRA = ("image_encoder", "logit_scale")  # params beside the pipeline's own


def contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array):
    """(loss, logits_per_text [B, B]) of projected embeddings [B, P] (float32)."""
    text = text_embeds.astype(jnp.float32)
    image = image_embeds.astype(jnp.float32)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    logits = jnp.exp(logit_scale) * text @ image.T

    def cross_entropy(x):  # the diagonal is each row's label
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(x, axis=-1)))

    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2.0, logits


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a jit closure's constant
class CLIPLoss:
    """`loss(trainable, frozen, batch, key)` (no random draws: `key` is unused)."""

    pipe: Any
    image_encoder: Any

    def draw(self, key, batch):
        return {}

    def given(self, trainable, frozen, batch, draws):
        params = merge(trainable, frozen)
        text = self.pipe.prior_text_encoder.apply({"params": params["prior_text_encoder"]}, batch["prior_input_ids"],
                                                  batch["prior_attention_mask"]).embeds
        image = self.image_encoder.apply({"params": params["image_encoder"]}, batch["clip_pixel_values"]).embeds
        loss, logits = contrastive_loss(text, image, params["logit_scale"])
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0]))
        return loss, {"accuracy": accuracy, "logit_scale": params["logit_scale"]}

    def __call__(self, trainable, frozen, batch, key):
        return self.given(trainable, frozen, batch, {})


def build(pipe, params, options: dict):
    """The CLIP objective on a StableUnCLIPPipeline's prior text encoder and an image encoder (module doc)."""
    from unclip_jax.weights.folder import copy_aux_files  # noqa: PLC0415
    from unclip_jax.pipelines.stable_unclip import StableUnCLIPPipeline  # noqa: PLC0415
    from unclip_jax.weights.orbax_io import ORBAX_DIR, save_params  # noqa: PLC0415

    if not isinstance(pipe, StableUnCLIPPipeline):
        raise TypeError("the clip objective trains a StableUnCLIPPipeline's prior text encoder with an image encoder; "
                        f"got {type(pipe).__name__}")
    text_tower = pipe.prior_text_encoder
    encoder, encoder_params, processor = image_encoder_option(
        options, "clip", text_tower.dtype, text_tower.config.projection_dim, "the text tower's projection")
    logit_scale = jnp.float32(options.get("logit_scale", math.log(1 / 0.07)))
    split, merge_ = make_split(["prior_text_encoder", *EXTRA])
    encoder_folder, processor_folder = image_encoder_folders(str(options["image_encoder"]))

    def save(out_dir: str, pipe_, params_) -> None:
        pipe_.save_pretrained(out_dir, {k: v for k, v in params_.items() if k not in EXTRA})
        sub = os.path.join(out_dir, "image_encoder")
        os.makedirs(sub)
        copy_aux_files(encoder_folder, sub)
        copy_aux_files(processor_folder, sub)
        save_params(os.path.join(sub, ORBAX_DIR), params_["image_encoder"])
        with open(os.path.join(out_dir, "logit_scale.json"), "w") as f:
            json.dump({"logit_scale": float(params_["logit_scale"])}, f)

    objective = Objective(name="clip", collate=caption_image_collate(pipe, processor), split=split, merge=merge_,
                          loss=CLIPLoss(pipe, encoder), save=save, pipeline_class=type(pipe))
    return objective, pipe, {**params, "image_encoder": encoder_params, "logit_scale": logit_scale}


__all__ = ["CLIPLoss", "build", "contrastive_loss"]
