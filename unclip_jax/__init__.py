"""unclip-jax: Stable unCLIP, the Karlo prior and depth-to-image in pure-functional JAX/Flax.

The public API. Models are flax.linen modules whose params are a separate pytree; schedulers are
frozen objects with immutable state pytrees; pipelines take params and a `jax.random.key` per call.
Everything is channels-last, and every random draw can be passed in.
"""

import importlib

# Public name -> its module, imported on first use: `unclip-jax --help` and the CLI's argument checks
# stay fast (importing jax, flax and transformers takes seconds; benchmarks/RESULTS.md).
_EXPORTS = {
    "CLIPImageProcessor": "unclip_jax.image_processing",
    "DPTImageProcessor": "unclip_jax.image_processing_dpt",
    "CLIPTextConfig": "unclip_jax.models.clip",
    "CLIPTextModel": "unclip_jax.models.clip",
    "CLIPVisionConfig": "unclip_jax.models.clip",
    "CLIPVisionModel": "unclip_jax.models.clip",
    "UnsupportedConfigError": "unclip_jax.models.config",
    "DPTConfig": "unclip_jax.models.dpt",
    "DPTForDepthEstimation": "unclip_jax.models.dpt",
    "PriorTransformer": "unclip_jax.models.prior",
    "PriorTransformerConfig": "unclip_jax.models.prior",
    "StableUnCLIPImageNormalizer": "unclip_jax.models.prior",
    "UNet2DConditionConfig": "unclip_jax.models.unet",
    "UNet2DConditionModel": "unclip_jax.models.unet",
    "LoraError": "unclip_jax.lora",
    "LoraLoaderMixin": "unclip_jax.lora",
    "lora_params": "unclip_jax.lora",
    "AutoencoderKL": "unclip_jax.models.vae",
    "AutoencoderKLConfig": "unclip_jax.models.vae",
    "ImagePipelineOutput": "unclip_jax.pipelines.common",
    "Depth2ImgConfig": "unclip_jax.pipelines.depth2img",
    "StableDiffusionDepth2ImgPipeline": "unclip_jax.pipelines.depth2img",
    "StableUnCLIPImg2ImgPipeline": "unclip_jax.pipelines.stable_unclip",
    "StableUnCLIPPipeline": "unclip_jax.pipelines.stable_unclip",
    "UnCLIPConfig": "unclip_jax.pipelines.stable_unclip",
    "SCHEDULERS": "unclip_jax.schedulers",
    "SchedulerOutput": "unclip_jax.schedulers",
    "scheduler_from_config": "unclip_jax.schedulers",
    "make_mesh": "unclip_jax.sharding",
    "shard_params": "unclip_jax.sharding",
    "TextualInversionLoaderMixin": "unclip_jax.textual_inversion",
    "load_tokenizer": "unclip_jax.tokenizer",
    "load_component": "unclip_jax.weights.components",
    "CheckpointError": "unclip_jax.weights.errors",
    "ConversionError": "unclip_jax.weights.errors",
    "restore_params": "unclip_jax.weights.orbax_io",
    "save_params": "unclip_jax.weights.orbax_io",
    "enable_compilation_cache": "unclip_jax.cache",
    "convert_pipeline": "unclip_jax.conversion",
}

__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unclip_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPImageProcessor",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CheckpointError",
    "ConversionError",
    "DPTConfig",
    "DPTForDepthEstimation",
    "DPTImageProcessor",
    "Depth2ImgConfig",
    "ImagePipelineOutput",
    "LoraError",
    "LoraLoaderMixin",
    "PriorTransformer",
    "PriorTransformerConfig",
    "SCHEDULERS",
    "SchedulerOutput",
    "StableDiffusionDepth2ImgPipeline",
    "StableUnCLIPImageNormalizer",
    "StableUnCLIPImg2ImgPipeline",
    "StableUnCLIPPipeline",
    "TextualInversionLoaderMixin",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
    "UnCLIPConfig",
    "UnsupportedConfigError",
    "convert_pipeline",
    "enable_compilation_cache",
    "load_component",
    "load_tokenizer",
    "lora_params",
    "make_mesh",
    "restore_params",
    "save_params",
    "scheduler_from_config",
    "shard_params",
]
