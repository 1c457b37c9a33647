"""Params -> PyTorch-named state dicts and diffusers-format folders: the conversion tables run backwards.

There is no second table. A model's PyTorch names are derived from its param tree by undoing the
generic convention of `convert.Rules.module_path` (`down_blocks_0` -> `down_blocks.0`, a `kernel` /
`scale` / `embedding` leaf -> `weight`), and the result is planned through the forward table against
the abstract init: every derived name must map back onto the param it came from, with the right shape,
or the export fails naming it. What the convention cannot tell is carried by the same `Rules` value:
which Dense kernels PyTorch holds as 1x1 convs (`conv_1x1`), and which tensors inference never reads but
the PyTorch model still has (`unread_twins`, DPT only).

`name_3` is a list index (`name.3`) exactly when the component also has a `name_0` or `name_3` is itself a
list: PyTorch lists start at 0, while module names that end in a number (`linear_1`, `linear_2`) have no
`_0` sibling and hold no list.

Writing needs no torch: safetensors' numpy API writes the files (bf16 through ml_dtypes), through
`safetensors_io.save_file`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unclip_jax.weights import components as registry
from unclip_jax.weights import convert as fwd
from unclip_jax.weights.checkpoint import read_config
from unclip_jax.weights.convert import DTYPES, Rules, abstract_params, plan
from unclip_jax.weights.errors import CheckpointError, ConversionError
from unclip_jax.weights.safetensors_io import save_file
from unclip_jax.weights.tree import check_tree

# The inverse of each forward layout (see `convert.LAYOUTS`), keyed by the forward transform.
INVERSE_LAYOUTS = {
    fwd._identity: lambda x: x,
    fwd._linear: lambda x: x.T,
    fwd._conv: lambda x: x.transpose(3, 2, 0, 1),
    fwd._conv1x1_to_linear: lambda x: x.T[:, :, None, None],
    fwd.LAYOUTS[("kernel", 3, 3)]: lambda x: x.transpose(2, 1, 0),
}
_WEIGHT_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_INDEXED = re.compile(r"(.+)_(\d+)")


def _list_stems(paths) -> set[str]:
    """Module names that are PyTorch lists here: those with an element `_0` somewhere in the tree, and
    those whose element is itself a list (`readout_projects.2.0` with no `readout_projects.0`)."""
    stems = set()
    for path in paths:
        for part in path[:-1]:
            while (m := _INDEXED.fullmatch(part)) is not None:
                part, index = m.groups()
                if index == "0":
                    stems.add(part)
    nested = set(stems)
    while nested:
        nested = {m.group(1) for s in nested if (m := _INDEXED.fullmatch(s)) is not None} - stems
        stems |= nested
    return stems


def _split(part: str, stems: set[str]) -> list[str]:
    m = _INDEXED.fullmatch(part)
    if m is None or m.group(1) not in stems:
        return [part]
    return _split(m.group(1), stems) + [m.group(2)]


def _torch_rank(key: str, leaf: str, rank: int, rules: Rules) -> int:
    if leaf == "kernel" and rank == 2 and any(re.fullmatch(p, key) for p in rules.conv_1x1):
        return 4
    return rank


def torch_layout(abstract, rules: Rules, what: str = "model") -> list[fwd.Step]:
    """The forward plan of the PyTorch state dict that `abstract`'s params export to.

    Each step's `source` is the PyTorch name of the param at `target`. Raises ConversionError when a
    derived name does not map back onto its param through `rules` (the table is not invertible there).
    """
    flat = traverse_util.flatten_dict(fwd._unfreeze(abstract))
    stems = _list_stems(flat)
    names, shapes = {}, {}
    for path, leaf in flat.items():
        parts = [p for part in path[:-1] for p in _split(part, stems)]
        key = ".".join(parts + [_WEIGHT_LEAVES.get(path[-1], path[-1])])
        shape = tuple(leaf.shape)
        rank = _torch_rank(key, path[-1], len(shape), rules)
        layout = fwd.LAYOUTS.get((path[-1], rank, len(shape)), fwd._identity)
        names[key] = path
        shapes[key] = tuple(jax.eval_shape(INVERSE_LAYOUTS[layout], jax.ShapeDtypeStruct(shape, jnp.float32)).shape)
    steps = plan(shapes, abstract, rules, what)
    wrong = [f"{s.source} -> {'/'.join(s.target)} (from {'/'.join(names[s.source])})"
             for s in steps if s.target != names[s.source]]
    if wrong:
        raise ConversionError(f"{what} (export)", misshaped=wrong)
    return steps


def to_state_dict(params, abstract, rules: Rules, what: str = "model", dtype=None) -> dict[str, np.ndarray]:
    """Our params -> a PyTorch-named state dict of numpy arrays (cast to `dtype`, default: as they are)."""
    check_tree(params, abstract, what)
    steps = torch_layout(abstract, rules, what)
    flat = traverse_util.flatten_dict(fwd._unfreeze(params))
    out = {}
    for step in steps:
        arr = np.asarray(jax.device_get(flat[step.target]))
        arr = INVERSE_LAYOUTS[step.layout](arr)
        out[step.source] = np.ascontiguousarray(arr.astype(dtype if dtype is not None else arr.dtype, copy=False))
    for pattern, replacement in rules.unread_twins:
        for key in list(out):
            if re.fullmatch(pattern, key):
                out.setdefault(re.sub(pattern, replacement, key), out[key].copy())
    return out


def weight_file_name(config: Mapping[str, Any], variant: str | None = None) -> str:
    """transformers models (their config has `architectures`) use `model`, diffusers models
    `diffusion_pytorch_model`; a variant goes before the extension."""
    stem = "model" if "architectures" in config else "diffusion_pytorch_model"
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def write_component(folder: str, params, *, dtype: str = "fp32", variant: str | None = None) -> str:
    """Writes `params` as PyTorch-named safetensors beside `folder`'s config.json; returns the file.

    The model, its table and its abstract params come from the config already in `folder`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    config = read_config(folder)
    built = registry.build(config, folder=folder)
    abstract = abstract_params(built.module, *built.dummy_inputs)
    state = to_state_dict(params, abstract, built.rules, what=folder, dtype=DTYPES[dtype])
    path = os.path.join(folder, weight_file_name(config, variant))
    save_file(state, path, metadata={"format": "pt"})
    return path


def diffusers_writer(dtype: str = "fp32", variant: str | None = None):
    """A `save_pipeline` params writer that writes diffusers/transformers safetensors."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")

    def write(folder: str, params) -> None:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{folder}: no config.json to export this model with (load the pipeline "
                                  "from a folder, so that its configs can be copied)")
        write_component(folder, params, dtype=dtype, variant=variant)

    return write

