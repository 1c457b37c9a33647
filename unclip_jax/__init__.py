"""unclip-jax: Stable unCLIP, the Karlo prior and depth-to-image in pure-functional JAX/Flax.

The public API. Models are flax.linen modules whose params are a separate pytree; everything is
channels-last; every random draw can be passed in.
"""

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.models.clip import CLIPOutput, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from unclip_jax.models.config import UnsupportedConfigError
from unclip_jax.tokenizer import load_tokenizer, tokenize, write_clip_tokenizer
from unclip_jax.weights.components import load_component
from unclip_jax.weights.convert import ConversionError
from unclip_jax.weights.orbax_io import restore_params, save_params
from unclip_jax.weights.safetensors_io import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "CLIPImageProcessor",
    "CLIPOutput",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CheckpointError",
    "ConversionError",
    "UnsupportedConfigError",
    "load_component",
    "load_tokenizer",
    "restore_params",
    "save_params",
    "tokenize",
    "write_clip_tokenizer",
]
