"""Generation at scale: `unclip-jax generate` and the library under it.

    from unclip_jax.generation import BatchRunner, generate, read_prompts
    items, errors = read_prompts("prompts.txt", pipeline="txt2img", defaults=defaults, seed=0)
    summary = generate(BatchRunner(pipe, params, "txt2img"), items, out="out", batch_size=8, errors=errors)

Modules: `items` (reading and planning), `run` (per-item draws, batches, the resumable loop), `output`
(atomic files, webdataset shards, the index), `clip_score` (torchmetrics' CLIPScore with our towers),
`command` (the command line). Importing this package imports no JAX (the command's --help stays fast).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Item": "items", "InputError": "items", "read_prompts": "items", "read_dataset": "items",
    "plan_batches": "items", "host_share": "items",
    "BatchRunner": "run", "generate": "run", "item_draws": "run", "Summary": "run", "run_info_of": "run",
    "CLIPScorer": "clip_score",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
