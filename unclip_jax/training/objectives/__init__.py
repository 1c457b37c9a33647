"""Training objectives: one module per objective, each building an `Objective` (see
`unclip_jax.training.objective`) from a loaded pipeline.

`build_objective(name, pipe, params, options) -> (objective, pipe, params)`; the returned pipeline and
params may differ from those given (LoRA adds adapters, textual inversion grows the tokenizer and the
embedding table).

Objectives and the pipeline each trains:
  decoder            StableUnCLIPImg2ImgPipeline: the UNet, on noise-augmented CLIP image embeddings.
  prior              StableUnCLIPPipeline: the PriorTransformer, a DDPM on the CLIP image embedding.
  depth              StableDiffusionDepth2ImgPipeline: the 5-channel UNet with a depth map.
  lora               the decoder's or depth's pipeline: LoRA adapters on the UNet (and optionally the text
                     encoder), through that objective's loss.
  textual-inversion  the decoder's or depth's pipeline: new token embeddings, through that objective's loss.
  clip               StableUnCLIPPipeline: the prior text tower and an image encoder, contrastively.
  vae                any pipeline with a VAE: L1 reconstruction + KL (LDM's autoencoder, no GAN/LPIPS).
  dpt                StableDiffusionDepth2ImgPipeline: the DPT, MiDaS's scale-and-shift-invariant loss.

`options` (all optional):
  snr_gamma (float | None): min-SNR-gamma weighting of the denoising loss (None: off).
  noise_offset (float, 0.0): scale of the per-example, per-channel noise offset.
  prediction_type ("epsilon" | "v_prediction" | "sample"): overrides the training scheduler's.
  text_dropout, image_dropout (float, 0.0): conditioning dropout probabilities for classifier-free
    guidance (the empty prompt's encoding; a zero image embedding).
  noise_level (int | (min, max)): the decoder's noise-augmentation level(s), inclusive (default: all).
  image_encoder (str): a CLIPVisionModelWithProjection folder (or a pipeline folder holding
    image_encoder/ and feature_extractor/): the prior's target embedding; clip's vision tower.
  resolution (int): the training images' side, checked against the VAE factor.
  lora_rank (4), lora_alpha (= rank), lora_text_encoder (False): the LoRA adapters.
  placeholder_token, initializer_token, num_vectors (1): textual inversion's new token(s).
  kl_weight (1e-6): the vae objective's KL weight.
  vae_decoder_only (False): the vae objective trains the decoder side only; the encoder (the latents) stays.
  mask_weight, smooth_weight (0.0): the vae objective's latent shaping: channel 0 pulled towards the
    foreground mask, the other channels' high frequencies penalised (see objectives/vae.py).
"""

from __future__ import annotations

import importlib

from unclip_jax.training.objective import Objective

# name -> module under unclip_jax.training.objectives
OBJECTIVES = {"decoder": "decoder", "prior": "prior", "depth": "depth", "lora": "lora",
              "textual-inversion": "textual_inversion", "clip": "clip", "vae": "vae", "dpt": "dpt"}


def build_objective(name: str, pipe, params, options: dict | None = None):
    """(Objective, pipe, params) for training `name` on a pipeline loaded by `from_pretrained`."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    options = dict(options or {})
    resolution = options.get("resolution")
    factor = getattr(pipe, "vae_scale_factor", None)
    if resolution is not None and factor and int(resolution) % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    module = importlib.import_module(f"{__name__}.{OBJECTIVES[name]}")
    return module.build(pipe, params, options)


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
