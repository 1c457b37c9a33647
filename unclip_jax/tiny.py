"""Tiny random-weight pipeline checkpoints, made without torch or a network.

`write_tiny(kind, folder)` saves a `save_pretrained` folder (orbax params) for one of

    "unclip"          StableUnCLIPPipeline: CLIP BPE tokenizers, prior text encoder, Karlo-style prior, DDPM
                      prior scheduler, image normalizer and noising scheduler, OpenCLIP-style text encoder,
                      unCLIP UNet with projection class embeddings, DDIM, VAE
                      (stands in for stabilityai/stable-diffusion-2-1-unclip-small + Karlo)
    "unclip_img2img"  StableUnCLIPImg2ImgPipeline: the same decoder, a CLIP vision encoder with projection and
                      its CLIP image processor (stands in for stabilityai/stable-diffusion-2-1-unclip)
    "depth2img"       StableDiffusionDepth2ImgPipeline: a DPT-Hybrid (BiT + ViT) depth estimator and its DPT
                      processor, a UNet reading latents + depth (5 channels), PNDM, VAE
                      (stands in for stabilityai/stable-diffusion-2-depth)

with the real layout and wiring at toy sizes (images of 32 x 32). What they make is structured noise:
they exist so a fresh machine can run every path end to end in seconds. Real images need the real
checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.image_processing_dpt import DPTImageProcessor
from unclip_jax.schedulers import scheduler_from_config
from unclip_jax.tokenizer import load_tokenizer, write_clip_tokenizer
from unclip_jax.weights.components import build
from unclip_jax.weights.convert import abstract_params
from unclip_jax.weights.folder import save_pipeline

_HIDDEN, _EMBED, _IMAGE = 32, 32, 32

_TEXT = dict(architectures=["CLIPTextModel"], hidden_size=_HIDDEN, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
             projection_dim=_EMBED, eos_token_id=2, bos_token_id=0, pad_token_id=1, model_type="clip_text_model")

_UNET = dict(_class_name="UNet2DConditionModel", sample_size=_IMAGE // 2, in_channels=4, out_channels=4,
             layers_per_block=1, block_out_channels=[32, 64], norm_num_groups=8,
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=_HIDDEN,
             attention_head_dim=[2, 4], use_linear_projection=True)

# Scaled-linear betas with the SD 2.x offsets, as both real decoders' schedulers have them.
SD2_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                  steps_offset=1, clip_sample=False)

# The decoder both Stable unCLIP pipelines share (component name -> config).
_DECODER = {
    "image_normalizer": dict(_class_name="StableUnCLIPImageNormalizer", embedding_dim=_EMBED),
    "image_noising_scheduler": dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2",
                                    num_train_timesteps=1000),
    "text_encoder": _TEXT,
    "unet": dict(_UNET, class_embed_type="projection", projection_class_embeddings_input_dim=2 * _EMBED),
    "scheduler": dict(_class_name="DDIMScheduler", prediction_type="v_prediction", **SD2_BETAS),
    "vae": dict(_class_name="AutoencoderKL", block_out_channels=[16, 32], in_channels=3, out_channels=3,
                latent_channels=4, norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, sample_size=_IMAGE),
}

# kind -> (pipeline class, {component name: config}); tokenizers and processors are listed apart.
CONFIGS = {
    "unclip": ("StableUnCLIPPipeline", {
        "prior_text_encoder": dict(_TEXT, architectures=["CLIPTextModelWithProjection"], hidden_size=_EMBED,
                                   hidden_act="quick_gelu"),
        "prior": dict(_class_name="PriorTransformer", num_attention_heads=2, attention_head_dim=16, num_layers=2,
                      embedding_dim=_EMBED, num_embeddings=77, additional_embeddings=4),
        "prior_scheduler": dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                clip_sample_range=5.0, num_train_timesteps=1000, prediction_type="sample",
                                variance_type="fixed_small_log"),
        **_DECODER,
    }),
    "unclip_img2img": ("StableUnCLIPImg2ImgPipeline", {
        "image_encoder": dict(architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model",
                              hidden_size=_HIDDEN, intermediate_size=64, projection_dim=_EMBED, num_hidden_layers=2,
                              num_attention_heads=4, image_size=_IMAGE, patch_size=8, hidden_act="gelu"),
        **_DECODER,
    }),
    "depth2img": ("StableDiffusionDepth2ImgPipeline", {
        "text_encoder": _TEXT,
        "unet": dict(_UNET, in_channels=5),
        # stable-diffusion-2-depth samples with PNDM (PLMS steps only).
        "scheduler": dict(_class_name="PNDMScheduler", prediction_type="epsilon", skip_prk_steps=True,
                          **SD2_BETAS),
        "vae": _DECODER["vae"],
        "depth_estimator": dict(
            architectures=["DPTForDepthEstimation"], model_type="dpt", is_hybrid=True, embedding_type="hybrid",
            image_size=_IMAGE, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=64, backbone_out_indices=[0, 1, 2, 3],
            backbone_featmap_shape=[1, 32, 2, 2], neck_hidden_sizes=[16, 16, 32, 32],
            reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, readout_type="project",
            backbone_config=dict(model_type="bit", global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                                 hidden_sizes=[16, 16, 32], embedding_dynamic_padding=True, num_groups=2,
                                 embedding_size=8, out_features=["stage1", "stage2", "stage3"])),
    }),
}
KINDS = tuple(CONFIGS)

# CLIP tokenizers' pad tokens: the prior's pads with EOS (OpenAI CLIP), SD 2.x's with "!".
PRIOR_PAD, SD2_PAD = "<|endoftext|>", "!"

# Tokenizer folders (name -> pad token).
_TOKENIZERS = {
    "unclip": {"prior_tokenizer": PRIOR_PAD, "tokenizer": SD2_PAD},
    "unclip_img2img": {"tokenizer": SD2_PAD},
    "depth2img": {"tokenizer": SD2_PAD},
}


def clip_processor(size: int) -> tuple[str, dict]:
    """(class recorded in model_index.json, preprocessor_config.json) of a CLIP image processor for
    `size` x `size` pictures, with OpenAI CLIP's mean and std."""
    return "CLIPImageProcessor", dict(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        do_resize=True, resample=3, do_rescale=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        image_processor_type="CLIPImageProcessor")


