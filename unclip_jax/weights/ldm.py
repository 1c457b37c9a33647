"""Stability's original (LDM) key layout -> our params: more `Rules` tables through the same plan.

A single-file checkpoint (sd21-unclip-h/-l.ckpt, 512-depth-ema.ckpt) holds every model under one prefix:
`model.diffusion_model.*` (the UNet, in `openaimodel.UNetModel`'s numbering), `first_stage_model.*` (the
VAE, in `ldm.modules.diffusionmodules.model`'s names), `cond_stage_model.model.*` (OpenCLIP's text
tower), and for unCLIP `embedder.model.visual.*` (the CLIP image tower, OpenCLIP's or OpenAI's) and
`noise_augmentor.data_mean/data_std` (the image-embedding normalizer). The UNet's and VAE's tables depend
on the block layout, so they are built from the component's config (as data: one rename per LDM block
index, no branches on the key). OpenCLIP's fused attention input projection [3D, D] and its [in, out]
visual projection are presented to the plan as the separate / transposed tensors transformers holds, by
`LDMView` (lazily: nothing is read until converted).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import numpy as np

from unclip_jax.weights.convert import Rules

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
VISION_PREFIX = "embedder.model."
NORMALIZER_PREFIX = "noise_augmentor.data_"

# What a checkpoint holds besides the models' params: the diffusion schedule's buffers, an EMA copy of
# the UNet, the training loss, MiDaS (diffusers' depth pipeline takes its DPT from the config folder).
NOT_PARAMS = (
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar|"
    r"lvlb_weights|scale_factor|scale_by_std)",
    r"model_ema\..*",
    r"first_stage_model\.loss\..*",
    r"depth_model\..*",
    r"embedder\.(mean|std)",
    r"embedder\.model\.(?!visual\.).*",  # the text tower beside the CLIP image tower: not used
    r"noise_augmentor\.(?!data_mean$|data_std$).*",
)

# Inside an LDM ResBlock, in diffusers' names.
_RESNET = (
    (r"(resnets\.\d+)\.in_layers\.0\.", r"\1.norm1."),
    (r"(resnets\.\d+)\.in_layers\.2\.", r"\1.conv1."),
    (r"(resnets\.\d+)\.emb_layers\.1\.", r"\1.time_emb_proj."),
    (r"(resnets\.\d+)\.out_layers\.0\.", r"\1.norm2."),
    (r"(resnets\.\d+)\.out_layers\.3\.", r"\1.conv2."),
    (r"(resnets\.\d+)\.skip_connection\.", r"\1.conv_shortcut."),
)


def unet_rules(config: Mapping) -> Rules:
    """`model.diffusion_model.*` of a UNet with diffusers config `config`.

    openaimodel numbers its blocks in one sequence: input_blocks 0 is conv_in, then per level
    `layers_per_block` (resnet[, transformer]) blocks and a downsampler (not on the last level);
    output_blocks: per level `layers_per_block + 1` blocks, the last holding the upsampler after the
    transformer if there is one.
    """
    p = "^" + re.escape(UNET_PREFIX)
    n = config.get("layers_per_block", 2)
    downs, ups = config["down_block_types"], config["up_block_types"]
    renames = [
        (p + r"time_embed\.0\.", "time_embedding.linear_1."),
        (p + r"time_embed\.2\.", "time_embedding.linear_2."),
        (p + r"label_emb\.0\.0\.", "class_embedding.linear_1."),
        (p + r"label_emb\.0\.2\.", "class_embedding.linear_2."),
        (p + r"input_blocks\.0\.0\.", "conv_in."),
        (p + r"middle_block\.0\.", "mid_block.resnets.0."),
        (p + r"middle_block\.1\.", "mid_block.attentions.0."),
        (p + r"middle_block\.2\.", "mid_block.resnets.1."),
        (p + r"out\.0\.", "conv_norm_out."),
        (p + r"out\.2\.", "conv_out."),
    ]
    k = 1
    for level in range(len(downs)):
        for i in range(n):
            renames.append((p + rf"input_blocks\.{k}\.0\.", f"down_blocks.{level}.resnets.{i}."))
            renames.append((p + rf"input_blocks\.{k}\.1\.", f"down_blocks.{level}.attentions.{i}."))
            k += 1
        if level < len(downs) - 1:
            renames.append((p + rf"input_blocks\.{k}\.0\.op\.", f"down_blocks.{level}.downsamplers.0.conv."))
            k += 1
    k = 0
    for level in range(len(ups)):
        for i in range(n + 1):
            renames.append((p + rf"output_blocks\.{k}\.0\.", f"up_blocks.{level}.resnets.{i}."))
            renames.append((p + rf"output_blocks\.{k}\.1\.conv\.", f"up_blocks.{level}.upsamplers.0.conv."))
            renames.append((p + rf"output_blocks\.{k}\.1\.", f"up_blocks.{level}.attentions.{i}."))
            renames.append((p + rf"output_blocks\.{k}\.2\.conv\.", f"up_blocks.{level}.upsamplers.0.conv."))
            k += 1
    return Rules(renames=tuple(renames) + _RESNET)


def vae_rules(config: Mapping) -> Rules:
    """`first_stage_model.*` of an AutoencoderKL with diffusers config `config`. The LDM decoder numbers
    its levels from the finest (`up.0`), diffusers from the coarsest (`up_blocks.0`)."""
    p = "^" + re.escape(VAE_PREFIX)
    levels = len(config["block_out_channels"])
    renames = [
        (p + r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (p + r"(encoder|decoder)\.mid\.block_(\d)\.", r"\1.mid_block.resnets.\2."),
        (p + r"(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
        (p + r"encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (p + r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    ]
    for i in range(levels):
        renames.append((p + rf"decoder\.up\.{levels - 1 - i}\.block\.", f"decoder.up_blocks.{i}.resnets."))
        renames.append((p + rf"decoder\.up\.{levels - 1 - i}\.upsample\.", f"decoder.up_blocks.{i}.upsamplers.0."))
    renames += [
        (p, ""),  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        (r"mid_block\.resnets\.1\.", "mid_block.resnets.0."),  # LDM counts the mid resnets from 1
        (r"mid_block\.resnets\.2\.", "mid_block.resnets.1."),
        (r"(attentions\.0)\.norm\.", r"\1.group_norm."),
        (r"(attentions\.0)\.(q|k|v)\.", r"\1.to_\2."),
        (r"(attentions\.0)\.proj_out\.", r"\1.to_out.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]
    return Rules(renames=tuple(renames))


# One residual attention block of an OpenCLIP / OpenAI CLIP transformer, in transformers' names.
_CLIP_BLOCK = (
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"\.attn\.(q_proj|k_proj|v_proj|out_proj)\.", r".self_attn.\1."),
)


def text_rules(config: Mapping) -> Rules:
    """`cond_stage_model.model.*`: OpenCLIP's text tower as a CLIPTextModel of `num_hidden_layers` layers.
    SD 2.x reads the penultimate layer, so the diffusers text encoder has one layer fewer than the file:
    the blocks past it are dropped."""
    p = "^" + re.escape(TEXT_PREFIX)
    keep = "|".join(str(i) for i in range(config["num_hidden_layers"]))
    return Rules(
        renames=(
            (p + r"token_embedding\.", "text_model.embeddings.token_embedding."),
            (p + r"positional_embedding$", "text_model.embeddings.position_embedding.weight"),
            (p + r"transformer\.resblocks\.", "text_model.encoder.layers."),
            (p + r"ln_final\.", "text_model.final_layer_norm."),
        ) + _CLIP_BLOCK,
        ignore=(re.escape(TEXT_PREFIX) + rf"transformer\.resblocks\.(?!({keep})\.).*",
                # SD 2 conditions on the hidden states: the text projection and CLIP's logit scale are unused.
                re.escape(TEXT_PREFIX) + r"(text_projection|logit_scale|attn_mask)"),
    )


def vision_rules(config: Mapping) -> Rules:
    """`embedder.model.visual.*`: the visual tower of OpenCLIP ViT-H/14 (unCLIP-H) or OpenAI CLIP ViT-L/14
    (unCLIP-L) as a CLIPVisionModelWithProjection."""
    del config
    p = "^" + re.escape(VISION_PREFIX) + r"visual\."
    return Rules(
        renames=(
            (p + r"conv1\.", "vision_model.embeddings.patch_embedding."),
            (p + r"class_embedding$", "vision_model.embeddings.class_embedding"),
            (p + r"positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
            (p + r"ln_pre\.", "vision_model.pre_layrnorm."),
            (p + r"transformer\.resblocks\.", "vision_model.encoder.layers."),
            (p + r"ln_post\.", "vision_model.post_layernorm."),
            (p + r"proj\.weight$", "visual_projection.weight"),
        ) + _CLIP_BLOCK,
    )


def normalizer_rules(config: Mapping) -> Rules:
    """`noise_augmentor.data_mean/data_std`: the CLIP embedding statistics of StableUnCLIPImageNormalizer."""
    del config
    p = "^" + re.escape(NORMALIZER_PREFIX)
    return Rules(renames=((p + r"mean$", "mean"), (p + r"std$", "std")))


# Component -> (the key prefix of its tensors, which marks it present in the file; its table).
COMPONENTS = {
    "unet": (UNET_PREFIX, unet_rules),
    "vae": (VAE_PREFIX, vae_rules),
    "text_encoder": (TEXT_PREFIX, text_rules),
    "image_encoder": (VISION_PREFIX + "visual.", vision_rules),
    "image_normalizer": (NORMALIZER_PREFIX, normalizer_rules),
}

# OpenCLIP keeps q, k, v as one [3D, (D)] input projection; transformers as three.
_FUSED = re.compile(r"(.*)\.attn\.in_proj_(weight|bias)")
_QKV = ("q_proj", "k_proj", "v_proj")
# OpenCLIP applies the visual projection as `x @ proj` ([in, out]); nn.Linear's weight is [out, in].
_MATMUL = re.compile(r"(.*\.visual)\.proj")


class LDMView(Mapping):
    """The tensors of `state` under `prefix`, with fused q/k/v split and matmul projections as Linear
    weights (`...visual.proj` -> `...visual.proj.weight`, transposed). Shapes are known without reading."""

    def __init__(self, state: Mapping[str, np.ndarray], prefix: str, shapes: Mapping[str, tuple] | None = None):
        self._state = state
        shapes = shapes if shapes is not None else {k: tuple(v.shape) for k, v in state.items()}
        self._entries: dict[str, tuple[str, object, tuple]] = {}
        for key, shape in shapes.items():
            if not key.startswith(prefix):
                continue
            if (m := _FUSED.fullmatch(key)) is not None:
                part = shape[0] // 3
                for i, name in enumerate(_QKV):
                    self._entries[f"{m.group(1)}.attn.{name}.{m.group(2)}"] = (
                        key, slice(i * part, (i + 1) * part), (part,) + tuple(shape[1:]))
            elif _MATMUL.fullmatch(key) is not None and len(shape) == 2:
                self._entries[key + ".weight"] = (key, "T", (shape[1], shape[0]))
            else:
                self._entries[key] = (key, None, tuple(shape))

    def shape(self, key: str) -> tuple:
        return self._entries[key][2]

    def __getitem__(self, key: str) -> np.ndarray:
        source, how, _ = self._entries[key]
        arr = self._state[source]
        if how == "T":
            return np.asarray(arr).T
        return arr if how is None else arr[how]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
