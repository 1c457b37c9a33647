"""The prior objective: one step's loss and prior grads against a PyTorch computation with diffusers'
PriorTransformer (StableUnCLIPPipeline's prior components) and a transformers CLIP image encoder, as
the Kandinsky 2.2 prior script computes it (normalised target, the prior scheduler's prediction type)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from objective_ref import check_parity, random_examples, rules_of, t, torch_grads
from test_objectives_decoder import torch_denoising_loss
from unclip_jax.training.objectives import build_objective

TOL = 1e-5

CASES = [
    ("a", dict(text_dropout=0.5)),
    ("b", dict(snr_gamma=5.0, noise_offset=0.05, text_dropout=0.5, prediction_type="epsilon")),
]


@pytest.mark.parametrize("shape,options", CASES)
def test_prior_loss_and_grads_match_torch(pipeline_pairs, pipeline_dirs, shape, options):
    ref, pipe, params = pipeline_pairs("unclip", shape)
    encoder_ref = pipeline_pairs("unclip_img2img", shape)[0].image_encoder
    options = {**options, "image_encoder": str(pipeline_dirs("unclip_img2img", shape))}
    objective, pipe, params = build_objective("prior", pipe, params, options)
    batch = objective.collate(random_examples(2, 40, seed=2))
    trainable, frozen = objective.split(params)
    assert "clip_mean" not in trainable["prior"] and "clip_mean" in frozen["prior"]
    key = jax.random.key(3)
    draws = objective.loss.draw(key, batch)
    (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(trainable, frozen, batch, key)

    prior = ref.prior
    prior.zero_grad(set_to_none=True)
    for p in prior.parameters():
        p.requires_grad_(True)
    drop = t(draws["drop_text"])[:, None]
    empty_ids, empty_mask = objective.loss.empty_ids, objective.loss.empty_mask
    with torch.no_grad():
        ids = torch.where(drop, t(empty_ids, np.int64), t(batch["prior_input_ids"], np.int64))
        mask = torch.where(drop, t(empty_mask).bool(), t(batch["prior_attention_mask"]).bool())
        text = ref.prior_text_encoder(ids)
        embeds = encoder_ref(t(np.moveaxis(batch["clip_pixel_values"], -1, 1))).image_embeds
        x0 = (embeds - prior.clip_mean) / prior.clip_std
    ref_loss = torch_denoising_loss(
        lambda x, ts: prior(x, timestep=ts, proj_embedding=text.text_embeds,
                            encoder_hidden_states=text.last_hidden_state, attention_mask=mask).predicted_image_embedding,
        x0, t(draws["noise"]), t(draws["timesteps"], np.int64), ref.prior_scheduler.config,
        options.get("prediction_type", ref.prior_scheduler.config.prediction_type), options.get("snr_gamma"))
    ref_loss.backward()
    ref_grads = torch_grads(prior, params["prior"], rules_of(pipeline_dirs("unclip", shape) / "prior"))
    for k in ("clip_mean", "clip_std"):
        ref_grads.pop(k)

    check_parity(f"prior {shape}", loss, ref_loss, grads["prior"], ref_grads, tol=TOL)


def test_prior_needs_a_matching_image_encoder(pipeline_pairs, pipeline_dirs):
    _, pipe, params = pipeline_pairs("unclip", "a")
    with pytest.raises(ValueError, match="image_encoder"):
        build_objective("prior", pipe, params, {})
    with pytest.raises(ValueError, match="width"):  # shape b's encoder embeds to 24, shape a's prior to 32
        build_objective("prior", pipe, params, {"image_encoder": str(pipeline_dirs("unclip_img2img", "b"))})
