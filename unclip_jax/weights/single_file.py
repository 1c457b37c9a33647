"""Stability's single-file checkpoints (sd21-unclip-h/-l.ckpt, 512-depth-ema.ckpt): reading, kind, models.

What the file is comes from its tensor shapes: a 5-channel `conv_in` is SD 2 depth, a class-embedding
input of width 2048 / 1536 is Stable unCLIP H / L (`KINDS`). The models the file holds (`ldm.COMPONENTS`:
UNet, VAE, OpenCLIP text encoder, and for unCLIP the image encoder and normalizer when present) are
converted from it through the LDM tables; their configs and everything else the pipeline needs
(tokenizer, schedulers, feature extractor, an image encoder the file lacks, the DPT depth estimator)
come from a diffusers folder or hub id (`config`, default: the kind's hub repo). The scheduler gets the
kind's prediction type (v for unCLIP, epsilon for depth) unless `prediction_type` says otherwise.

`.safetensors` files are read without torch; `.ckpt` files through torch's weights-only loader (the
torch extra).

Assembling the pipeline is `pipelines.loading.load_single_file` (`from_single_file`); writing it as an
orbax folder, `conversion.convert_single_file`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from unclip_jax.weights import components as registry
from unclip_jax.weights import ldm
from unclip_jax.weights.checkpoint import read_pickle
from unclip_jax.weights.convert import abstract_params, convert, plan
from unclip_jax.weights.errors import CheckpointError
from unclip_jax.weights.safetensors_io import SafetensorsFile

SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of single file: where its missing parts come from by default, its prediction type."""

    name: str
    configs: Mapping[str, str]  # pipeline class -> default diffusers repo for configs and missing parts
    prediction_type: str
    pipeline: str  # what `convert FILE OUT` makes of it without --config-from


_UNCLIP_H = Kind("Stable unCLIP H (sd21-unclip-h)",
                 {"StableUnCLIPImg2ImgPipeline": "stabilityai/stable-diffusion-2-1-unclip",
                  "StableUnCLIPPipeline": "diffusers/stable-diffusion-2-1-unclip-t2i-h"}, "v_prediction",
                 "StableUnCLIPImg2ImgPipeline")
_UNCLIP_L = Kind("Stable unCLIP L (sd21-unclip-l)",
                 {"StableUnCLIPImg2ImgPipeline": "stabilityai/stable-diffusion-2-1-unclip-small",
                  "StableUnCLIPPipeline": "diffusers/stable-diffusion-2-1-unclip-t2i-l"}, "v_prediction",
                 "StableUnCLIPImg2ImgPipeline")
_DEPTH = Kind("Stable Diffusion 2 depth (512-depth-ema)",
              {"StableDiffusionDepth2ImgPipeline": "stabilityai/stable-diffusion-2-depth"}, "epsilon",
              "StableDiffusionDepth2ImgPipeline")

# A Stable unCLIP UNet of another size (a fine-tune or a test model): its configs must be given.
_UNCLIP_OTHER = Kind("a Stable unCLIP checkpoint of another size", {}, "v_prediction",
                     "StableUnCLIPImg2ImgPipeline")

_CONV_IN = ldm.UNET_PREFIX + "input_blocks.0.0.weight"
_CLASS_IN = ldm.UNET_PREFIX + "label_emb.0.0.weight"
# (tensor, axis, size or None for any) -> kind: the first rule that matches decides.
KINDS = (
    (_CONV_IN, 1, 5, _DEPTH),
    (_CLASS_IN, 1, 2048, _UNCLIP_H),
    (_CLASS_IN, 1, 1536, _UNCLIP_L),
    (_CLASS_IN, 1, None, _UNCLIP_OTHER),
)


def is_single_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(SINGLE_FILE_EXTENSIONS)


def open_single_file(path: str) -> Mapping:
    """The file's tensors (name -> numpy array; safetensors memory-mapped, headers checked now)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if not path.endswith(SINGLE_FILE_EXTENSIONS):
        raise CheckpointError(f"{path}: not a checkpoint file (expected one of {', '.join(SINGLE_FILE_EXTENSIONS)})")
    # A Lightning checkpoint (Stability's .ckpt) keeps the state dict under "state_dict", beside counters.
    obj = read_pickle(path, "checkpoint")
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: not a state dict (a {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


def infer_kind(shapes: Mapping[str, tuple], path: str = "checkpoint") -> Kind:
    """What a single file is, from its tensor shapes."""
    if _CONV_IN not in shapes:
        raise CheckpointError(f"{path}: not a Stable Diffusion (LDM) checkpoint: no tensor {_CONV_IN!r}")
    for key, axis, size, kind in KINDS:
        if key in shapes and len(shapes[key]) > axis and size in (None, shapes[key][axis]):
            return kind
    seen = {k: shapes[k] for k in (_CONV_IN, _CLASS_IN) if k in shapes}
    raise CheckpointError(f"{path}: not a checkpoint this reads (Stable unCLIP H/L, SD 2 depth): {seen}")


def has_prefix(shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def leftovers(shapes, used_prefixes) -> list[str]:
    """Tensors that belong to no model of the file and are not known non-params."""
    known = [re.compile(p) for p in ldm.NOT_PARAMS]
    prefixes = tuple(prefix for prefix, _ in ldm.COMPONENTS.values()) + tuple(used_prefixes)
    return sorted(k for k in shapes if not k.startswith(prefixes) and not any(p.fullmatch(k) for p in known))


def convert_component(state: Mapping, shapes: Mapping, name: str, config: dict, *, dtype=jnp.float32,
                      param_dtype=None, what: str = "checkpoint"):
    """One model of a single file -> (module, params), its config from a diffusers folder."""
    prefix, table = ldm.COMPONENTS[name]
    built = registry.build(config, dtype, folder=f"{what} ({name})")
    view = ldm.LDMView(state, prefix, shapes)
    abstract = abstract_params(built.module, *built.dummy_inputs)
    params = convert(view, abstract, table(config), what=f"{what}: {name}", dtype=param_dtype or jnp.float32)
    return built.module, params


def plan_component(shapes: Mapping, name: str, config: dict, what: str = "checkpoint"):
    """The plan of one model of a single file, from shapes alone (nothing allocated)."""
    prefix, table = ldm.COMPONENTS[name]
    built = registry.build(config, folder=f"{what} ({name})")
    view = ldm.LDMView({}, prefix, shapes)
    return plan({k: view.shape(k) for k in view}, abstract_params(built.module, *built.dummy_inputs),
                table(config), what=f"{what}: {name}")

