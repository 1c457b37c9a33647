"""The pipelines' base class and the loading of a pipeline's components from a folder.

The disk format (model_index.json, component folders, orbax params, atomic writes), the hub and the
one model-component loader live in `unclip_jax.weights`; here each component named in model_index.json
becomes its object by its class: a model through `weights.components.load_component`, a scheduler from
its scheduler_config.json, a tokenizer, an image processor.
"""

from __future__ import annotations

import os
from typing import Any

import huggingface_hub
import jax.numpy as jnp

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.image_processing_dpt import DPTImageProcessor
from unclip_jax.schedulers import SCHEDULERS, scheduler_from_config
from unclip_jax.tokenizer import load_tokenizer
from unclip_jax.weights import ldm
from unclip_jax.weights.checkpoint import pipeline_weight_sets, read_config
from unclip_jax.weights.components import ShardingSpec, load_component
from unclip_jax.weights.folder import (
    TOKENIZER_CLASSES,
    component_class,
    component_listing,
    read_model_index,
    save_pipeline,
)
from unclip_jax.weights.errors import CheckpointError, ConversionError
from unclip_jax.weights.export import diffusers_writer
from unclip_jax.weights.hub import is_repo_id, resolve
from unclip_jax.weights.single_file import convert_component, has_prefix, infer_kind, leftovers, open_single_file

# transformers v5 records its PIL-backend classes (`...Pil`) in folders it saves.
PROCESSORS = {
    **dict.fromkeys(("CLIPImageProcessor", "CLIPFeatureExtractor", "CLIPImageProcessorPil"),
                    CLIPImageProcessor.from_pretrained),
    **dict.fromkeys(("DPTImageProcessor", "DPTFeatureExtractor", "DPTImageProcessorPil"),
                    DPTImageProcessor.from_pretrained),
}


def load_pipeline(
    folder: str,
    names: tuple[str, ...],
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    overrides: dict[str, Any] | None = None,
    sharding: ShardingSpec | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads the components `names` of a pipeline folder.

    Returns (components, params): components maps each name to a Flax module, scheduler, tokenizer
    or processor; params maps each model's name to its param tree. An override is either a
    non-model component or, for a model, a `(module, params)` pair. `variant` applies per component
    (a component without it loads its plain weights); `sharding` places the params (see
    `PipelineBase.from_pretrained`).
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(names)
    if unknown:
        raise TypeError(f"unknown component(s) {sorted(unknown)}; this pipeline has {list(names)}")
    index = read_model_index(folder)
    classes = {n: component_class(index, n, folder) for n in names if n not in overrides}
    weights = pipeline_weight_sets(component_listing(folder, classes), variant, folder)
    components: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for name in names:
        if name in overrides:
            value = overrides[name]
            if isinstance(value, tuple) and len(value) == 2:
                components[name], params[name] = value
            else:
                components[name] = value
            continue
        cls = classes[name]
        sub = os.path.join(folder, name)
        if cls is None:
            components[name] = None
        elif cls in SCHEDULERS:
            components[name] = SCHEDULERS[cls].from_config(read_config(sub, "scheduler_config.json"))
        elif cls in TOKENIZER_CLASSES:
            components[name] = load_tokenizer(sub)
        elif cls in PROCESSORS:
            components[name] = PROCESSORS[cls](sub)
        else:
            chosen = weights[name].variant if name in weights else variant
            components[name], params[name] = load_component(sub, dtype=dtype, variant=chosen, architecture=cls,
                                                            sharding=sharding, name=name)
    return components, params


def load_single_file(cls, path: str, *, config: str | None = None, prediction_type: str | None = None,
                     dtype=jnp.float32, revision: str | None = None, local_files_only: bool = False,
                     cache_dir: str | None = None, **components) -> tuple[Any, dict]:
    """(pipeline, params) of pipeline class `cls` from a single file; see `PipelineBase.from_single_file`."""
    state = open_single_file(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    kind = infer_kind(shapes, path)
    if config is None:
        if cls.__name__ not in kind.configs:
            fits = f"it fits {', '.join(kind.configs)}" if kind.configs else "no default configs"
            raise CheckpointError(f"{path} is {kind.name} ({fits}): pass `config=` (--config-from) a diffusers "
                                  f"folder or hub id of {cls.__name__} to take the configs from")
        config = kind.configs[cls.__name__]
    in_file = [n for n in cls.COMPONENTS if n in ldm.COMPONENTS and n not in components
               and has_prefix(shapes, ldm.COMPONENTS[n][0])]
    left = leftovers(shapes, ())
    if left:
        raise ConversionError(path, unexpected=left)
    where = dict(revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    rest = tuple(n for n in cls.COMPONENTS if n not in in_file and n not in components)
    folder = resolve(config, rest, **where)
    index = read_model_index(folder)
    missing = [n for n in cls.COMPONENTS if n not in components and (
        n not in index or (n not in in_file and index[n][1] is not None and not os.path.isdir(os.path.join(folder, n))))]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}, and {config} (config) has none: pass `config=` "
                              f"(--config-from) a diffusers folder or hub id of {cls.__name__} that has them")
    overrides = dict(components)
    for name in in_file:
        sub = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(sub, "config.json")) and is_repo_id(config):
            sub = os.path.dirname(huggingface_hub.hf_hub_download(config, f"{name}/config.json", **where))
        overrides[name] = convert_component(state, shapes, name, read_config(sub), dtype=dtype, what=path)
    if "scheduler" in cls.COMPONENTS and "scheduler" not in components:
        sched = read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
        overrides["scheduler"] = scheduler_from_config(sched, prediction_type=prediction_type or kind.prediction_type)
    comps, params = load_pipeline(folder, cls.COMPONENTS, dtype=dtype, overrides=overrides)
    pipe = cls(**comps)
    pipe._source, pipe._index = folder, index
    return pipe, params


