"""Splitting pipeline params into the trained and the frozen part, and joining them back.

A split is described by the param paths it trains: whole components ("unet") or subtrees of one
("text_encoder/text_model/embeddings/token_embedding"), minus excluded subtrees (the prior's CLIP statistics,
which the Kandinsky prior script keeps fixed). Both halves are nested dicts of the same layout as the
pipeline params, so `merge` is a recursive union.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import traverse_util


def _paths(specs: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(s.split("/")) for s in specs]


def make_split(train: Sequence[str], exclude: Sequence[str] = (), leaves: Sequence[str] | None = None):
    """(split, merge) for training the subtrees `train` (slash-separated paths) except `exclude`; with
    `leaves`, only the params of those names (LoRA's "A" and "B", not its fixed "scale")."""
    train_paths, exclude_paths = _paths(train), _paths(exclude)

    def trained(path: tuple[str, ...]) -> bool:
        def under(prefixes):
            return any(path[:len(p)] == p for p in prefixes)
        return under(train_paths) and not under(exclude_paths) and (leaves is None or path[-1] in leaves)

    def split(params: dict[str, Any]):
        flat = traverse_util.flatten_dict(dict(params))
        missing = [p for p in train_paths if not any(k[:len(p)] == p for k in flat)]
        if missing:
            raise KeyError(f"no params at {', '.join('/'.join(p) for p in missing)} to train")
        trainable = {k: v for k, v in flat.items() if trained(k)}
        frozen = {k: v for k, v in flat.items() if not trained(k)}
        return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)

    return split, merge


def merge(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    """The union of two disjoint nested param dicts (the inverse of a split)."""
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = merge(v, out[k]) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


__all__ = ["make_split", "merge"]
