"""Converting a diffusers pipeline (folder or hub repo id) into a `save_pretrained` orbax folder.

The command is `unclip-jax convert SOURCE OUT ...` (unclip_jax/cli/convert.py). SOURCE may also be
Stability's single-file checkpoint (.ckpt / .safetensors in the LDM layout: sd21-unclip-h/-l,
512-depth-ema), with `config_from` for its configs: see `weights/single_file.py` (`convert_single_file` here).
`export_pipeline` is the way back: any pipeline we load -> a diffusers-format folder (`weights/export.py`).

The pipeline class comes from `_class_name` in the source's model_index.json. Components are converted
one at a time (each model's PyTorch tensors read from the memory-mapped file, transposed and cast one
by one, written as orbax, then dropped), so at most one component's weights are held at once. The
output is written into a hidden temporary folder beside OUT and renamed into place at the end: an
interrupted or failed conversion leaves nothing at OUT, and never damages an existing OUT; with
--overwrite, only a pipeline folder (one with model_index.json) is replaced, and anything else at OUT is
refused before any work.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from tqdm.auto import tqdm

from unclip_jax.pipelines.depth2img import StableDiffusionDepth2ImgPipeline
from unclip_jax.pipelines.stable_unclip import StableUnCLIPImg2ImgPipeline, StableUnCLIPPipeline
from unclip_jax.weights import folder as disk
from unclip_jax.weights.checkpoint import pipeline_weight_sets
from unclip_jax.weights.components import ARCHITECTURES, load_component
from unclip_jax.weights.convert import DTYPES
from unclip_jax.weights.hub import resolve
from unclip_jax.weights.orbax_io import ORBAX_DIR, save_params
from unclip_jax.weights.single_file import infer_kind, is_single_file, open_single_file

# Testing hook: seconds to sleep after each component, so a test can kill the process midway.
PAUSE_ENV = "UNCLIP_JAX_CONVERT_PAUSE"


def pipeline_classes() -> dict:
    return {c.__name__: c for c in (StableUnCLIPPipeline, StableUnCLIPImg2ImgPipeline,
                                    StableDiffusionDepth2ImgPipeline)}


def convert_pipeline(
    source: str,
    out: str,
    *,
    dtype: str = "fp32",
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    config_from: str | None = None,
) -> str:
    """Converts the pipeline at `source` (a diffusers folder or hub repo id, or a single-file checkpoint)
    into an orbax folder `out`.

    Args:
      config_from: for a single file, the diffusers folder or hub id giving configs and missing parts.
      dtype: the saved param dtype, "fp32", "bf16" or "fp16" (each tensor is cast on its own).
      variant, revision, local_files_only, cache_dir: which weights to read, as in `from_pretrained`.
      overwrite: replace an existing `out` if it is a pipeline folder (atomically swapped in at the end);
        anything else at `out` is refused before any work, as is an existing `out` without `overwrite`.
      progress: a progress bar over the components on stderr (default: when stderr is a terminal).
    Returns:
      `out`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    disk.check_destination(os.path.abspath(out), overwrite=overwrite, flag="--overwrite")
    where = dict(revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    if is_single_file(source):
        return convert_single_file(source, out, config=config_from, dtype=dtype, overwrite=overwrite, **where)
    # The pipeline class decides what to fetch, so the index comes first (alone), then its components.
    pipeline = _pipeline_class(disk.read_model_index(resolve(source, (), **where)), source)
    folder = resolve(source, pipeline.COMPONENTS, variant=variant, **where)
    index = disk.read_model_index(folder)
    names = pipeline.COMPONENTS
    kinds = {n: disk.component_class(index, n, folder) for n in names}
    weights = pipeline_weight_sets(disk.component_listing(folder, names), variant, folder)
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    with disk.atomic_folder(out, overwrite=overwrite) as tmp, _progress(names, progress) as bar:
        for name in names:
            bar.set_description(name)
            src, dst = os.path.join(folder, name), os.path.join(tmp, name)
            if kinds[name] is not None:
                os.makedirs(dst)
                disk.copy_aux_files(src, dst)
            if kinds[name] in ARCHITECTURES:  # a model: its weights are required (an error names the folder)
                convert_component(src, dst, dtype=dtype, variant=weights[name].variant if name in weights else None,
                                  architecture=kinds[name])
            bar.update(1)
            if pause:
                time.sleep(pause)
        kept = {k: v for k, v in index.items() if k.startswith("_") or k in names}
        disk.write_model_index(tmp, kept)
    return out


def convert_component(src: str, dst: str, *, dtype: str = "fp32", variant: str | None = None,
                      architecture: str | None = None) -> None:
    """Converts one model component folder's PyTorch weights into `dst`/orbax_params.

    Tensors are read from the memory-mapped checkpoint and cast one at a time, and the params are
    dropped once written: peak memory is about two copies of this component's weights.
    """
    _, params = load_component(src, param_dtype=DTYPES[dtype], variant=variant, architecture=architecture,
                               orbax=False)
    save_params(os.path.join(dst, ORBAX_DIR), params)


def convert_single_file(path: str, out: str, *, config: str | None = None, dtype: str = "fp32",
                        revision: str | None = None, local_files_only: bool = False, cache_dir: str | None = None,
                        overwrite: bool = False) -> str:
    """A single file -> a `save_pretrained` (orbax) folder at `out`, written atomically. The pipeline class
    is the config folder's (`_class_name` of its model_index.json), else the kind's."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    disk.check_destination(os.path.abspath(out), overwrite=overwrite, flag="--overwrite")
    where = dict(revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    if config is not None:
        cls = _pipeline_class(disk.read_model_index(resolve(config, (), **where)), config)
    else:
        shapes = {k: tuple(v.shape) for k, v in open_single_file(path).items()}
        cls = pipeline_classes()[infer_kind(shapes, path).pipeline]
    pipe, params = cls.from_single_file(path, config=config, **where)
    params = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)
    pipe.save_pretrained(out, params, overwrite=overwrite)
    return out


def export_pipeline(source: str, out: str, *, dtype: str = "fp32", variant: bool = False,
                    overwrite: bool = False, local_files_only: bool = False) -> str:
    """Loads the pipeline at `source` (orbax or diffusers folder, hub repo id) and writes it to `out` in
    diffusers' format (`variant`: name the weight files after `dtype`); returns `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    disk.check_destination(os.path.abspath(out), overwrite=overwrite, flag="--overwrite")
    cls = _pipeline_class(disk.read_model_index(resolve(source, (), local_files_only=local_files_only)), source)
    pipe, params = cls.from_pretrained(source, local_files_only=local_files_only)
    pipe.save_pretrained(out, params, format="diffusers", dtype=dtype, variant=dtype if variant else None,
                         overwrite=overwrite)
    return out


def _pipeline_class(index: dict, source: str):
    classes = pipeline_classes()
    name = index.get("_class_name")
    if name not in classes:
        raise ValueError(f"{source}: pipeline class {name!r} is not supported (supported: {', '.join(classes)})")
    return classes[name]


def _progress(names, enabled: bool):
    return tqdm(total=len(names), unit="component", file=sys.stderr,
                disable=not (sys.stderr.isatty() if enabled is None else enabled))
