"""A small objective for the machinery's tests: a noisy linear regression from image and caption features,
with a random draw from the key each step (so resume has to restore the run's RNG)."""

from __future__ import annotations

import os
import time

import numpy as np

from unclip_jax.training.objective import Objective

FEATURES = 8


class TinyPipe:
    """Stands in for a pipeline: no components, loads what `save` wrote."""

    COMPONENTS = ()

    @classmethod
    def from_pretrained(cls, folder):
        with np.load(os.path.join(folder, "params.npz")) as f:
            return cls(), {"model": {k: f[k] for k in f.files}}


def collate(examples):
    delay = float(os.environ.get("TINY_COLLATE_DELAY", "0"))
    if delay:
        time.sleep(delay)
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 255.0
    b, h, w, _ = images.shape
    x = images.reshape(b, FEATURES, -1).mean(-1)
    y = np.array([len(e["text"]) / 10.0 for e in examples], np.float32)
    return {"x": x, "y": y}


def split(params):
    return params["model"], {}


def merge(trainable, frozen):
    return {"model": trainable}


def loss(trainable, frozen, batch, key):
    import jax
    import jax.numpy as jnp

    noise = 0.01 * jax.random.normal(key, batch["y"].shape)
    pred = batch["x"] @ trainable["w"] + trainable["b"]
    err = (pred - batch["y"] - noise) ** 2
    return jnp.mean(err), {"max_err": jnp.max(err)}


def save(out_dir, pipe, params):
    os.makedirs(out_dir)
    np.savez(os.path.join(out_dir, "params.npz"), **{k: np.asarray(v) for k, v in params["model"].items()})


OBJECTIVE = Objective(name="tiny", collate=collate, split=split, merge=merge, loss=loss, save=save,
                      pipeline_class=TinyPipe)


def load(model):
    rng = np.random.default_rng(0)
    return TinyPipe(), {"model": {"w": rng.normal(size=(FEATURES,)).astype(np.float32),
                                  "b": np.zeros((), np.float32)}}


def build(name, pipe, params, options):
    return OBJECTIVE, pipe, params


def write_folder(folder, n=10, size=40, seed=0, captions=None):
    """An imagefolder of `n` random RGB PNGs of varied aspect ratios with metadata.jsonl."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            h, w = size + int(rng.integers(0, 12)), size + int(rng.integers(0, 12))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
            text = captions[i] if captions is not None else "x" * (1 + i % 5)
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    return folder