class PipelineBase:
    """A pipeline is its components (modules, schedulers, tokenizers, processors); params travel
    separately, as a dict component name -> param tree."""

    COMPONENTS: tuple[str, ...] = ()

    def __init__(self, **components):
        missing = set(self.COMPONENTS) - set(components)
        extra = set(components) - set(self.COMPONENTS)
        if missing or extra:
            raise TypeError(f"{type(self).__name__} takes components {list(self.COMPONENTS)}; "
                            f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in self.COMPONENTS:
            setattr(self, name, components[name])
        self._source: str | None = None
        self._index: dict | None = None
        # Components loaded from elsewhere (e.g. a prior from another checkpoint): name -> (source
        # component folder, model_index entry), so save_pretrained writes them whole.
        self._foreign: dict[str, tuple[str, list]] = {}

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, dtype=jnp.float32, variant: str | None = None,
                        revision: str | None = None, local_files_only: bool = False, cache_dir: str | None = None,
                        sharding: ShardingSpec | None = None, **components):
        """(pipeline, params) from a diffusers-format folder (PyTorch weights converted on load), a
        folder written by `save_pretrained` (no torch needed), or a hub repo id.

        Args:
          dtype: the models' compute dtype (params keep the dtype they were saved in; converted
            PyTorch weights become float32).
          variant, revision, local_files_only, cache_dir: as in diffusers (see `hub.resolve`); a
            component without files of `variant` loads its plain weights.
          sharding: where params go: a `jax.sharding.Sharding` for every param (e.g.
            `NamedSharding(mesh, P())`, replicated), or a callable
            `(component, "path/to/param", jax.ShapeDtypeStruct) -> Sharding`. Saved (orbax) params are
            read straight into it; converted ones are placed after conversion.
          **components: replace the folder's: a scheduler, tokenizer or processor object, or a
            `(module, params)` pair for a model.
        """
        names = tuple(n for n in cls.COMPONENTS if n not in components)
        folder = resolve(path_or_repo_id, names, variant=variant, revision=revision,
                         local_files_only=local_files_only, cache_dir=cache_dir)
        comps, params = load_pipeline(folder, cls.COMPONENTS, dtype=dtype, variant=variant, overrides=components,
                                      sharding=sharding)
        pipe = cls(**comps)
        pipe._source, pipe._index = folder, read_model_index(folder)
        return pipe, params

    @classmethod
    def from_single_file(cls, path: str, *, config: str | None = None, prediction_type: str | None = None,
                         dtype=jnp.float32, revision: str | None = None, local_files_only: bool = False,
                         cache_dir: str | None = None, **components):
        """(pipeline, params) from Stability's single-file checkpoint (`.ckpt` needs the torch extra;
        `.safetensors` does not) in the original LDM key layout: sd21-unclip-h/-l or 512-depth-ema.

        Args:
          config: a diffusers folder or hub id giving the models' configs and what the file lacks
            (tokenizer, schedulers, processors, an image encoder or depth estimator); default: the hub
            repo of the kind the file's tensor shapes reveal.
          prediction_type: the scheduler's (default: v_prediction for unCLIP, epsilon for depth).
          dtype, revision, local_files_only, cache_dir, **components: as in `from_pretrained`.
        """
        return load_single_file(cls, path, config=config, prediction_type=prediction_type, dtype=dtype,
                                revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                                **components)

    def save_pretrained(self, directory: str, params: dict[str, Any], *, overwrite: bool = False,
                        format: str = "orbax", dtype: str = "fp32", variant: str | None = None) -> None:
        """Writes configs, tokenizer/processor files and the params: orbax (loading it needs no torch), or
        with `format="diffusers"` PyTorch-named safetensors that diffusers' `from_pretrained` loads (`dtype`
        "fp32", "fp16" or "bf16"; `variant` names the files, e.g. `model.fp16.safetensors`; no torch needed).

        `directory` must not exist; with `overwrite`, an existing pipeline folder (one with
        model_index.json) is replaced, atomically; anything else there is refused before any work."""
        if format not in ("orbax", "diffusers"):
            raise ValueError(f"format must be 'orbax' or 'diffusers'; got {format!r}")
        writer = diffusers_writer(dtype, variant) if format == "diffusers" else None
        index = {**(self._index or {}), "_class_name": type(self).__name__}
        sources = {n: os.path.join(self._source or "", n) for n in self.COMPONENTS}
        for name, (src, entry) in self._foreign.items():
            sources[name], index[name] = src, entry
        index = {k: v for k, v in index.items() if k.startswith("_") or k in self.COMPONENTS}
        save_pipeline(directory, sources, index, {n: getattr(self, n) for n in self.COMPONENTS}, params,
                      overwrite=overwrite, write_params=writer)
