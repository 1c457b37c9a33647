"""Every model family's conversion table: how its PyTorch keys become our param paths (`Rules`).

Our module names mirror the PyTorch ones, so most tables are empty: the generic convention of
`convert.Rules.module_path` (dots separate modules, a numeric part joins its parent, `weight` is the
leaf the param tree has) converts every tensor, and the layout follows from the leaf kind. What a
table holds is the exceptions: renames for older spellings, and tensors inference never reads.
"""

import dataclasses

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

# diffusers' UNet2DConditionModel (`down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj`
# -> `down_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj`). proj_in/proj_out are Dense here
# whether the checkpoint holds a 1x1 conv (`use_linear_projection` False: SD 1.x) or a linear layer
# (SD 2.x), and the resnets' 1x1 `conv_shortcut` becomes a Dense kernel: both by the leaf-kind layout.
# Writing back needs to know which Dense kernels PyTorch holds as 1x1 convs (`conv_1x1`).
UNET = Rules(conv_1x1=(r".*\.conv_shortcut\.weight",))
# SD 1.x-style transformers (`use_linear_projection` False) project in and out with 1x1 convs.
UNET_CONV_PROJECTION = dataclasses.replace(UNET, conv_1x1=UNET.conv_1x1 + (r".*\.proj_(in|out)\.weight",))

# diffusers' AutoencoderKL. Checkpoints saved before diffusers renamed its attention block name it
# `query`/`key`/`value`/`proj_attn` (as diffusers' own loader maps them); their weights may be linear
# [C, C] (old diffusers) or 1x1 conv [C, C, 1, 1] (LDM layout): both land on the Dense kernels.
VAE = Rules(
    renames=(
        (r"(\.attentions\.\d+)\.query\.", r"\1.to_q."),
        (r"(\.attentions\.\d+)\.key\.", r"\1.to_k."),
        (r"(\.attentions\.\d+)\.value\.", r"\1.to_v."),
        (r"(\.attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
    ),
    conv_1x1=(r".*\.conv_shortcut\.weight",),
)

# diffusers' PriorTransformer: top-level params keep diffusers' names and shapes (`positional_embedding`
# [1, L, D], `prd_embedding` [1, 1, D], `clip_mean` / `clip_std` [1, C]). diffusers registers the causal
# mask as a non-persistent buffer (we rebuild it from the config); other tools' checkpoints may carry it.
PRIOR = Rules(ignore=(r"causal_attention_mask",))

# StableUnCLIPImageNormalizer: `mean` / `std` [1, D].
IMAGE_NORMALIZER = Rules()

# transformers' DPTForDepthEstimation (ViT and BiT-hybrid): the numeric parts (`encoder.layer.3`,
# `stages.0.layers.2`, `head.head.4`, `readout_projects.2.0`) join their parents by the convention.
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
    # Written back (export) as copies of same-shaped tensors, so that transformers finds every key.
    unread_twins=(
        (r"dpt\.encoder\.layer\.0\.layernorm_before\.(weight|bias)", r"dpt.layernorm.\1"),
        (r"neck\.fusion_stage\.layers\.0\.residual_layer2\.(.*)", r"neck.fusion_stage.layers.0.residual_layer1.\1"),
    ),
)
