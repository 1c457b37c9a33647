"""unclip-jax: Stable unCLIP, the Karlo prior and depth-to-image in pure-functional JAX/Flax.

The public API. Models are flax.linen modules whose params are a separate pytree; schedulers are
frozen objects with immutable state pytrees; pipelines take params and a `jax.random.key` per call.
Everything is channels-last, and every random draw can be passed in.
"""

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.image_processing_dpt import DPTImageProcessor
from unclip_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from unclip_jax.models.config import UnsupportedConfigError
from unclip_jax.models.dpt import DPTConfig, DPTForDepthEstimation
from unclip_jax.models.prior import PriorTransformer, PriorTransformerConfig, StableUnCLIPImageNormalizer
from unclip_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from unclip_jax.lora import LoraError, LoraLoaderMixin, lora_params
from unclip_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from unclip_jax.pipelines.common import ImagePipelineOutput
from unclip_jax.pipelines.depth2img import Depth2ImgConfig, StableDiffusionDepth2ImgPipeline
from unclip_jax.pipelines.stable_unclip import StableUnCLIPImg2ImgPipeline, StableUnCLIPPipeline, UnCLIPConfig
from unclip_jax.schedulers import SCHEDULERS, SchedulerOutput, scheduler_from_config
from unclip_jax.sharding import make_mesh, shard_params
from unclip_jax.textual_inversion import TextualInversionLoaderMixin
from unclip_jax.tokenizer import load_tokenizer
from unclip_jax.weights.components import load_component
from unclip_jax.weights.errors import CheckpointError, ConversionError
from unclip_jax.weights.orbax_io import restore_params, save_params

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: `python -m unclip_jax.conversion` must find the module not yet imported.
    if name == "convert_pipeline":
        from unclip_jax.conversion import convert_pipeline  # noqa: PLC0415

        return convert_pipeline
    raise AttributeError(f"module 'unclip_jax' has no attribute {name!r}")

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
    "load_component",
    "load_tokenizer",
    "lora_params",
    "make_mesh",
    "restore_params",
    "save_params",
    "scheduler_from_config",
    "shard_params",
]
