"""PyTorch state dict -> Flax params, as data.

A model's conversion is a `Rules` value: an ordered table of regex renames on the PyTorch key plus a
list of keys to drop (buffers such as CLIP's `position_ids`). After the renames, a key becomes a
param path by a fixed convention: dots separate modules, a numeric part joins its parent
(`layers.3` -> `layers_3`), and the leaf `weight` is whichever of `kernel`, `scale` or `embedding`
the model's param tree has (Dense/Conv, norms, embeddings). The layout transform follows from the
leaf kind alone (`LAYOUTS`): a conv kernel [O, I, kh, kw] -> [kh, kw, I, O], a linear weight -> its
transpose, a 1x1 conv weight feeding a Dense -> squeezed and transposed.

Every conversion is first planned against the abstract param tree (`jax.eval_shape` of the model's
init) and fails with one error listing all missing, unexpected and mis-shaped names; the plan needs
only shapes, so real-size checkpoints are checked without allocating them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from unclip_jax.files import atomic_write
from unclip_jax.weights.errors import ConversionError
from unclip_jax.weights.tree import compare

__all__ = ["LAYOUTS", "ConversionError", "Rules", "Step", "abstract_params", "convert", "plan"]


@dataclass(frozen=True)
class Rules:
    """How one model family's PyTorch keys become Flax param paths.

    renames: (regex, replacement) pairs applied in order with `re.sub` to the dotted PyTorch key.
    ignore: regexes (full match) of PyTorch keys that carry no params (buffers).
    conv_1x1: regexes (full match) of PyTorch keys whose tensor is a 1x1 conv [O, I, 1, 1] where we hold
      a Dense kernel. Reading knows it from the rank; writing (weights/export.py) needs it.
    unread_twins: (regex, replacement) pairs for tensors the PyTorch model has but inference never reads
      (so `ignore` drops them): writing emits each as a copy of the same-shaped tensor whose key matches.
    """

    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    conv_1x1: tuple[str, ...] = ()
    unread_twins: tuple[tuple[str, str], ...] = ()
    _compiled: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(
            self, "_compiled",
            (tuple((re.compile(p), r) for p, r in self.renames), tuple(re.compile(p) for p in self.ignore)),
        )

    def ignored(self, key: str) -> bool:
        return any(p.fullmatch(key) for p in self._compiled[1])

    def module_path(self, key: str) -> tuple[tuple[str, ...], str]:
        """PyTorch key -> (module path, PyTorch leaf name)."""
        for pattern, repl in self._compiled[0]:
            key = pattern.sub(repl, key)
        parts = key.split(".")
        path: list[str] = []
        for part in parts[:-1]:
            if part.isdigit() and path:
                path[-1] = f"{path[-1]}_{part}"
            else:
                path.append(part)
        return tuple(path), parts[-1]


_LEAF_CANDIDATES = {"weight": ("kernel", "scale", "embedding"), "gamma": ("scale",), "beta": ("bias",)}


# Layout transforms by (flax leaf, source rank, target rank). Written with array methods so that they
# run on numpy arrays and, through jax.eval_shape, on shapes alone.
def _identity(x):
    return x


def _linear(x):
    return x.T


def _conv(x):
    return x.transpose(2, 3, 1, 0)


def _conv1x1_to_linear(x):
    return x.reshape(x.shape[0], x.shape[1]).T


# Saved param dtypes by name (convert, export, single files).
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}

LAYOUTS = {
    ("kernel", 2, 2): _linear,
    ("kernel", 4, 4): _conv,
    ("kernel", 4, 2): _conv1x1_to_linear,
    ("kernel", 3, 3): lambda x: x.transpose(2, 1, 0),  # conv1d [O, I, k] -> [k, I, O]
}


@dataclass(frozen=True)
class Step:
    source: str
    target: tuple[str, ...]
    layout: object  # a callable array -> array


def plan(
    shapes: Mapping[str, tuple[int, ...]],
    abstract_params,
    rules: Rules,
    what: str = "model",
) -> list[Step]:
    """Maps every PyTorch tensor to a param; raises ConversionError unless the mapping is exact.

    Args:
      shapes: PyTorch key -> shape (no data needed).
      abstract_params: the model's param tree (arrays or ShapeDtypeStruct), without the 'params' wrapper.
      rules: the model family's Rules.
      what: the component's name, for the error.
    """
    target = traverse_util.flatten_dict(_unfreeze(abstract_params))
    steps: dict[str, Step] = {}
    got: dict[str, tuple[int, ...]] = {}
    sources: dict[str, tuple[str, tuple[int, ...]]] = {}
    unexpected, duplicates = [], []
    for key, shape in shapes.items():
        if rules.ignored(key):
            continue
        path, leaf = rules.module_path(key)
        dest = next(
            (path + (c,) for c in _LEAF_CANDIDATES.get(leaf, (leaf,)) if path + (c,) in target), None
        )
        if dest is None:
            unexpected.append(key)
            continue
        name, want = "/".join(dest), tuple(target[dest].shape)
        if name in got:
            duplicates.append(f"{key} {tuple(shape)} -> {name} {want}")
            continue
        layout = LAYOUTS.get((dest[-1], len(shape), len(want)), _identity)
        got[name] = tuple(jax.eval_shape(layout, jax.ShapeDtypeStruct(tuple(shape), jnp.float32)).shape) \
            if layout is not _identity else tuple(shape)
        sources[name] = (key, tuple(shape))
        steps[name] = Step(key, dest, layout)
    want = {"/".join(p): tuple(x.shape) for p, x in target.items()}
    missing, _, misshaped = compare(got, want)
    if missing or unexpected or misshaped or duplicates:
        # A param whose tensor has the wrong shape is missing too: nothing fills it.
        bad = [f"{sources[n][0]} {sources[n][1]} -> {n} {want[n]}" for n in misshaped]
        raise ConversionError(what, sorted(missing + misshaped), unexpected, bad + duplicates)
    return list(steps.values())


def convert(
    state_dict: Mapping[str, np.ndarray],
    abstract_params,
    rules: Rules,
    what: str = "model",
    dtype=None,
):
    """Converts a (lazy) state dict of numpy arrays into a nested param dict of numpy arrays.

    Each tensor is read, transposed and cast one at a time, so the checkpoint is never held twice in
    memory. `dtype` (default: each param's abstract dtype) is the param dtype. A lazy state dict
    (`checkpoint.StateDict`) gives its `shapes` without reading data: the plan reads none.
    """
    shapes = getattr(state_dict, "shapes", None)
    if shapes is None:
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    steps = plan(shapes, abstract_params, rules, what)
    target = traverse_util.flatten_dict(_unfreeze(abstract_params))
    flat = {}
    for step in steps:
        arr = step.layout(np.asarray(state_dict[step.source]))
        want = np.dtype(dtype if dtype is not None else target[step.target].dtype)
        flat[step.target] = np.ascontiguousarray(arr.astype(want, copy=False))
    return traverse_util.unflatten_dict(flat)


def abstract_params(model, *inputs, **kwargs):
    """The model's param tree as ShapeDtypeStructs (no allocation), without the 'params' wrapper.

    Tracing a model's init takes seconds, so the tree is computed once per process for each (module,
    input shapes) and, when `unclip_jax.cache.enable_compilation_cache` is on, kept on disk for later
    processes (`keep_abstract_trees`; `_disk_key` says what a stored tree is keyed by). Every call returns a fresh dict."""
    key = _memo_key(model, inputs, kwargs)
    flat = _MEMO.get(key) if key is not None else None
    if flat is None:
        path = _disk_path(model, inputs, kwargs)
        flat = _read_abstract(path) if path else None
        if flat is None:
            variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
            flat = traverse_util.flatten_dict(_unfreeze(_unfreeze(variables)["params"]))
            if path:
                _write_abstract(path, flat)
        if key is not None:
            _MEMO[key] = flat
    return traverse_util.unflatten_dict(dict(flat))


# (module, input shapes, kwargs) -> the flat abstract tree {path tuple: ShapeDtypeStruct}.
_MEMO: dict = {}


def _shapes_of(tree):
    """The tree's structure, and each leaf's shape and dtype (an array) or its value (a Python scalar)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype")
                          else (type(x).__name__, repr(x)) for x in leaves)


