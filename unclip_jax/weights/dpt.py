"""Conversion of transformers' DPTForDepthEstimation (ViT and BiT-hybrid) weights.

Our module names are transformers' (see `unclip_jax/models/dpt.py`), so the table has no renames:
the numeric parts (`encoder.layer.3`, `stages.0.layers.2`, `head.head.4`, `readout_projects.2.0`)
join their parents by the generic convention. What it drops are tensors that inference never reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from unclip_jax.models.dpt import DPTConfig, DPTForDepthEstimation, dummy_inputs
from unclip_jax.weights.convert import Rules, abstract_params, convert

DPT = Rules(
    ignore=(
        # DPTModel's final layer norm: the depth model reads the encoder's pre-norm hidden states.
        r"dpt\.layernorm\.(weight|bias)",
        # The pooler of a DPTModel saved with one (DPTForDepthEstimation builds none).
        r"dpt\.pooler\..*",
        # The first fusion layer has no coarser map to add, so its residual_layer1 never runs.
        r"neck\.fusion_stage\.layers\.0\.residual_layer1\..*",
        # Batch-norm step counters (fusion residual units with use_batch_norm_in_fusion_residual).
        r".*\.num_batches_tracked",
    ),
)


def convert_dpt(state_dict: Mapping[str, np.ndarray], config: DPTConfig, dtype=None):
    """A DPTForDepthEstimation state dict (numpy, possibly memory-mapped) -> our params."""
    model = DPTForDepthEstimation(config)
    return convert(state_dict, abstract_params(model, *dummy_inputs(config)), DPT, "depth_estimator", dtype)
