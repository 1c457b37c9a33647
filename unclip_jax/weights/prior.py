"""Conversion tables of diffusers' PriorTransformer and StableUnCLIPImageNormalizer.

Our module names mirror diffusers' (`transformer_blocks.3.attn1.to_out.0` -> `transformer_blocks_3/
attn1/to_out_0`) and the top-level params keep diffusers' names and shapes (`positional_embedding`
[1, L, D], `prd_embedding` [1, 1, D], `clip_mean` / `clip_std` [1, C]; the normalizer's `mean` /
`std` [1, D]), so the generic convention converts every tensor and no rename is needed.
"""

from unclip_jax.weights.convert import Rules

# diffusers registers the prior's causal mask as a non-persistent buffer (we rebuild it from the
# config); checkpoints saved by other tools may still carry it.
PRIOR = Rules(ignore=(r"causal_attention_mask",))

IMAGE_NORMALIZER = Rules()
