"""Conversion tables of the model families whose PyTorch names our modules mirror directly."""

from unclip_jax.weights.convert import Rules

# transformers' CLIPTextModel(WithProjection): module names are ours already. Checkpoints exported
# before transformers v5 (every SD 2.x text encoder on the hub) prefix the bare CLIPTextModel's keys
# with `text_model.`, v5 does not: both load. `position_ids` is a buffer older exports still carry.
CLIP_TEXT = Rules(
    renames=((r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),),
    ignore=(r".*\.position_ids",),
)
CLIP_VISION = Rules(
    renames=((r"^(embeddings|pre_layrnorm|encoder|post_layernorm)\.", r"vision_model.\1."),),
    ignore=(r".*\.position_ids",),
)
