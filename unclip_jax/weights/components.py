"""Loading one component folder (config.json + PyTorch weights) as a Flax module and its params.

A component is identified by its config's class (`architectures[0]` for transformers,
`_class_name` for diffusers); `ARCHITECTURES` maps each class we implement to a builder that makes the
Flax module, the dummy inputs for its abstract init, and the conversion Rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import clip, dpt, prior, unet, vae
from unclip_jax.weights import prior as prior_rules
from unclip_jax.weights import tables
from unclip_jax.weights.dpt import DPT
from unclip_jax.weights.unet import UNET
from unclip_jax.weights.vae import VAE
from unclip_jax.weights.checkpoint import load_state_dict, read_config
from unclip_jax.weights.convert import Rules, abstract_params, convert
from unclip_jax.weights.errors import CheckpointError


@dataclass(frozen=True)
class Built:
    module: Any
    dummy_inputs: tuple
    rules: Rules


def _clip_text(projection: bool) -> Callable[[dict, Any], Built]:
    def build(config: dict, dtype) -> Built:
        c = clip.CLIPTextConfig.from_dict(config)
        return Built(clip.CLIPTextModel(c, with_projection=projection, dtype=dtype), clip.dummy_text_inputs(c),
                     tables.CLIP_TEXT)
    return build


def _clip_vision(projection: bool) -> Callable[[dict, Any], Built]:
    def build(config: dict, dtype) -> Built:
        c = clip.CLIPVisionConfig.from_dict(config)
        return Built(clip.CLIPVisionModel(c, with_projection=projection, dtype=dtype), clip.dummy_vision_inputs(c),
                     tables.CLIP_VISION)
    return build


def _unet(config: dict, dtype) -> Built:
    c = unet.UNet2DConditionConfig.from_dict(config)
    return Built(unet.UNet2DConditionModel(c, dtype=dtype), unet.dummy_inputs(c), UNET)


def _vae(config: dict, dtype) -> Built:
    c = vae.AutoencoderKLConfig.from_dict(config)
    return Built(vae.AutoencoderKL(c, dtype=dtype), vae.dummy_inputs(c), VAE)


def _prior(config: dict, dtype) -> Built:
    c = prior.PriorTransformerConfig.from_dict(config)
    return Built(prior.PriorTransformer(c, dtype=dtype), prior.dummy_prior_inputs(c), prior_rules.PRIOR)


def _image_normalizer(config: dict, dtype) -> Built:
    del dtype  # two vectors, applied in float32
    c = prior.ImageNormalizerConfig.from_dict(config)
    return Built(prior.StableUnCLIPImageNormalizer(c), prior.dummy_normalizer_inputs(c), prior_rules.IMAGE_NORMALIZER)


def _dpt(config: dict, dtype) -> Built:
    c = dpt.DPTConfig.from_dict(config)
    return Built(dpt.DPTForDepthEstimation(c, dtype=dtype), dpt.dummy_inputs(c), DPT)


ARCHITECTURES: dict[str, Callable[[dict, Any], Built]] = {
    "DPTForDepthEstimation": _dpt,
    "UNet2DConditionModel": _unet,
    "AutoencoderKL": _vae,
    "PriorTransformer": _prior,
    "StableUnCLIPImageNormalizer": _image_normalizer,
    "CLIPTextModel": _clip_text(False),
    "CLIPTextModelWithProjection": _clip_text(True),
    "CLIPVisionModel": _clip_vision(False),
    "CLIPVisionModelWithProjection": _clip_vision(True),
}


def architecture_of(config: dict, folder: str = "") -> str:
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name is None:
        raise CheckpointError(f"{folder}/config.json: names no model class (`_class_name` or `architectures`)")
    return name


def build(config: dict, dtype=jnp.float32, architecture: str | None = None, folder: str = "") -> Built:
    """The Flax module for a component config (compute dtype `dtype`)."""
    name = architecture or architecture_of(config, folder)
    if name not in ARCHITECTURES:
        raise CheckpointError(
            f"{folder or 'config'}: model class {name!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[name](config, dtype)


def load_component(
    folder: str,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    variant: str | None = None,
    architecture: str | None = None,
):
    """Reads `folder`'s config and PyTorch weights; returns (module, params).

    Args:
      dtype: compute dtype of the module.
      param_dtype: dtype of the params (default: float32).
      variant: weight file variant, e.g. "fp16" for `model.fp16.safetensors`.
      architecture: the model class, if the config does not name it.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such component folder")
    # Every file is checked (config parsed, safetensors headers and sizes read) before any model work.
    config = read_config(folder)
    state = load_state_dict(folder, variant)
    built = build(config, dtype, architecture, folder)
    abstract = abstract_params(built.module, *built.dummy_inputs)
    params = convert(state, abstract, built.rules, what=folder, dtype=param_dtype or jnp.float32)
    # A param whose layout and dtype needed no change is still a view of the memory-mapped file, and
    # would keep every page of it that was read resident: copied, the whole file is released.
    params = jax.tree.map(lambda x: x if x.flags.owndata else np.array(x), params)
    return built.module, params
