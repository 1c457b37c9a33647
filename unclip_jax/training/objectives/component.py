"""Helpers the single-component objectives share (vae, dpt): stacking a batch's images and splitting
the pipeline params into the one trained component and the rest."""

from __future__ import annotations

from typing import Any

import numpy as np


def stack_images(examples: list[dict]) -> np.ndarray:
    """uint8 [B, H, W, 3]: the examples' images, which must share one size."""
    images = [np.asarray(e["image"]) for e in examples]
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"the batch's images differ in size: {sorted({im.shape for im in images})}")
    return np.stack(images)


def split_component(component: str):
    """(split, merge) training only the params of `component` (a pipeline component name)."""
    def split(params: dict[str, Any]):
        if component not in params:
            raise KeyError(f"the pipeline has no {component!r} params to train")
        return {component: params[component]}, {k: v for k, v in params.items() if k != component}

    def merge(trainable, frozen):
        return {**frozen, **trainable}

    return split, merge


def save_pipeline(out_dir: str, pipe, params) -> None:
    """The final output: the whole pipeline folder."""
    pipe.save_pretrained(out_dir, params)
