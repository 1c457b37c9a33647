"""Pipeline folders: diffusers' layout (model_index.json + one folder per component) in, and out.

`load_pipeline` reads each component named in model_index.json by its class: models (converted from
PyTorch weights, or restored from the orbax checkpoint that `save_pipeline` writes beside their
config), schedulers (from scheduler_config.json), tokenizers and image processors. Components given
by keyword replace the folder's; params can be placed in a given sharding as they load (orbax reads
each array straight into it). `save_pipeline` writes the same layout with orbax params, so a saved
folder loads without torch; every write goes through `atomic_folder` (temporary folder, then rename).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, Union

import jax
import jax.numpy as jnp

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.tokenizer import load_tokenizer
from unclip_jax.weights import components as registry
from unclip_jax.weights.checkpoint import is_aux_file, pipeline_weight_sets, read_config
from unclip_jax.weights.convert import abstract_params
from unclip_jax.weights.errors import CheckpointError
from unclip_jax.weights.orbax_io import restore_params, save_params, saved_structure
from unclip_jax.weights.tree import check_tree, param_path

ORBAX_DIR = "orbax_params"
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")

# Where params go: one sharding for every param, or (component, "path/to/param", abstract) -> sharding.
ShardingSpec = Union[jax.sharding.Sharding, Callable[[str, str, jax.ShapeDtypeStruct], jax.sharding.Sharding]]


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


def placements(sharding: ShardingSpec | None, component: str, abstract):
    """The tree of shardings for `abstract`'s params (None: no placement asked)."""
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, abstract)
    return jax.tree_util.tree_map_with_path(lambda p, x: sharding(component, param_path(p), x), abstract)


