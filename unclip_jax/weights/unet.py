"""Conversion of diffusers' UNet2DConditionModel weights.

Our module names mirror diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj`
becomes `down_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj` by the generic rule), so the
table is empty. The layout follows from the leaf kind: proj_in/proj_out are Dense here whether the
checkpoint holds a 1x1 conv (`use_linear_projection` False: SD 1.x) or a linear layer (SD 2.x), and
the resnets' 1x1 `conv_shortcut` becomes a Dense kernel.
"""

from unclip_jax.weights.convert import Rules

UNET = Rules()
