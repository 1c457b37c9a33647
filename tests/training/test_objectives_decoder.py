"""The decoder objective: one step's loss and UNet grads against a PyTorch computation with the diffusers
StableUnCLIPImg2ImgPipeline's models on the same batch and draws (train_text_to_image's loss, with Stable
unCLIP's noise-augmented image embedding as class labels and conditioning dropout)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from objective_ref import check_parity, nchw, random_examples, rules_of, t, torch_grads
from unclip_jax.training.objectives import build_objective

TOL = 1e-5  # fp32, relative


def torch_denoising_loss(unet_call, latents, noise, timesteps, scheduler_config, prediction_type, snr_gamma):
    """train_text_to_image's loss: add_noise, target by prediction type, (min-SNR weighted) MSE."""
    sched = DDPMScheduler.from_config(scheduler_config)
    sched.register_to_config(prediction_type=prediction_type)
    noisy = sched.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    pred = unet_call(noisy, timesteps)
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(sched, timesteps)
    w = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type == "v_prediction":
        w = w / (snr + 1)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * w).mean()


def torch_text(text_encoder, ids, empty_ids, drop):
    hidden = text_encoder(t(ids, np.int64))[0]
    empty = text_encoder(t(np.broadcast_to(empty_ids, ids.shape), np.int64))[0]
    return torch.where(t(drop)[:, None, None], empty, hidden)


def torch_latents(vae, pixel_values, posterior_noise):
    dist = vae.encode(nchw(pixel_values)).latent_dist
    return (dist.mean + dist.std * nchw(posterior_noise)) * vae.config.scaling_factor


def torch_decoder_loss(ref, empty_ids, batch, draws, options, text_encoder=None):
    """The decoder's loss in PyTorch with the diffusers pipeline's models (`text_encoder` replaces its
    text encoder and keeps its graph: textual inversion differentiates through it)."""
    text_encoder = text_encoder or ref.text_encoder
    with torch.no_grad():
        latents = torch_latents(ref.vae, batch["pixel_values"], draws["posterior_noise"])
        embeds = ref.image_encoder(t(np.moveaxis(batch["clip_pixel_values"], -1, 1))).image_embeds
        levels, embed_noise = np.asarray(draws["noise_level"]), t(draws["image_embeds_noise"])
        labels = torch.cat([ref.noise_image_embeddings(embeds[i:i + 1], int(levels[i]), noise=embed_noise[i:i + 1])
                            for i in range(len(levels))])
        labels = torch.where(t(draws["drop_image"])[:, None], torch.zeros_like(labels), labels)
    with torch.set_grad_enabled(text_encoder is not ref.text_encoder):
        text = torch_text(text_encoder, batch["input_ids"], empty_ids, np.asarray(draws["drop_text"]))
    return torch_denoising_loss(
        lambda x, ts: ref.unet(x, ts, text, class_labels=labels).sample, latents, nchw(draws["noise"]),
        t(draws["timesteps"], np.int64), ref.scheduler.config,
        options.get("prediction_type", ref.scheduler.config.prediction_type), options.get("snr_gamma"))


CASES = [  # shape, options
    ("a", dict(snr_gamma=5.0, noise_offset=0.1, text_dropout=0.5, image_dropout=0.5)),
    ("b", dict(noise_level=(10, 900), text_dropout=0.5, image_dropout=0.5)),
]


@pytest.mark.parametrize("shape,options", CASES)
def test_decoder_loss_and_grads_match_torch(pipeline_pairs, pipeline_dirs, shape, options):
    ref, pipe, params = pipeline_pairs("unclip_img2img", shape)
    objective, pipe, params = build_objective("decoder", pipe, params, options)
    batch = objective.collate(random_examples(2, 32, seed=1))
    trainable, frozen = objective.split(params)
    assert set(trainable) == {"unet"}
    key = jax.random.key(7)
    draws = objective.loss.draw(key, batch)
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(trainable, frozen, batch, key)

    # PyTorch, on the same batch and draws.
    unet = ref.unet
    unet.zero_grad(set_to_none=True)
    for p in unet.parameters():
        p.requires_grad_(True)
    ref_loss = torch_decoder_loss(ref, objective.loss.empty_ids, batch, draws, options)
    ref_loss.backward()
    ref_grads = torch_grads(unet, trainable["unet"], rules_of(pipeline_dirs("unclip_img2img", shape) / "unet"))

    # The draws exercise both dropout branches and the options.
    assert np.asarray(draws["drop_text"]).any() or np.asarray(draws["drop_image"]).any()
    check_parity(f"decoder {shape}", loss, ref_loss, grads["unet"], ref_grads, tol=TOL)
    assert np.isfinite(float(metrics["mse"]))