def dpt_processor(size: int) -> tuple[str, dict]:
    """The same for a DPT image processor resizing to `size` x `size`."""
    return "DPTImageProcessor", dict(
        size={"height": size, "width": size}, keep_aspect_ratio=False, ensure_multiple_of=1, do_resize=True,
        resample=3, do_rescale=True, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        image_processor_type="DPTImageProcessor")


# Image processors: name -> (class, preprocessor_config.json).
_PROCESSORS = {
    "unclip_img2img": {"feature_extractor": clip_processor(_IMAGE)},
    "depth2img": {"feature_extractor": dpt_processor(_IMAGE)},
}
# model_index.json's library of each component that is not diffusers' (processors: transformers').
LIBRARY = {"prior_text_encoder": "transformers", "text_encoder": "transformers", "image_encoder": "transformers",
           "depth_estimator": "transformers", "feature_extractor": "transformers",
           "image_normalizer": "stable_diffusion"}


# Params drawn as |N(0, 1 / fan_in)|: DPT's head ends in conv 1x1 -> ReLU over ReLU outputs, so the sign of
# that kernel's sum would otherwise decide whether the random model's depth is zero everywhere.
POSITIVE = {"depth_estimator": (("head", "head_4", "kernel"),)}


def random_params(abstract, rng: np.random.Generator, positive: tuple = ()):
    """Random params of the abstract tree's shapes, drawn on the host (no init to compile): norm scales
    and standard deviations 1, biases and means 0, other weights N(0, 1 / fan_in) (`positive` paths: the
    absolute values)."""
    def draw(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[-1] in ("scale", "std", "var"):
            return np.ones(leaf.shape, np.float32)
        if keys[-1] in ("bias", "mean") or len(leaf.shape) == 0:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[0]
        w = (rng.standard_normal(leaf.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)
        return np.abs(w) if keys in positive else w

    return jax.tree_util.tree_map_with_path(draw, abstract)


# The model_index.json key recording what wrote the folder: `write_tiny(..., exist_ok=True)` finds its own.
TINY_KEY = "_unclip_jax_tiny"


def write_tiny(kind: str, folder: str, seed: int = 0, *, exist_ok: bool = False) -> str:
    """Writes the tiny `kind` checkpoint (one of `KINDS`) to `folder`; returns it.

    `folder` must not exist; with `exist_ok`, a folder that this function wrote with the same kind and seed
    is left as it is (running the same command twice works), and anything else there is still refused."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}")
    if os.path.exists(folder):
        if exist_ok and _written_tiny(folder) == {"kind": kind, "seed": seed}:
            return folder
        raise FileExistsError(f"{folder}: already exists" + (" (and is not a tiny checkpoint of this --kind and "
                                                            "--seed)" if exist_ok else ""))
    pipeline_class, configs = CONFIGS[kind]
    return write_pipeline(folder, pipeline_class, configs, tokenizers=_TOKENIZERS[kind],
                          processors=_PROCESSORS.get(kind, {}), seed=seed,
                          index_extra={TINY_KEY: {"kind": kind, "seed": seed}})


def write_pipeline(folder: str, pipeline_class: str, configs: dict[str, dict], *, tokenizers: dict[str, str],
                   processors: dict[str, tuple[str, dict]], seed: int = 0, index_extra: dict | None = None) -> str:
    """Writes a `save_pretrained` folder of `pipeline_class` with random weights (`random_params`, the
    `POSITIVE` paths drawn positive): `configs` maps each model or scheduler component to its config,
    `tokenizers` each CLIP tokenizer to its pad token, `processors` each image processor to (class name,
    preprocessor config); `index_extra` adds keys to model_index.json. `folder` must not exist; returns it."""
    if os.path.exists(folder):
        raise FileExistsError(f"{folder}: already exists")
    processor_classes = {"CLIPImageProcessor": CLIPImageProcessor, "DPTImageProcessor": DPTImageProcessor}
    index: dict = {"_class_name": pipeline_class, **(index_extra or {})}
    components, params = {}, {}
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as src:
        for name, pad in tokenizers.items():
            write_clip_tokenizer(os.path.join(src, name), pad_token=pad)
            components[name] = load_tokenizer(os.path.join(src, name))
            index[name] = ["transformers", "CLIPTokenizer"]
        for name, (cls, config) in processors.items():
            os.makedirs(os.path.join(src, name))
            with open(os.path.join(src, name, "preprocessor_config.json"), "w") as f:
                json.dump(config, f, indent=2)
            components[name] = processor_classes[cls].from_pretrained(os.path.join(src, name))
            index[name] = [LIBRARY.get(name, "transformers"), cls]
        for name, config in configs.items():
            os.makedirs(os.path.join(src, name))
            cls = config.get("_class_name") or config["architectures"][0]
            index[name] = [LIBRARY.get(name, "diffusers"), cls]
            if name.endswith("scheduler"):
                components[name] = scheduler_from_config(config)
                continue
            with open(os.path.join(src, name, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            built = build(config)
            params[name] = random_params(abstract_params(built.module, *built.dummy_inputs), rng,
                                         POSITIVE.get(name, ()))
            components[name] = built.module
        save_pipeline(folder, src, index, components, params)
    return folder


def _written_tiny(folder: str) -> dict | None:
    """{"kind", "seed"} of a tiny checkpoint folder that `write_tiny` wrote, else None."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            return json.load(f).get(TINY_KEY)
    except (OSError, ValueError, AttributeError):
        return None
