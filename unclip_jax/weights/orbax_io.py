"""Params to and from orbax checkpoints (no torch involved).

`restore_params` can restore straight into a target tree of `jax.ShapeDtypeStruct`s carrying
shardings, so multi-device users never hold a full host copy first.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from unclip_jax.weights.errors import CheckpointError

# The folder inside a component folder that holds its params as an orbax checkpoint.
ORBAX_DIR = "orbax_params"


def save_params(directory: str, params) -> None:
    """Writes `params` (a pytree of arrays) as an orbax checkpoint at `directory` (which must not exist).

    orbax writes into a temporary folder and renames it when complete, so an interrupted save leaves
    nothing that restores.
    """
    directory = os.path.abspath(directory)
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
    # Uncompressed: weights barely compress, and compressing holds a second copy of them while writing.
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=1)
    with ocp.Checkpointer(handler) as ckpt:
        ckpt.save(directory, args=ocp.args.PyTreeSave(params))


def saved_structure(directory: str):
    """The saved params as a tree of `jax.ShapeDtypeStruct` (shapes and dtypes from the checkpoint's
    metadata; no data read)."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no orbax checkpoint there")
    with ocp.StandardCheckpointer() as ckpt:
        try:
            tree = ckpt.metadata(directory).item_metadata.tree
        except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{directory}: cannot read the checkpoint's metadata ({e})") from e
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def restore_params(directory: str, target=None):
    """Restores params saved by `save_params`.

    Args:
      directory: the checkpoint folder.
      target: optional pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or arrays giving the
        structure, dtypes and placement to restore into; by default the saved structure on the
        default device.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no orbax checkpoint there")
    with ocp.StandardCheckpointer() as ckpt:
        try:
            if target is None:
                return ckpt.restore(directory)
            return ckpt.restore(directory, target)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise CheckpointError(f"{directory}: cannot restore params ({e})") from e
