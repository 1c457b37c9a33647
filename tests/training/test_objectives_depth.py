"""The depth objective: one step's loss and UNet grads against a PyTorch computation with diffusers'
StableDiffusionDepth2ImgPipeline (its own `prepare_depth_map`, from given depth maps and from the DPT
estimator) and train_text_to_image's loss, on the same batch and draws."""

from __future__ import annotations

import jax
import numpy as np
import PIL.Image
import pytest
import torch

from objective_ref import check_parity, nchw, random_examples, rules_of, t, torch_grads
from test_objectives_decoder import torch_denoising_loss, torch_latents, torch_text
from unclip_jax.training.objectives import build_objective

TOL = 1e-5

CASES = [  # shape, depth maps in the data, options
    ("a", True, dict(snr_gamma=5.0, text_dropout=0.5)),
    ("b", False, dict(noise_offset=0.1, text_dropout=0.5, prediction_type="v_prediction")),
]


@pytest.mark.parametrize("shape,with_depth,options", CASES)
def test_depth_loss_and_grads_match_torch(pipeline_pairs, pipeline_dirs, shape, with_depth, options):
    ref, pipe, params = pipeline_pairs("depth2img", shape)
    objective, pipe, params = build_objective("depth", pipe, params, options)
    examples = random_examples(2, 32, seed=4)
    if with_depth:
        rng = np.random.default_rng(5)
        for e in examples:
            e["depth"] = rng.uniform(0.5, 9.0, (32, 32)).astype(np.float32)
    batch = objective.collate(examples)
    assert ("depth" in batch) == with_depth
    trainable, frozen = objective.split(params)
    key = jax.random.key(11)
    draws = objective.loss.draw(key, batch)
    (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(trainable, frozen, batch, key)

    unet = ref.unet
    unet.zero_grad(set_to_none=True)
    for p in unet.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        latents = torch_latents(ref.vae, batch["pixel_values"], draws["posterior_noise"])
        text = torch_text(ref.text_encoder, batch["input_ids"], objective.loss.empty_ids, np.asarray(draws["drop_text"]))
        images = [PIL.Image.fromarray(e["image"]) for e in examples]
        depth = t(batch["depth"]) if with_depth else None
        depth_mask = ref.prepare_depth_map(images, depth, 2, False, torch.float32, torch.device("cpu"))
    ref_loss = torch_denoising_loss(
        lambda x, ts: unet(torch.cat([x, depth_mask], dim=1), ts, text).sample, latents, nchw(draws["noise"]),
        t(draws["timesteps"], np.int64), ref.scheduler.config,
        options.get("prediction_type", ref.scheduler.config.prediction_type), options.get("snr_gamma"))
    ref_loss.backward()
    ref_grads = torch_grads(unet, trainable["unet"], rules_of(pipeline_dirs("depth2img", shape) / "unet"))

    check_parity(f"depth {shape}", loss, ref_loss, grads["unet"], ref_grads, tol=TOL)


def test_depth_batch_must_be_consistent(pipeline_pairs):
    _, pipe, params = pipeline_pairs("depth2img", "a")
    objective, _, _ = build_objective("depth", pipe, params, {})
    examples = random_examples(2, 32, seed=4)
    examples[0]["depth"] = np.ones((32, 32), np.float32)
    with pytest.raises(ValueError, match="depth"):
        objective.collate(examples)
    examples[1]["depth"] = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match="depth"):
        objective.collate(examples)
