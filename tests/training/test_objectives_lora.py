"""The LoRA objective: two AdamW steps at a large learning rate, saved, loaded into diffusers with
`load_lora_weights`: diffusers' images equal ours with the same adapter and draws (tests/test_lora.py's
tolerance), and differ visibly from the base model's."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch

from objective_ref import random_examples
from torch_ref import feed_noise, nhwc_to_nchw
from unclip_jax import lora as L
from unclip_jax.training.objectives import build_objective

TOL = 2e-3  # max abs on images in [0, 1], as tests/test_lora.py


def images(ref, pipe, params, shape, seed=0):
    """The same img2img run (given image embeddings and all noise) on diffusers and on ours."""
    dim = pipe.image_normalizer.config.embedding_dim
    side = 32 // pipe.vae_scale_factor
    rng = np.random.RandomState(seed)
    embeds, noise = rng.randn(2, dim).astype(np.float32), rng.randn(2, dim).astype(np.float32)
    latents = rng.randn(2, side, side, 4).astype(np.float32)
    kw = dict(prompt=["a cat", "a red dog"], height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
              noise_level=10, output_type="np")
    with feed_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_unclip_img2img"], [torch.from_numpy(noise)]):
        expected = ref(image_embeds=torch.from_numpy(embeds), latents=nhwc_to_nchw(latents), **kw).images
    out = pipe(image_embeds=embeds, params=params, key=jax.random.key(0), latents=latents, image_embeds_noise=noise,
               **kw).images
    return np.asarray(out), expected


@pytest.mark.parametrize("shape,text_encoder", [("a", False), ("b", True)])
def test_trained_lora_loads_in_diffusers(pipeline_pairs, tmp_path, shape, text_encoder):
    ref, pipe, params = pipeline_pairs("unclip_img2img", shape)
    objective, pipe, params = build_objective(
        "lora", pipe, params, dict(lora_rank=4, lora_alpha=8, lora_text_encoder=text_encoder, text_dropout=0.3))
    trainable, frozen = objective.split(params)
    assert set(trainable) == {"lora"}
    trained = {c for c in trainable["lora"]["adapters"]["default_0"]}
    assert trained == ({"unet", "text_encoder"} if text_encoder else {"unet"})
    batch = objective.collate(random_examples(2, 32, seed=6))
    opt = optax.adamw(0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state, key):
        (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(trainable, frozen, batch, key)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    for i in range(2):
        trainable, state, loss = step(trainable, state, jax.random.key(i))
        assert np.isfinite(float(loss))
    params = objective.merge(trainable, frozen)
    out_dir = tmp_path / "final"
    objective.save(str(out_dir), pipe, params)
    assert (out_dir / L.LORA_WEIGHT_NAME).is_file() and (out_dir / "model_index.json").is_file()

    base, _ = images(ref, pipe, L.unload_lora_weights(params), shape)
    ref.load_lora_weights(str(out_dir))
    try:
        ours, expected = images(ref, pipe, params, shape)
    finally:
        ref.unload_lora_weights()
    err = float(np.abs(ours - expected).max())
    print(f"lora {shape}: image max abs {err:.2e}; change from base {np.abs(expected - base).max():.2e}")
    assert err <= TOL, err
    assert np.abs(expected - base).max() > 50 * TOL, "the trained LoRA does not change the images"
