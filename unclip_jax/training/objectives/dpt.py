"""The dpt objective (StableDiffusionDepth2ImgPipeline's `depth_estimator`): MiDaS's
scale-and-shift-invariant loss on the disparity. Per example, the prediction's least-squares scale and
shift onto the target (the data's "depth", larger = nearer) are solved in closed form, and the loss is the
mean squared residual after that alignment. The depth2img pipeline normalises the estimated depth per
example, so scale and shift are the freedom it leaves; the target is resized to the prediction's size as
torch's `interpolate(mode="bilinear", align_corners=False)` resizes (no antialiasing when it shrinks).
Used to train the default model's small DPT (issue 18)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.resize import resize_bilinear
from unclip_jax.training.objective import Objective
from unclip_jax.training.objectives.component import save_pipeline, split_component, stack_images


def scale_shift_invariant_mse(prediction: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """MiDaS's scale-and-shift-invariant MSE of prediction and target [B, H, W] (f32 scalar).

    Per example, (s, t) = argmin sum (s * p + t - d)^2 by the 2 x 2 normal equations; a prediction
    that is constant over an example is only shifted (s = 0)."""
    p = prediction.astype(jnp.float32).reshape(prediction.shape[0], -1)
    d = target.astype(jnp.float32).reshape(target.shape[0], -1)
    p_mean, d_mean = p.mean(axis=1, keepdims=True), d.mean(axis=1, keepdims=True)
    pc = p - p_mean
    var = jnp.mean(pc * pc, axis=1, keepdims=True)
    scale = jnp.where(var > eps, jnp.mean(pc * (d - d_mean), axis=1, keepdims=True) / jnp.maximum(var, eps), 0.0)
    aligned = scale * pc + d_mean
    return jnp.mean(jnp.square(aligned - d))

def dpt_loss(depth_estimator, dpt_params, pixel_values: jax.Array, target: jax.Array):
    """(loss, metrics): the DPT's prediction on processed pixel values [B, S, S, 3] against target
    disparities [B, H, W], resized to the prediction's size first (bilinear as torch computes it:
    jax.image.resize would antialias a target larger than the prediction)."""
    pred = depth_estimator.apply({"params": dpt_params}, pixel_values).predicted_depth
    if target.shape[1:] != pred.shape[1:]:
        target = resize_bilinear(target[..., None], pred.shape[1:], align_corners=False)[..., 0]
    loss = scale_shift_invariant_mse(pred, target)
    return loss, {"ssi_mse": loss}


def build(pipe, params, options: dict):
    """The dpt objective on a pipeline with a `depth_estimator`; examples carry "depth" (disparity)."""
    del options
    if getattr(pipe, "depth_estimator", None) is None:
        raise TypeError(f"the dpt objective needs a pipeline with a depth estimator; got {type(pipe).__name__}")

    def collate(examples):
        images = stack_images(examples)
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

    split, merge = split_component("depth_estimator")
    return Objective(name="dpt", collate=collate, split=split, merge=merge, loss=loss, save=save_pipeline,
                     pipeline_class=type(pipe)), pipe, params
