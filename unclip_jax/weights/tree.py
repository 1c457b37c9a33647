"""Checking a params tree against the tree a model expects: the one check that every loader and
pipeline uses before any work (orbax params against the config, user-supplied params, merged trees)."""

from __future__ import annotations

from collections.abc import Mapping

import jax

from unclip_jax.weights.errors import ConversionError


def param_path(path) -> str:
    """A param's tree path as "down_blocks_0/resnets_0/conv1/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """"path/to/param" -> shape for every leaf of a tree of arrays or `jax.ShapeDtypeStruct`s."""
    return {param_path(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_tree(params, expected, what: str, *, source: str = "params") -> None:
    """Raises ConversionError unless `params` has exactly `expected`'s paths and shapes.

    Args:
      params: the tree to check (arrays, or anything with `.shape`; dicts or FrozenDicts).
      expected: the model's tree, e.g. `abstract_params(...)` (only paths and shapes are compared).
      what: names the component in the message (e.g. "unet", or a folder).
      source: what `params` is, for the message ("params", "saved params", ...).
    The error lists every missing, unexpected and mis-shaped path (`path (got), expected (want)`).
    """
    got, want = shapes_by_path(params), shapes_by_path(expected)
    missing, unexpected, misshaped = compare(got, want)
    if missing or unexpected or misshaped:
        raise ConversionError(what, missing, unexpected,
                              [f"{k} {got[k]}, expected {want[k]}" for k in misshaped], source=source)


def compare(got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]):
    """(missing, unexpected, misshaped) paths of `got` against `want` (path -> shape), each sorted."""
    missing = sorted(k for k in want if k not in got)
    unexpected = sorted(k for k in got if k not in want)
    misshaped = sorted(k for k in got if k in want and tuple(got[k]) != tuple(want[k]))
    return missing, unexpected, misshaped
