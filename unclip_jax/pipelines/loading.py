"""Pipeline folders: diffusers' layout (model_index.json + one folder per component) in, and out.

`load_pipeline` reads each component named in model_index.json by its class: models (converted from
PyTorch weights, or restored from the orbax checkpoint that `save_pipeline` writes beside their
config), schedulers (from scheduler_config.json), tokenizers and image processors. Components given
by keyword replace the folder's. `save_pipeline` writes the same layout with orbax params, so a saved
folder loads without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.tokenizer import load_tokenizer
from unclip_jax.weights import components as registry
from unclip_jax.weights.checkpoint import read_config
from unclip_jax.weights.convert import abstract_params
from unclip_jax.weights.orbax_io import restore_params, save_params
from unclip_jax.weights.safetensors_io import CheckpointError

ORBAX_DIR = "orbax_params"
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


def _processor_loaders():
    from unclip_jax.image_processing_dpt import DPTImageProcessor  # noqa: PLC0415

    # transformers v5 records its PIL-backend classes (`...Pil`) in folders it saves.
    return {
        **dict.fromkeys(("CLIPImageProcessor", "CLIPFeatureExtractor", "CLIPImageProcessorPil"),
                        CLIPImageProcessor.from_pretrained),
        **dict.fromkeys(("DPTImageProcessor", "DPTFeatureExtractor", "DPTImageProcessorPil"),
                        DPTImageProcessor.from_pretrained),
    }


def read_model_index(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such pipeline folder")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing (not a diffusers pipeline folder)") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def component_class(index: dict, name: str, folder: str) -> str | None:
    entry = index.get(name)
    if entry is None:
        raise CheckpointError(f"{folder}/model_index.json: names no component {name!r}")
    if entry[1] is None:  # an optional component saved as absent
        return None
    return entry[1]


def _load_model(sub: str, cls: str, dtype, variant):
    if os.path.isdir(os.path.join(sub, ORBAX_DIR)):
        built = registry.build(read_config(sub), dtype, cls, sub)
        target = abstract_params(built.module, *built.dummy_inputs)
        # The saved param dtype wins over the abstract init's float32.
        params = restore_params(os.path.join(sub, ORBAX_DIR))
        _check_tree(params, target, sub)
        return built.module, params
    return registry.load_component(sub, dtype=dtype, variant=variant, architecture=cls)


def _check_tree(params, target, where: str) -> None:
    import jax  # noqa: PLC0415

    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        bad = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        raise CheckpointError(f"{where}: saved params do not fit the config: missing {missing[:10]}, "
                              f"unexpected {extra[:10]}, wrong shape {bad[:10]}")


def load_pipeline(
    folder: str,
    names: tuple[str, ...],
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads the components `names` of a pipeline folder.

    Returns (components, params): components maps each name to a Flax module, scheduler, tokenizer
    or processor; params maps each model's name to its param tree. An override is either a
    non-model component or, for a model, a `(module, params)` pair.
    """
    from unclip_jax.schedulers import SCHEDULERS  # noqa: PLC0415

    overrides = dict(overrides or {})
    unknown = set(overrides) - set(names)
    if unknown:
        raise TypeError(f"unknown component(s) {sorted(unknown)}; this pipeline has {list(names)}")
    index = read_model_index(folder)
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
        cls = component_class(index, name, folder)
        sub = os.path.join(folder, name)
        if cls is None:
            components[name] = None
        elif cls in SCHEDULERS:
            components[name] = SCHEDULERS[cls].from_config(read_config(sub, "scheduler_config.json"))
        elif cls in TOKENIZER_CLASSES:
            components[name] = load_tokenizer(sub)
        elif cls in _processor_loaders():
            components[name] = _processor_loaders()[cls](sub)
        else:
            components[name], params[name] = _load_model(sub, cls, dtype, variant)
    return components, params


def save_pipeline(
    folder: str,
    source: str,
    index: dict[str, Any],
    components: dict[str, Any],
    params: dict[str, Any],
) -> None:
    """Writes a pipeline folder: model_index.json, each component's config files copied from `source`
    (or written from the component), and each model's params as orbax. Written to a temporary folder
    and renamed into place, so a failed save leaves nothing half-written at `folder`."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder):
        raise FileExistsError(f"{folder}: already exists; save to a new folder")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".saving-", dir=parent)
    try:
        index = dict(index)
        for name, comp in components.items():
            sub = os.path.join(tmp, name)
            src = os.path.join(source, name)
            os.makedirs(sub)
            if hasattr(comp, "create_state"):  # a scheduler, maybe swapped: write its own config
                config = {"_class_name": type(comp).__name__, **dataclasses.asdict(comp.config)}
                with open(os.path.join(sub, "scheduler_config.json"), "w") as f:
                    json.dump(config, f, indent=2)
                index[name] = ["diffusers", type(comp).__name__]
            elif os.path.isdir(src):
                for fname in os.listdir(src):
                    if fname.endswith((".json", ".txt", ".model")):
                        shutil.copy2(os.path.join(src, fname), sub)
            elif hasattr(comp, "save_pretrained"):
                comp.save_pretrained(sub)
            if name in params:
                save_params(os.path.join(sub, ORBAX_DIR), params[name])
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
        os.rename(tmp, folder)  # fails if `folder` appeared meanwhile: nothing is overwritten
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


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

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, dtype=jnp.float32, variant: str | None = None,
                        revision: str | None = None, local_files_only: bool = False, **components):
        """(pipeline, params) from a diffusers-format folder (PyTorch weights converted on load), a
        folder written by `save_pretrained` (no torch needed), or a hub repo id. Components given by
        keyword replace the folder's: a scheduler, tokenizer or processor object, or a
        `(module, params)` pair for a model."""
        from unclip_jax.pipelines.hub import resolve  # noqa: PLC0415

        folder = resolve(path_or_repo_id, cls.COMPONENTS, variant=variant, revision=revision,
                         local_files_only=local_files_only)
        comps, params = load_pipeline(folder, cls.COMPONENTS, dtype=dtype, variant=variant, overrides=components)
        pipe = cls(**comps)
        pipe._source, pipe._index = folder, read_model_index(folder)
        return pipe, params

    def save_pretrained(self, directory: str, params: dict[str, Any]) -> None:
        """Writes configs, tokenizer/processor files and orbax params; loading it needs no torch."""
        index = dict(self._index or {"_class_name": type(self).__name__})
        save_pipeline(directory, self._source or "", index, {n: getattr(self, n) for n in self.COMPONENTS}, params)
