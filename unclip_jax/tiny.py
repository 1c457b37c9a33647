"""A tiny random-weight Stable unCLIP checkpoint, made without torch or a network.

It has the real layout and wiring (CLIP BPE tokenizers, prior text encoder, Karlo-style prior, DDPM
prior scheduler, image normalizer, noising scheduler, OpenCLIP-style text encoder, unCLIP UNet with
projection class embeddings, DDIM, VAE) at toy sizes with random weights, saved as a `save_pretrained`
folder (orbax params). Images it makes are structured noise: it exists so a fresh machine can run the
whole text-to-image path end to end in seconds. Real images need a real checkpoint
(stabilityai/stable-diffusion-2-1-unclip-small).
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

from unclip_jax.tokenizer import write_clip_tokenizer

_HIDDEN, _EMBED = 32, 32

_TEXT = dict(architectures=["CLIPTextModel"], hidden_size=_HIDDEN, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
             projection_dim=_EMBED, eos_token_id=2, bos_token_id=0, pad_token_id=1, model_type="clip_text_model")

CONFIGS = {
    "prior_text_encoder": dict(_TEXT, architectures=["CLIPTextModelWithProjection"], hidden_size=_EMBED,
                               hidden_act="quick_gelu"),
    "prior": dict(_class_name="PriorTransformer", num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  embedding_dim=_EMBED, num_embeddings=77, additional_embeddings=4),
    "prior_scheduler": dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", clip_sample=True,
                            clip_sample_range=5.0, num_train_timesteps=1000, prediction_type="sample",
                            variance_type="fixed_small_log"),
    "image_normalizer": dict(_class_name="StableUnCLIPImageNormalizer", embedding_dim=_EMBED),
    "image_noising_scheduler": dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2",
                                    num_train_timesteps=1000),
    "text_encoder": _TEXT,
    "unet": dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4,
                 layers_per_block=1, block_out_channels=[32, 64], norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=_HIDDEN,
                 attention_head_dim=[2, 4], use_linear_projection=True, class_embed_type="projection",
                 projection_class_embeddings_input_dim=2 * _EMBED),
    "scheduler": dict(_class_name="DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085,
                      beta_end=0.012, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                      clip_sample=False),
    "vae": dict(_class_name="AutoencoderKL", block_out_channels=[16, 32], in_channels=3, out_channels=3,
                latent_channels=4, norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32),
}
_LIBRARY = {"prior_text_encoder": "transformers", "text_encoder": "transformers", "image_normalizer": "stable_diffusion"}


def _random_params(abstract, rng: np.random.Generator):
    """Random params of the abstract tree's shapes, drawn on the host (no init to compile): norm scales
    1, biases 0, other weights N(0, 1 / fan_in)."""
    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale" or name == "std":
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean") or len(leaf.shape) == 0:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[0]
        return (rng.standard_normal(leaf.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def write_tiny_unclip(folder: str, seed: int = 0) -> str:
    """Writes the tiny checkpoint to `folder` (which must not exist) and returns it."""
    from unclip_jax.pipelines.loading import save_pipeline  # noqa: PLC0415
    from unclip_jax.schedulers import scheduler_from_config  # noqa: PLC0415
    from unclip_jax.tokenizer import load_tokenizer  # noqa: PLC0415
    from unclip_jax.weights.components import build  # noqa: PLC0415
    from unclip_jax.weights.convert import abstract_params  # noqa: PLC0415

    if os.path.exists(folder):
        raise FileExistsError(f"{folder}: already exists")
    index: dict = {"_class_name": "StableUnCLIPPipeline"}
    components, params = {}, {}
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as src:
        for name in ("prior_tokenizer", "tokenizer"):
            write_clip_tokenizer(os.path.join(src, name), pad_token="<|endoftext|>" if name.startswith("prior") else "!")
            components[name] = load_tokenizer(os.path.join(src, name))
            index[name] = ["transformers", "CLIPTokenizer"]
        for name, config in CONFIGS.items():
            os.makedirs(os.path.join(src, name))
            cls = config.get("_class_name") or config["architectures"][0]
            index[name] = [_LIBRARY.get(name, "diffusers"), cls]
            if name.endswith("scheduler"):
                components[name] = scheduler_from_config(config)
                continue
            with open(os.path.join(src, name, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            built = build(config)
            params[name] = _random_params(abstract_params(built.module, *built.dummy_inputs), rng)
            components[name] = built.module
        save_pipeline(folder, src, index, components, params)
    return folder