def _memo_key(model, inputs, kwargs):
    """A hashable key: linen modules are frozen dataclasses hashed by their fields (config included).
    None (no caching) when something in it is unhashable or not an array."""
    try:
        key = (type(model), model, _shapes_of((inputs, kwargs)))
        hash(key)
    except TypeError:
        return None
    return key


def _source_digest(cls) -> str:
    """A digest of the Python files beside the module's class (its model family and shared layers):
    a stored tree goes stale when the code that builds the params changes."""
    folder = os.path.dirname(os.path.abspath(sys.modules[cls.__module__].__file__))
    if folder not in _SOURCE_DIGESTS:
        h = hashlib.sha256()
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read() + b"\0")
        _SOURCE_DIGESTS[folder] = h.hexdigest()
    return _SOURCE_DIGESTS[folder]


_SOURCE_DIGESTS: dict[str, str] = {}


def _disk_key(model, inputs, kwargs) -> str | None:
    """The stored tree's name: a hash of the module's class, its fields (the config, dtype, flags), the
    input shapes and dtypes, the keyword arguments, the source of the class's package folder, and the
    jax and flax versions. None where a field prints with an address (no stable name)."""
    import flax  # noqa: PLC0415

    cls = type(model)
    try:
        fields = [(f.name, repr(getattr(model, f.name))) for f in dataclasses.fields(model)
                  if f.name not in ("parent", "name")]
        treedef, leaves = _shapes_of((inputs, kwargs))
        text = repr((cls.__module__, cls.__qualname__, fields, str(treedef), leaves, _source_digest(cls),
                     jax.__version__, flax.__version__))
    except (TypeError, AttributeError, KeyError, OSError):
        return None
    if " at 0x" in text:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


# Where `abstract_params` keeps its trees across processes (None: in memory only).
_ABSTRACT_DIR: str | None = None


def keep_abstract_trees(folder: str | os.PathLike | None) -> None:
    """Makes `abstract_params` keep its trees in `folder` (None: in memory only);
    `unclip_jax.cache.enable_compilation_cache` calls it with a subfolder of the compilation cache."""
    global _ABSTRACT_DIR
    _ABSTRACT_DIR = None if folder is None else os.fspath(folder)


def _disk_path(model, inputs, kwargs) -> str | None:
    key = _disk_key(model, inputs, kwargs) if _ABSTRACT_DIR else None
    return os.path.join(_ABSTRACT_DIR, f"{type(model).__name__}-{key}.json") if key else None


def _read_abstract(path: str):
    """A stored flat tree, or None when it is missing, unreadable or not of the expected form."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["params"]
        return {tuple(p): jax.ShapeDtypeStruct(tuple(int(n) for n in shape), jnp.dtype(dtype))
                for p, shape, dtype in entries}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_abstract(path: str, flat) -> None:
    """Writes the flat tree atomically (a temporary file, then a rename); a failure only loses the entry."""
    entries = [[list(p), list(x.shape), jnp.dtype(x.dtype).name] for p, x in flat.items()]
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, json.dumps({"params": entries}))


def _unfreeze(tree):
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    return dict(tree)
