"""The textual-inversion objective: one step's loss and the new rows' grads against PyTorch (a copy of the
diffusers pipeline's text encoder grown as diffusers' script grows it, the decoder loss on top); only the
new rows train; diffusers' `load_textual_inversion` reads the saved learned_embeds.safetensors."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

from objective_ref import random_examples, relative
from test_objectives_decoder import torch_decoder_loss
from torch_ref import to_numpy
from unclip_jax.training.objectives import build_objective

TOL = 1e-5

CASES = [("a", 1, dict(text_dropout=0.5)), ("b", 2, dict(snr_gamma=5.0, image_dropout=0.5))]


@pytest.mark.parametrize("shape,num_vectors,options", CASES)
def test_textual_inversion_loss_grads_and_file(pipeline_pairs, tmp_path, shape, num_vectors, options):
    ref, pipe0, params0 = pipeline_pairs("unclip_img2img", shape)
    options = {**options, "placeholder_token": "<cat-toy>", "initializer_token": "toy", "num_vectors": num_vectors}
    objective, pipe, params = build_objective("textual-inversion", pipe0, params0, options)
    assert "<cat-toy>" not in pipe0.tokenizer.get_vocab()  # the pipeline given is left as it was
    tokens = ["<cat-toy>"] + [f"<cat-toy>_{i}" for i in range(1, num_vectors)]
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    batch = objective.collate(random_examples(2, 32, seed=8, captions=("a photo of <cat-toy>", "a <cat-toy> on grass")))
    assert all(np.isin(ids, batch["input_ids"][0]))
    trainable, frozen = objective.split(params)
    assert trainable["embeds"].shape == (num_vectors, pipe.text_encoder.config.hidden_size)
    key = jax.random.key(5)
    draws = objective.loss.draw(key, batch)
    (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(trainable, frozen, batch, key)

    # PyTorch: the script's resize_token_embeddings and initialisation, on a copy of the text encoder.
    init_id = pipe0.tokenizer.encode("toy", add_special_tokens=False)[0]
    text_encoder = copy.deepcopy(ref.text_encoder)
    text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[init_id].clone()
    table.requires_grad_(True)
    ref_loss = torch_decoder_loss(ref, objective.loss.base.empty_ids, batch, draws, options, text_encoder)
    ref_loss.backward()
    ref_rows = to_numpy(table.grad[ids])
    other = np.delete(to_numpy(table.grad), ids, axis=0)

    loss_err = relative(loss, to_numpy(ref_loss))
    grad_err = relative(grads["embeds"], ref_rows)
    print(f"textual inversion {shape}: loss rel {loss_err:.2e}, grad rel {grad_err:.2e}; torch grads of the "
          f"other rows (restored by the script) max {np.abs(other).max():.2e}")
    assert loss_err <= TOL, loss_err
    assert grad_err <= TOL, grad_err

    # A trained value round-trips through the file into diffusers.
    trained = (np.asarray(trainable["embeds"]) + np.arange(num_vectors)[:, None] * 0.01 + 0.5).astype(np.float32)
    out_dir = tmp_path / "final"
    objective.save(str(out_dir), pipe, objective.merge({"embeds": trained}, frozen))
    tokenizer, text_encoder = copy.deepcopy(ref.tokenizer), copy.deepcopy(ref.text_encoder)
    ref.load_textual_inversion(str(out_dir / "learned_embeds.safetensors"), tokenizer=tokenizer,
                               text_encoder=text_encoder)
    loaded = tokenizer.convert_tokens_to_ids(tokens)
    np.testing.assert_array_equal(to_numpy(text_encoder.get_input_embeddings().weight[loaded]), trained)
    assert (out_dir / "model_index.json").is_file()
