"""The CLIP objective: loss and grads (both towers, projections, logit_scale) against transformers'
CLIPModel(return_loss=True) assembled from the same towers, on shapes a and b."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from objective_ref import random_examples, relative, rules_of, t, torch_grads, worst_leaf_relative, worst_relative
from torch_ref import to_numpy
from unclip_jax.training.objectives import build_objective

TOL = 1e-5


def clip_model(text_tower, vision_tower, logit_scale: float):
    """A transformers CLIPModel holding copies of the two towers' weights."""
    config = transformers.CLIPConfig(text_config=text_tower.config.to_dict(), vision_config=vision_tower.config.to_dict(),
                                     projection_dim=text_tower.config.projection_dim)
    model = transformers.CLIPModel(config)
    state = {**text_tower.state_dict(), **vision_tower.state_dict(), "logit_scale": torch.tensor(logit_scale)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("shape,logit_scale", [("a", None), ("b", 1.5)])
def test_clip_loss_and_grads_match_transformers(pipeline_pairs, pipeline_dirs, shape, logit_scale):
    ref, pipe, params = pipeline_pairs("unclip", shape)
    vision_ref = pipeline_pairs("unclip_img2img", shape)[0].image_encoder
    options = {"image_encoder": str(pipeline_dirs("unclip_img2img", shape))}
    if logit_scale is not None:
        options["logit_scale"] = logit_scale
    objective, pipe, params = build_objective("clip", pipe, params, options)
    captions = ("a red cube", "two birds on a wire", "a cat", "the sea at night")
    batch = objective.collate(random_examples(4, 36, seed=9, captions=captions))
    trainable, frozen = objective.split(params)
    assert set(trainable) == {"prior_text_encoder", "image_encoder", "logit_scale"}
    (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(trainable, frozen, batch, jax.random.key(0))

    model = clip_model(ref.prior_text_encoder, vision_ref, float(params["logit_scale"]))
    out = model(input_ids=t(batch["prior_input_ids"], np.int64), attention_mask=t(batch["prior_attention_mask"], np.int64),
                pixel_values=t(np.moveaxis(batch["clip_pixel_values"], -1, 1)), return_loss=True)
    out.loss.backward()
    text_grads = torch_grads(model, trainable["prior_text_encoder"],
                             rules_of(pipeline_dirs("unclip", shape) / "prior_text_encoder"),
                             keep=("text_model.", "text_projection."))
    loss_err = relative(loss, to_numpy(out.loss))
    errs = {"logit_scale": relative(grads["logit_scale"], to_numpy(model.logit_scale.grad))}
    errs["text"] = worst_relative(grads["prior_text_encoder"], text_grads)
    vision_grads = torch_grads(model, trainable["image_encoder"],
                               rules_of(pipeline_dirs("unclip_img2img", shape) / "image_encoder"),
                               keep=("vision_model.", "visual_projection."))
    errs["vision"] = worst_relative(grads["image_encoder"], vision_grads)
    leaf = max(worst_leaf_relative(grads["prior_text_encoder"], text_grads),
               worst_leaf_relative(grads["image_encoder"], vision_grads))
    print(f"clip {shape}: loss rel {loss_err:.2e}, grad rel {errs} (per leaf {leaf:.2e})")
    assert loss_err <= TOL, loss_err
    assert max(errs.values()) <= TOL, errs


def test_logit_scale_option_from_the_command_line():
    from unclip_jax.cli import parser
    from unclip_jax.training.command import _options

    argv = ["train", "clip", "--model", "m", "--data", "d", "--out", "o", "--steps", "1", "--batch-size", "1"]
    assert "logit_scale" not in _options(parser().parse_args(argv))  # the objective's default, log(1 / 0.07)
    assert _options(parser().parse_args([*argv, "--logit-scale", "4.6"]))["logit_scale"] == 4.6
