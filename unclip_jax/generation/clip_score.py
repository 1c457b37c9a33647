"""CLIP score per image, as torchmetrics' CLIPScore computes it: 100 * max(cos(a, b), 0) between the
projected CLIP embeddings of an image and a caption (or, for image variations, of the image and its
source image).

Towers: a CLIP checkpoint folder (transformers' CLIPModel layout: config.json with `text_config` and
`vision_config`, weights, tokenizer files, preprocessor_config.json) loaded into our text and vision
models with projections (`CLIPScorer.from_pretrained`); or, for StableUnCLIPImg2ImgPipeline, the
pipeline's own image encoder and feature extractor (image-to-image score, `CLIPScorer.from_pipeline`).
The other pipelines hold no CLIP image tower, so they are scored only with a named checkpoint.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import clip


@functools.partial(jax.jit, static_argnums=(0,))
def _text_embeds(model, params, ids, mask):
    return model.apply({"params": params}, ids, mask).embeds


@functools.partial(jax.jit, static_argnums=(0,))
def _image_embeds(model, params, pixels):
    return model.apply({"params": params}, pixels).embeds


def cosine(a, b) -> np.ndarray:
    """Row-wise cosine similarity of [B, D] embeddings, in float64 on the host."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def clip_score(a, b) -> np.ndarray:
    """torchmetrics' CLIPScore per row: 100 * max(cos, 0)."""
    return 100.0 * np.maximum(cosine(a, b), 0.0)


class CLIPScorer:
    """Scores images against captions (`score_text`) or against other images (`score_images`)."""

    def __init__(self, vision, vision_params, processor, text=None, text_params=None, tokenizer=None, name=""):
        self.vision, self.vision_params, self.processor = vision, vision_params, processor
        self.text, self.text_params, self.tokenizer = text, text_params, tokenizer
        self.name = name

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @classmethod
    def from_pretrained(cls, folder: str) -> CLIPScorer:
        """A transformers CLIPModel folder -> a scorer with both towers (ours, with projections)."""
        from unclip_jax.image_processing import CLIPImageProcessor  # noqa: PLC0415
        from unclip_jax.tokenizer import load_tokenizer  # noqa: PLC0415
        from unclip_jax.weights import tables  # noqa: PLC0415
        from unclip_jax.weights.checkpoint import load_state_dict, read_config  # noqa: PLC0415
        from unclip_jax.weights.convert import abstract_params, convert  # noqa: PLC0415
        from unclip_jax.weights.errors import CheckpointError  # noqa: PLC0415

        if not os.path.isdir(folder):
            raise CheckpointError(f"--clip-model {folder}: no such folder")
        config = read_config(folder)
        if "text_config" not in config or "vision_config" not in config:
            raise CheckpointError(f"{folder}/config.json: not a CLIPModel config (needs text_config and vision_config)")
        dim = config.get("projection_dim", 512)
        text_config = clip.CLIPTextConfig.from_dict({**config["text_config"], "projection_dim": dim})
        vision_config = clip.CLIPVisionConfig.from_dict({**config["vision_config"], "projection_dim": dim})
        state = load_state_dict(folder)
        text = clip.CLIPTextModel(text_config, with_projection=True)
        vision = clip.CLIPVisionModel(vision_config, with_projection=True)

        def tower(model, inputs, prefixes, rules):
            part = {k: state[k] for k in state if k.startswith(prefixes)}
            return convert(part, abstract_params(model, *inputs), rules, what=folder, dtype=jnp.float32)

        text_params = tower(text, clip.dummy_text_inputs(text_config), ("text_model.", "text_projection."),
                            tables.CLIP_TEXT)
        vision_params = tower(vision, clip.dummy_vision_inputs(vision_config), ("vision_model.", "visual_projection."),
                              tables.CLIP_VISION)
        return cls(vision, vision_params, CLIPImageProcessor.from_pretrained(folder), text, text_params,
                   load_tokenizer(folder), name=folder)

    @classmethod
    def from_pipeline(cls, pipe, params) -> CLIPScorer | None:
        """The pipeline's own CLIP image tower (StableUnCLIPImg2ImgPipeline), image-to-image only; None for
        pipelines without one."""
        encoder = getattr(pipe, "image_encoder", None)
        if encoder is None:
            return None
        return cls(encoder, params["image_encoder"], pipe.feature_extractor, name="the pipeline's image encoder")

    def image_embeds(self, images) -> np.ndarray:
        """Images (PIL, list, or [B, H, W, 3] uint8 / float in [0, 1]) -> projected embeddings [B, P]."""
        return np.asarray(_image_embeds(self.vision, self.vision_params, jnp.asarray(self.processor(images))))

    def text_embeds(self, texts: list[str]) -> np.ndarray:
        """Captions -> projected embeddings [B, P]; longer captions are cut to the model's context, as
        torchmetrics does."""
        from unclip_jax.tokenizer import tokenize  # noqa: PLC0415

        ids, mask = tokenize(self.tokenizer, list(texts))
        return np.asarray(_text_embeds(self.text, self.text_params, jnp.asarray(ids), jnp.asarray(mask)))

    def score_text(self, images, texts: list[str]) -> np.ndarray:
        """[B] CLIP scores of images against captions."""
        return clip_score(self.image_embeds(images), self.text_embeds(texts))

    def score_images(self, images, sources) -> np.ndarray:
        """[B] CLIP scores of images against source images."""
        return clip_score(self.image_embeds(images), self.image_embeds(sources))
