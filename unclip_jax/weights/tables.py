"""Conversion tables of the model families whose PyTorch names our modules mirror directly."""

from unclip_jax.weights.convert import Rules

# transformers' CLIPTextModel(WithProjection) / CLIPVisionModel(WithProjection): module names are ours
# already. `position_ids` is a buffer that older checkpoints (SD 2.x text encoders) still carry.
CLIP = Rules(ignore=(r".*\.position_ids",))
