"""Conversion of diffusers' AutoencoderKL weights.

Module names mirror diffusers', so only the attention of checkpoints saved before diffusers renamed
its attention block needs a rule: `query`/`key`/`value`/`proj_attn` are `to_q`/`to_k`/`to_v`/`to_out.0`
(as diffusers' own loader maps them). Their weights may be linear [C, C] (old diffusers) or 1x1 conv
[C, C, 1, 1] (LDM layout); both land on the Dense kernels by the leaf-kind layout.
"""

from unclip_jax.weights.convert import Rules

VAE = Rules(
    renames=(
        (r"(\.attentions\.\d+)\.query\.", r"\1.to_q."),
        (r"(\.attentions\.\d+)\.key\.", r"\1.to_k."),
        (r"(\.attentions\.\d+)\.value\.", r"\1.to_v."),
        (r"(\.attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
    ),
)