def _load_model(name: str, sub: str, cls: str, dtype, variant, sharding: ShardingSpec | None):
    if os.path.isdir(os.path.join(sub, ORBAX_DIR)):
        built = registry.build(read_config(sub), dtype, cls, sub)
        saved = saved_structure(os.path.join(sub, ORBAX_DIR))
        check_tree(saved, abstract_params(built.module, *built.dummy_inputs), sub, source="saved params")
        # The saved param dtype wins over the abstract init's float32; orbax reads each array straight
        # into its sharding, so no full host copy is made first.
        where = placements(sharding, name, saved)
        target = None if where is None else jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, where)
        return built.module, restore_params(os.path.join(sub, ORBAX_DIR), target)
    module, params = registry.load_component(sub, dtype=dtype, variant=variant, architecture=cls)
    where = placements(sharding, name, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    return module, params if where is None else jax.device_put(params, where)


def component_listing(folder: str, names) -> dict[str, list[str]]:
    """component -> the file names in its sub-folder of `folder` (empty when absent)."""
    return {n: sorted(os.listdir(os.path.join(folder, n))) if os.path.isdir(os.path.join(folder, n)) else []
            for n in names}


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
    from unclip_jax.schedulers import SCHEDULERS  # noqa: PLC0415

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
        elif cls in _processor_loaders():
            components[name] = _processor_loaders()[cls](sub)
        else:
            chosen = weights[name].variant if name in weights else variant
            components[name], params[name] = _load_model(name, sub, cls, dtype, chosen, sharding)
    return components, params


def copy_aux_files(src: str, dst: str) -> None:
    """Copies a component folder's configs, tokenizer and processor files (no weights)."""
    for fname in sorted(os.listdir(src)):
        if is_aux_file(fname) and os.path.isfile(os.path.join(src, fname)):
            shutil.copy2(os.path.join(src, fname), dst)


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_folder(folder: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary folder beside `folder`, renamed to `folder` when the block succeeds.

    An interrupted or failed write leaves `folder` as it was (absent, or the previous content): the
    partial folder is a hidden `.NAME.partial-*` sibling. With `overwrite`, an existing `folder` is
    swapped for the new one in one atomic step where the system allows it (Linux), else moved aside
    just before the new one is renamed in.
    """
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f"{folder}: already exists; write to a new folder (or overwrite it)")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.partial-", dir=parent)
    try:
        yield tmp
        if not os.path.exists(folder):
            os.rename(tmp, folder)
        elif not overwrite:
            raise FileExistsError(f"{folder}: appeared while writing; nothing was overwritten")
        elif not _exchange(tmp, folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
            os.rename(folder, os.path.join(old, "content"))
            os.rename(tmp, folder)
            shutil.rmtree(old)
        # After an exchange, `tmp` holds the previous content: removed below.
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def write_model_index(folder: str, index: dict[str, Any]) -> None:
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def save_pipeline(
    folder: str,
    source: str | dict[str, str],
    index: dict[str, Any],
    components: dict[str, Any],
    params: dict[str, Any],
) -> None:
    """Writes a pipeline folder: model_index.json, each component's config files copied from `source`
    (a pipeline folder, or a component folder per name; tokenizers and schedulers write their own), and each model's params as orbax. Written to a temporary folder
    and renamed into place, so a failed save leaves nothing half-written at `folder`."""
    with atomic_folder(folder) as tmp:
        index = dict(index)
        for name, comp in components.items():
            sub = os.path.join(tmp, name)
            src = source[name] if isinstance(source, dict) else os.path.join(source, name)
            os.makedirs(sub)
            if hasattr(comp, "create_state"):  # a scheduler, maybe swapped: write its own config
                config = {"_class_name": type(comp).__name__, **dataclasses.asdict(comp.config)}
                with open(os.path.join(sub, "scheduler_config.json"), "w") as f:
                    json.dump(config, f, indent=2)
                index[name] = ["diffusers", type(comp).__name__]
            elif hasattr(comp, "save_pretrained") and (type(comp).__name__.startswith(TOKENIZER_CLASSES)
                                                        or not os.path.isdir(src)):
                # Tokenizers write themselves: textual inversion may have added tokens since loading.
                comp.save_pretrained(sub)
            elif os.path.isdir(src):
                copy_aux_files(src, sub)
                _sync_vocab_size(sub, comp)
            if name in params:
                save_params(os.path.join(sub, ORBAX_DIR), params[name])
        write_model_index(tmp, index)


def _sync_vocab_size(folder: str, module) -> None:
    """A text encoder grown by textual inversion keeps its copied config.json in step with its params."""
    size = getattr(getattr(module, "config", None), "vocab_size", None)
    path = os.path.join(folder, "config.json")
    if size is None or not os.path.isfile(path):
        return
    with open(path) as f:
        config = json.load(f)
    section = config.get("text_config", config) if "vocab_size" not in config else config
    if section.get("vocab_size", size) != size:
        section["vocab_size"] = size
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


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
        from unclip_jax.pipelines.hub import resolve  # noqa: PLC0415

        names = tuple(n for n in cls.COMPONENTS if n not in components)
        folder = resolve(path_or_repo_id, names, variant=variant, revision=revision,
                         local_files_only=local_files_only, cache_dir=cache_dir)
        comps, params = load_pipeline(folder, cls.COMPONENTS, dtype=dtype, variant=variant, overrides=components,
                                      sharding=sharding)
        pipe = cls(**comps)
        pipe._source, pipe._index = folder, read_model_index(folder)
        return pipe, params

    def save_pretrained(self, directory: str, params: dict[str, Any]) -> None:
        """Writes configs, tokenizer/processor files and orbax params; loading it needs no torch."""
        index = {**(self._index or {}), "_class_name": type(self).__name__}
        sources = {n: os.path.join(self._source or "", n) for n in self.COMPONENTS}
        for name, (src, entry) in self._foreign.items():
            sources[name], index[name] = src, entry
        index = {k: v for k, v in index.items() if k.startswith("_") or k in self.COMPONENTS}
        save_pipeline(directory, sources, index, {n: getattr(self, n) for n in self.COMPONENTS}, params)
