"""The interface between the training machinery and the objectives.

An `Objective` bundles everything the generic train loop needs to know about what is being trained:
how a list of examples becomes a batch, which parameters are trained, the loss, how the result is
saved and which pipeline samples validation images from it. The machinery (step.py, loop.py) is
generic over it; the objectives themselves live in `unclip_jax.training.objectives`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Objective:
  """What is trained and how.

  Attributes:
    name: "decoder" | "prior" | "depth" | "lora" | "textual-inversion" | "clip".
    collate: host function, list of examples -> dict[str, np.ndarray] (the batch). An example is a dict:
      "image": uint8 [H, W, 3] already resized/cropped/flipped by the data pipeline; "text": str;
      optional "depth": float32 [H, W]; from the run's iterator also "record" (the record's index).
    split: pipeline params (dict by component) -> (trainable, frozen) pytrees.
    merge: (trainable, frozen) -> pipeline params (the inverse of `split`).
    loss: (trainable, frozen, batch, key) -> (loss: f32 scalar, metrics: dict[str, f32 scalar]); pure and
      jit-able, every random draw from `key`, batch arrays as `collate` made them.
    save: (out_dir: str, pipe, params) -> None: writes the final output (a pipeline folder through
      save_pretrained; LoRA/textual inversion also their diffusers files).
    pipeline_class: the pipeline class that loads OUT/final and samples validation images.
    cache: None, or (params, batch) -> dict[str, array [B, ...]]: what the loss computes from the batch
      with frozen components only (the VAE posterior's mean and std, a CLIP image embedding), jit-able.
      A run with `cache_latents` computes it once per picture and feeds the loss batches that hold these
      keys instead of `cache_replaces`; the loss must then give what it gives on the raw batch.
    cache_replaces: the batch keys the cached values stand in for (left out of cached batches).
  """

  name: str
  collate: Callable
  split: Callable
  merge: Callable
  loss: Callable
  save: Callable
  pipeline_class: type
  cache: Callable | None = None
  cache_replaces: tuple[str, ...] = ()
