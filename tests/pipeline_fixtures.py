"""Tiny random-weight diffusers pipelines saved in the real on-disk layout (model_index.json, one folder
per component with config.json + safetensors, tokenizer and processor files).

They are the offline stand-ins for stabilityai/stable-diffusion-2-1-unclip(-small) and
stable-diffusion-2-depth: same component classes and wiring, tiny sizes. Every weight is randomised
(`randomize_`) so that no conversion bug hides behind a zero or a one. Built once per test session by
the fixtures in conftest.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from torch_ref import randomize_
from unclip_jax.tokenizer import load_tokenizer, write_clip_tokenizer

@dataclasses.dataclass(frozen=True)
class Shape:
    """One tiny architecture. "a" follows diffusers' own stable unCLIP tests (hidden 32, embedding 32,
    linear projections, upcast attention, per-block head dims, VAE factor 2); "b" changes every size
    and flips the options (conv projections, int head dim, 3 UNet blocks, VAE factor 4, epsilon DDIM,
    the Karlo UnCLIPScheduler as the prior's)."""

    hidden: int = 32
    embed: int = 32
    text_layers: int = 3
    text_heads: int = 4
    unet_blocks: tuple = (32, 64)
    unet_down: tuple = ("CrossAttnDownBlock2D", "DownBlock2D")
    unet_up: tuple = ("UpBlock2D", "CrossAttnUpBlock2D")
    head_dim: object = (2, 4)
    linear_projection: bool = True
    upcast: bool = True
    unet_groups: int = 8
    vae_blocks: tuple = (16, 32)
    vae_groups: int = 8
    prediction_type: str = "v_prediction"
    prior_heads: int = 2
    prior_head_dim: int = 12
    prior_scheduler: str = "DDPMScheduler"


SHAPES = {
    "a": Shape(),
    "b": Shape(hidden=48, embed=24, text_layers=2, text_heads=3, unet_blocks=(16, 24, 32),
               unet_down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               unet_up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), head_dim=4,
               linear_projection=False, upcast=False, unet_groups=4, vae_blocks=(8, 16, 16), vae_groups=4,
               prediction_type="epsilon", prior_heads=3, prior_head_dim=8, prior_scheduler="UnCLIPScheduler"),
}


def _clip_text(shape: Shape, projection_dim: int, with_projection: bool, seed: int, act: str = "gelu"):
    import transformers

    cfg = transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=shape.hidden, projection_dim=projection_dim, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=shape.text_heads, num_hidden_layers=shape.text_layers,
        pad_token_id=1, vocab_size=49408, hidden_act=act,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return randomize_(cls(cfg), seed)


def _scratch(folder: Path, name: str) -> Path:
    """A working folder beside (not inside) the pipeline folder."""
    return folder.with_name(f"{folder.name}.{name}.tmp")


def _tokenizer(tmp: Path, pad: str):
    write_clip_tokenizer(str(tmp), pad_token=pad)
    return load_tokenizer(str(tmp))


def _unet(shape: Shape, in_channels: int, class_embed: bool, seed: int):
    from diffusers import UNet2DConditionModel

    kw = dict(class_embed_type="projection", projection_class_embeddings_input_dim=shape.embed * 2) \
        if class_embed else {}
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=shape.unet_blocks, norm_num_groups=shape.unet_groups,
        down_block_types=shape.unet_down, up_block_types=shape.unet_up,
        cross_attention_dim=shape.hidden, attention_head_dim=shape.head_dim,
        use_linear_projection=shape.linear_projection, upcast_attention=shape.upcast, **kw,
    )
    return randomize_(unet, seed)


def _vae(shape: Shape, seed: int):
    from diffusers import AutoencoderKL

    n = len(shape.vae_blocks)
    vae = AutoencoderKL(
        block_out_channels=shape.vae_blocks, in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=shape.vae_groups, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, sample_size=32,
    )
    return randomize_(vae, seed)


