"""Checkpoints of a run: orbax's CheckpointManager under OUT/checkpoints, one step folder per save with the
train state (params, EMA, optimizer state, step, the run's key) and a JSON record (objective, model, the
trainable tree's signature, the data iterator's position).

orbax writes a step into a temporary folder and renames it when complete, so a checkpoint being written
when the process is killed is never listed, never restored from, and is removed when the next manager
opens the folder. `metrics.jsonl` is cut back to the restored step (atomically) on resume, so a resumed
run's metrics read as an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from unclip_jax import files

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue from."""


def signature(tree) -> str:
    """A short hash of a param tree's paths, shapes and dtypes: two runs can share a checkpoint only if
    they train the same tree."""
    rows = sorted(f"{jax.tree_util.keystr(p)}:{tuple(np.shape(x))}:{np.dtype(getattr(x, 'dtype', np.float32))}"
                  for p, x in jax.tree_util.tree_leaves_with_path(tree))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _as_dict(state) -> dict[str, Any]:
    out = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "key": state.key}
    if state.ema is not None:
        out["ema"] = state.ema
    return out


class Checkpoints:
    """Save every `every` steps, keep the last `keep` (orbax CheckpointManager)."""

    def __init__(self, out_dir: str, *, every: int, keep: int):
        import orbax.checkpoint as ocp  # noqa: PLC0415

        self._ocp = ocp
        self.directory = os.path.abspath(os.path.join(out_dir, CHECKPOINTS))
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state)),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target_state):
        """The state saved at `step`, laid out as `target_state` (an abstract or concrete TrainState)."""
        ocp = self._ocp
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_dict(target_state))
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return target_state.replace(step=got["step"], trainable=got["trainable"], opt_state=got["opt_state"],
                                    ema=got.get("ema"), key=got["key"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(meta: dict[str, Any], *, objective: str, model: str, trainable_signature: str,
                     where: str) -> None:
    """ResumeError unless the checkpoint's run trained the same objective on the same tree."""
    if meta.get("objective") != objective:
        raise ResumeError(f"--resume: {where} is a checkpoint of a {meta.get('objective')!r} run (model "
                          f"{meta.get('model')}); this run trains {objective!r}")
    if meta.get("signature") != trainable_signature:
        raise ResumeError(f"--resume: {where} was trained from model {meta.get('model')} whose trainable params "
                          f"differ from {model}'s (another model or configuration)")


# ---------------------------------------------------------------------------------------------- metrics


def truncate_metrics(path: str, step: int) -> None:
    """Keeps the lines of `path` for steps <= `step` (a half-written last line goes too), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if line.endswith("\n") and isinstance(row, dict) and row.get("step", step + 1) <= step:
                kept.append(line)
    files.atomic_write(path, "".join(kept))
