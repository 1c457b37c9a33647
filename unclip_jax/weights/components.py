"""Loading one model component folder as a Flax module and its params: the one loader.

A component folder holds a config.json and either the orbax checkpoint that `save_pipeline` writes
(`orbax_params/`, no torch needed) or PyTorch weights (safetensors, or a pickle with the torch extra),
converted as they load. A component is identified by its config's class (`architectures[0]` for
transformers, `_class_name` for diffusers); `ARCHITECTURES` maps each class we implement to a builder
that makes the Flax module, the dummy inputs for its abstract init, and its conversion table. Either
way the params are checked against the abstract init before any data is read, and can be placed in a
sharding as they load.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import jax
import jax.numpy as jnp

from unclip_jax.models import clip, dpt, prior, unet, vae
from unclip_jax.weights import tables
from unclip_jax.weights.checkpoint import load_state_dict, read_config
from unclip_jax.weights.convert import Rules, abstract_params, convert
from unclip_jax.weights.errors import CheckpointError
from unclip_jax.weights.orbax_io import ORBAX_DIR, restore_params, saved_structure
from unclip_jax.weights.tree import check_tree, param_path

# Where params go: one sharding for every param, or (component, "path/to/param", abstract) -> sharding.
ShardingSpec = Union[jax.sharding.Sharding, Callable[[str, str, jax.ShapeDtypeStruct], jax.sharding.Sharding]]


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
    return Built(unet.UNet2DConditionModel(c, dtype=dtype), unet.dummy_inputs(c),
                 tables.UNET if c.use_linear_projection else tables.UNET_CONV_PROJECTION)


def _vae(config: dict, dtype) -> Built:
    c = vae.AutoencoderKLConfig.from_dict(config)
    return Built(vae.AutoencoderKL(c, dtype=dtype), vae.dummy_inputs(c), tables.VAE)


def _prior(config: dict, dtype) -> Built:
    c = prior.PriorTransformerConfig.from_dict(config)
    return Built(prior.PriorTransformer(c, dtype=dtype), prior.dummy_prior_inputs(c), tables.PRIOR)


def _image_normalizer(config: dict, dtype) -> Built:
    del dtype  # two vectors, applied in float32
    c = prior.ImageNormalizerConfig.from_dict(config)
    return Built(prior.StableUnCLIPImageNormalizer(c), prior.dummy_normalizer_inputs(c), tables.IMAGE_NORMALIZER)


def _dpt(config: dict, dtype) -> Built:
    c = dpt.DPTConfig.from_dict(config)
    return Built(dpt.DPTForDepthEstimation(c, dtype=dtype), dpt.dummy_inputs(c), tables.DPT)


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


def placements(sharding: ShardingSpec | None, component: str, abstract):
    """The tree of shardings for `abstract`'s params (None: no placement asked)."""
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, abstract)
    return jax.tree_util.tree_map_with_path(lambda p, x: sharding(component, param_path(p), x), abstract)


def load_component(
    folder: str,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    variant: str | None = None,
    architecture: str | None = None,
    sharding: ShardingSpec | None = None,
    name: str | None = None,
    orbax: bool = True,
):
    """Reads `folder`'s config and params (orbax if the folder has them, else PyTorch weights);
    returns (module, params).

    Args:
      dtype: compute dtype of the module.
      param_dtype: dtype of the params (default: the saved dtype for orbax params, float32 for
        converted PyTorch weights).
      variant: PyTorch weight file variant, e.g. "fp16" for `model.fp16.safetensors`.
      architecture: the model class, if the config does not name it.
      sharding: where the params go (see `PipelineBase.from_pretrained`); orbax params are read
        straight into it, converted ones are placed after conversion.
      name: the component's name given to a callable `sharding` (default: the folder's name).
      orbax: False reads the PyTorch weights even where the folder has orbax params (conversion).
    Raises CheckpointError naming the file at fault, ConversionError listing every missing,
    unexpected and mis-shaped tensor; both before any param data is read.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such component folder")
    name = name or os.path.basename(os.path.normpath(folder))
    # Every file is checked (config parsed, safetensors headers or orbax metadata read) before model work.
    config = read_config(folder)
    saved = os.path.join(folder, ORBAX_DIR)
    if orbax and os.path.isdir(saved):
        structure = saved_structure(saved)
        built = build(config, dtype, architecture, folder)
        check_tree(structure, abstract_params(built.module, *built.dummy_inputs), folder, source="saved params")
        # The saved param dtype wins over the abstract init's float32 unless one is asked for; orbax
        # reads each array straight into its sharding, so no full host copy is made first.
        where = placements(sharding, name, structure)
        if where is None and param_dtype is None:
            return built.module, restore_params(saved)
        where = where or placements(jax.sharding.SingleDeviceSharding(jax.devices()[0]), name, structure)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, param_dtype or x.dtype, sharding=s),
                              structure, where)
        return built.module, restore_params(saved, target)
    state = load_state_dict(folder, variant)
    built = build(config, dtype, architecture, folder)
    abstract = abstract_params(built.module, *built.dummy_inputs)
    params = convert(state, abstract, built.rules, what=folder, dtype=param_dtype or jnp.float32)
    where = placements(sharding, name, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    return built.module, params if where is None else jax.device_put(params, where)
