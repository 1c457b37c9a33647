"""`--cache-latents`: the decoder and depth objectives' frozen encoder outputs (VAE posterior, CLIP image
embedding) computed once per picture give the loss and grads of the uncached batch; a run with the cache
trains as one without; bad combinations are refused before anything is written."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import tiny_objective
from objective_ref import random_examples, relative, worst_relative
from unclip_jax import cli
from unclip_jax.training.objectives import build_objective

TOL = 1e-6  # fp32, relative: the same computation, the encoders run apart from the loss


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from unclip_jax.tiny import write_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny(kind, str(root / kind)) for kind in ("unclip_img2img", "depth2img")}


def _pipeline(folder):
    import unclip_jax as uj

    with open(f"{folder}/model_index.json") as f:
        name = json.load(f)["_class_name"]
    return getattr(uj, name).from_pretrained(folder)


CASES = [("decoder", "unclip_img2img", {"text_dropout": 0.5, "image_dropout": 0.5, "noise_level": (0, 900)}),
         ("depth", "depth2img", {"text_dropout": 0.5, "snr_gamma": 5.0})]


@pytest.mark.parametrize("name,kind,options", CASES)
def test_cached_batch_gives_the_same_loss_and_grads(tiny_dirs, name, kind, options):
    pipe, params = _pipeline(tiny_dirs[kind])
    objective, pipe, params = build_objective(name, pipe, params, options)
    examples = random_examples(4, 32, seed=2)
    rng = np.random.default_rng(3)
    for e in examples:
        e["depth"] = rng.uniform(0.5, 9.0, (32, 32)).astype(np.float32)  # ignored by the decoder's collate
    batch = objective.collate(examples)
    cached = {k: v for k, v in batch.items() if k not in objective.cache_replaces}
    cached.update(jax.device_get(jax.jit(objective.cache)(params, batch)))
    assert set(objective.cache_replaces) <= set(batch) and not set(objective.cache_replaces) & set(cached)

    trainable, frozen = objective.split(params)
    grad = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
    key = jax.random.key(5)
    (loss, _), grads = grad(trainable, frozen, batch, key)
    (loss_c, _), grads_c = grad(trainable, frozen, cached, key)
    loss_err, grad_err = relative(loss_c, loss), worst_relative(grads_c, grads)
    print(f"{name}: cached vs encoded per step: loss rel {loss_err:.1e}, grad rel {grad_err:.1e}")
    assert loss_err <= TOL and grad_err <= TOL, (loss_err, grad_err)

    # The loss reads the cached values (a moved posterior moves it).
    moved = dict(cached, latent_mean=cached["latent_mean"] + 1.0)
    assert relative(grad(trainable, frozen, moved, key)[0][0], loss) > 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_objective.write_folder(str(tmp_path_factory.mktemp("data") / "d"), n=5, size=34)


def _train(capsys, model, data, out, *extra):
    args = ["train", "decoder", "--model", model, "--data", data, "--out", out, "--steps", 2, "--batch-size", 8,
            "--seed", 1, "--save-every", 2, "--resolution", 32, "--center-crop", "--learning-rate", 1e-3,
            "--lr-warmup-steps", 0, "--text-dropout", 0.3, "--image-dropout", 0.3, "--no-progress", *extra]
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_run_with_cache_trains_as_without(capsys, tmp_path, tiny_dirs, data, fast_compile):
    import unclip_jax as uj

    runs = {}
    for label, extra in (("plain", ()), ("cached", ("--cache-latents",))):
        out = tmp_path / label
        code, io = _train(capsys, tiny_dirs["unclip_img2img"], data, out, *extra)
        assert code == 0, io.err
        assert ("--cache-latents: encoding the 5 records once" in io.err) == (label == "cached")
        losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
        _, params = uj.StableUnCLIPImg2ImgPipeline.from_pretrained(str(out / "final"))
        runs[label] = losses, params["unet"]
    (plain, unet), (cached, unet_c) = runs["plain"], runs["cached"]
    # Two steps of batch 8 (over the 8 test devices) of 5 records: lookups across epoch boundaries.
    assert len(plain) == 2 and np.allclose(cached, plain, rtol=1e-5, atol=0), (cached, plain)
    assert worst_relative(unet_c, unet) <= 1e-5

    # Stopped after step 1 and resumed: the cache is rebuilt the same way, the run ends bit for bit the same.
    out = tmp_path / "resumed"
    code, io = _train(capsys, tiny_dirs["unclip_img2img"], data, out, "--cache-latents", "--steps", 1)
    assert code == 0, io.err
    code, io = _train(capsys, tiny_dirs["unclip_img2img"], data, out, "--cache-latents", "--resume")
    assert code == 0 and "resumed from step 1" in io.err, io.err
    _, params = uj.StableUnCLIPImg2ImgPipeline.from_pretrained(str(out / "final"))
    assert [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")] == cached
    assert jax.tree.all(jax.tree.map(np.array_equal, params["unet"], unet_c))


def test_bad_cache_requests_write_nothing(capsys, tmp_path, tiny_dirs, data):
    out = tmp_path / "out"
    code, io = _train(capsys, tiny_dirs["unclip_img2img"], data, out, "--cache-latents", "--random-flip")
    assert code == 2 and "--cache-latents encodes each picture once" in io.err and not out.exists()
    args = ["train", "vae", "--model", tiny_dirs["unclip_img2img"], "--data", data, "--out", out, "--steps", 1,
            "--batch-size", 8, "--resolution", 32, "--center-crop", "--cache-latents"]
    code = cli.main([str(a) for a in args])
    io = capsys.readouterr()
    assert code == 2 and "the vae objective has no frozen encoder outputs to cache" in io.err and not out.exists()