def _save(pipe, folder: Path, tokenizers: dict[str, str]) -> Path:
    """Saves like diffusers, then rewrites each tokenizer folder in the hub's layout (vocab.json,
    merges.txt, special_tokens_map.json, tokenizer_config.json) instead of transformers v5's
    tokenizer.json, since that is what real checkpoints ship."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name, pad in tokenizers.items():
        shutil.rmtree(folder / name)
        write_clip_tokenizer(str(folder / name), pad_token=pad)
    return folder


def _decoder_parts(shape: Shape, tmp: Path, class_embed: bool = True, in_channels: int = 4):
    from diffusers import DDIMScheduler

    return dict(
        tokenizer=_tokenizer(tmp, pad="!"),
        text_encoder=_clip_text(shape, 512, False, seed=11),
        unet=_unet(shape, in_channels, class_embed, seed=12),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type=shape.prediction_type, set_alpha_to_one=False, steps_offset=1,
                                clip_sample=False),
        vae=_vae(shape, seed=13),
    )


def _noising(embed_dim: int, seed: int):
    from diffusers import DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    normalizer = randomize_(StableUnCLIPImageNormalizer(embedding_dim=embed_dim), seed)
    with torch.no_grad():  # a standard deviation must stay positive
        normalizer.std.copy_(torch.rand(normalizer.std.shape, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return dict(image_normalizer=normalizer, image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))


def build_unclip(folder: Path, shape: str = "a") -> Path:
    """A tiny StableUnCLIPPipeline (text -> Karlo-style prior -> decoder), saved at `folder`."""
    import diffusers

    sh = SHAPES[shape]
    prior = randomize_(diffusers.PriorTransformer(num_attention_heads=sh.prior_heads,
                                                  attention_head_dim=sh.prior_head_dim, embedding_dim=sh.embed,
                                                  num_layers=1), seed=21)
    prior_scheduler = getattr(diffusers, sh.prior_scheduler)(
        beta_schedule="squaredcos_cap_v2", prediction_type="sample", num_train_timesteps=1000, clip_sample=True,
        clip_sample_range=5.0, variance_type="fixed_small_log")
    pipe = diffusers.StableUnCLIPPipeline(
        # Karlo's tokenizer pads with "!" (its special_tokens_map.json), as SD 2's does.
        prior_tokenizer=_tokenizer(_scratch(folder, "prior_tokenizer"), pad="!"),
        # The prior reads the text tokens at its own width (Karlo: 768 = 768).
        prior_text_encoder=_clip_text(dataclasses.replace(sh, hidden=sh.embed), sh.embed, True, seed=20,
                                      act="quick_gelu"),
        prior=prior,
        prior_scheduler=prior_scheduler,
        **_noising(sh.embed, seed=22),
        **_decoder_parts(sh, _scratch(folder, "tokenizer")),
    )
    return _save(pipe, folder, {"tokenizer": "!", "prior_tokenizer": "!"})


def build_unclip_img2img(folder: Path, shape: str = "a") -> Path:
    """A tiny StableUnCLIPImg2ImgPipeline (image -> CLIP vision embedding -> decoder), saved at `folder`."""
    import transformers
    from diffusers import StableUnCLIPImg2ImgPipeline

    sh = SHAPES[shape]
    size = 32 if shape == "a" else 30
    vision = transformers.CLIPVisionConfig(hidden_size=sh.hidden, projection_dim=sh.embed, num_hidden_layers=2,
                                           num_attention_heads=sh.text_heads, image_size=size, intermediate_size=37,
                                           patch_size=4 if shape == "a" else 6, hidden_act="gelu")
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=transformers.CLIPImageProcessorPil(crop_size={"height": size, "width": size},
                                                             size={"shortest_edge": size}),
        image_encoder=randomize_(transformers.CLIPVisionModelWithProjection(vision), seed=30),
        **_noising(sh.embed, seed=31),
        **_decoder_parts(sh, _scratch(folder, "tokenizer")),
    )
    return _save(pipe, folder, {"tokenizer": "!"})


def build_depth2img(folder: Path, shape: str = "a") -> Path:
    """A tiny StableDiffusionDepth2ImgPipeline. Shape "a": a hybrid (BiT + ViT) DPT depth estimator, as
    stable-diffusion-2-depth ships, at 32 x 32; shape "b": a plain-ViT DPT (dpt-large's layout) at 40 x 40
    (its 4 x 4 position grid resized to 5 x 5), so that depth and latent grids differ in size and aspect."""
    import transformers
    from diffusers import StableDiffusionDepth2ImgPipeline

    sh = SHAPES[shape]
    if shape == "a":
        backbone = dict(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 16, 32],
                        embedding_dynamic_padding=True, out_features=["stage1", "stage2", "stage3"],
                        num_groups=2, embedding_size=8)
        dpt = transformers.DPTConfig(
            image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
            backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=37, is_decoder=False,
            embedding_type="hybrid", is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, 32, 2, 2],
            neck_hidden_sizes=[16, 16, 32, 32], reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16,
        )
        size = 32
    else:
        dpt = transformers.DPTConfig(
            image_size=32, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=4,
            backbone_out_indices=(0, 1, 2, 3), num_attention_heads=3, intermediate_size=40,
            neck_hidden_sizes=[8, 16, 16, 24], reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16,
        )
        size = 40
    pipe = StableDiffusionDepth2ImgPipeline(
        depth_estimator=randomize_(transformers.DPTForDepthEstimation(dpt), seed=40),
        feature_extractor=transformers.DPTImageProcessorPil(do_rescale=True, size={"height": size, "width": size},
                                                            keep_aspect_ratio=False),
        **_decoder_parts(sh, _scratch(folder, "tokenizer"), class_embed=False, in_channels=5),
    )
    return _save(pipe, folder, {"tokenizer": "!"})
