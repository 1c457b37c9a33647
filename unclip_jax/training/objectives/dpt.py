"""The dpt objective (StableDiffusionDepth2ImgPipeline's `depth_estimator`): MiDaS's
scale-and-shift-invariant loss on the disparity (the data's "depth", larger = nearer). Per example, the
prediction and the target are each shifted by their mean and scaled by their mean absolute deviation from
it (MiDaS's robust loss estimates both from each map, with the median), and the loss is the mean absolute
difference of the two. The depth2img pipeline normalises the estimated depth per example, so scale and
shift are the freedom it leaves; the sign is not: a least-squares alignment of the prediction onto the
target (MiDaS's other variant) lets a negative scale align an inverted prediction, and a DPT trained from
nothing with it learnt depth upside down (r = -0.98 with the true maps), which this loss punishes; the target is resized to the prediction's size as
torch's `interpolate(mode="bilinear", align_corners=False)` resizes (no antialiasing when it shrinks).
Used to train the default model's small DPT (issue 18)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.resize import resize_bilinear
from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.decoder import images_of, save_pipeline
from unclip_jax.training.objectives.params import make_split, merge


def normalized(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """[B, N]: each row minus its mean, divided by its mean absolute deviation from the mean (a row that
    is constant becomes zeros)."""
    centred = x - x.mean(axis=1, keepdims=True)
    return centred / (jnp.mean(jnp.abs(centred), axis=1, keepdims=True) + eps)


def scale_shift_invariant_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """MiDaS's scale-and-shift-invariant loss of prediction and target [B, H, W] (f32 scalar): the mean
    absolute difference of the two, each normalised per example (`normalized`)."""
    p = prediction.astype(jnp.float32).reshape(prediction.shape[0], -1)
    d = target.astype(jnp.float32).reshape(target.shape[0], -1)
    return jnp.mean(jnp.abs(normalized(p) - normalized(d)))


def dpt_loss(depth_estimator, dpt_params, pixel_values: jax.Array, target: jax.Array):
    """(loss, metrics): the DPT's prediction on processed pixel values [B, S, S, 3] against target
    disparities [B, H, W], resized to the prediction's size first (bilinear as torch computes it:
    jax.image.resize would antialias a target larger than the prediction)."""
    pred = depth_estimator.apply({"params": dpt_params}, pixel_values).predicted_depth
    if target.shape[1:] != pred.shape[1:]:
        target = resize_bilinear(target[..., None], pred.shape[1:], align_corners=False)[..., 0]
    loss = scale_shift_invariant_loss(pred, target)
    return loss, {"ssi": loss}


def build(pipe, params, options: dict):
    """The dpt objective on a pipeline with a `depth_estimator`; examples carry "depth" (disparity)."""
    del options
    if getattr(pipe, "depth_estimator", None) is None:
        raise TypeError(f"the dpt objective needs a pipeline with a depth estimator; got {type(pipe).__name__}")

    def collate(examples):
        images = images_of(examples, 1)
        missing = [i for i, e in enumerate(examples) if e.get("depth") is None]
        if missing:
            raise ValueError(f"dpt: examples {missing[:5]} of the batch have no depth map")
        depth = np.stack([np.asarray(e["depth"], np.float32) for e in examples])
        if depth.shape[1:] != images.shape[1:3]:
            raise ValueError(f"dpt: depth maps {depth.shape[1:]} differ from the images' {images.shape[1:3]}")
        return {"pixel_values": np.asarray(pipe.feature_extractor(list(images)), np.float32), "depth": depth}

    def loss(trainable, frozen, batch, key):
        del frozen, key
        return dpt_loss(pipe.depth_estimator, trainable["depth_estimator"], batch["pixel_values"], batch["depth"])

    split, _ = make_split(["depth_estimator"])
    return Objective(name="dpt", collate=collate, split=split, merge=merge, loss=loss, save=save_pipeline,
                     pipeline_class=type(pipe)), pipe, params
