"""The vae and dpt objectives: one step's loss and grads against PyTorch computations with the diffusers
AutoencoderKL and the transformers DPTForDepthEstimation of the tiny pipelines, on the same batch and
posterior draw. The references are written here: LDM's autoencoder loss without its perceptual and
adversarial terms (diffusers' own posterior `kl()`), and MiDaS's scale-and-shift-invariant loss (each map
normalised by its mean and mean absolute deviation, in float64), the target resized by torch's bilinear
`interpolate`."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from objective_ref import check_parity, nchw, random_examples, relative, rules_of, t, torch_grads
from torch_ref import to_numpy
from unclip_jax.training.objectives import OBJECTIVES, build_objective

TOL = 1e-5  # fp32, relative
# The dpt loss is an L1 of maps normalised by their mean absolute deviation: both absolute values flip
# the gradient's sign for elements within round-off of zero, where fp32 (ours) and the float64 reference
# may disagree. Measured: shape a within 1e-5, shape b 1.1e-5.
DPT_GRAD_TOL = 2e-5


def _track(module: torch.nn.Module) -> None:
    module.zero_grad(set_to_none=True)
    for p in module.parameters():
        p.requires_grad_(True)


def torch_vae_loss(vae, pixel_values, posterior_noise, kl_weight):
    """L1 of the reconstruction of mean + std * noise, plus kl_weight times the batch-mean KL (summed over
    latents) per pixel value. Returns (loss, l1, kl)."""
    x = nchw(pixel_values)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.mean + posterior.std * nchw(posterior_noise)).sample
    l1 = (recon - x).abs().mean()
    kl = posterior.kl().mean()
    return l1 + kl_weight * kl / x[0].numel(), l1, kl


def torch_latent_shaping(mean, foreground, scaling_factor, mask_weight, smooth_weight):
    """The mask term (channel 0 of the scaled posterior mean against 2 * foreground - 1) and the smooth term
    (the other channels against their edge-padded 5 x 5 average pool), weighted. Returns (loss, mask, smooth)."""
    z = mean * scaling_factor
    mask = ((z[:, 0] - (2 * foreground - 1)) ** 2).mean()
    rest = z[:, 1:]
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(rest, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    smooth = ((rest - blurred) ** 2).mean()
    return mask_weight * mask + smooth_weight * smooth, mask, smooth


def object_examples(n: int, size: int, seed: int) -> tuple[list[dict], list[tuple[int, int, int, int]]]:
    """Pictures of one rectangle of a colour on a plain background of another, with mild noise, and the
    rectangles (top, left, bottom, right)."""
    rng = np.random.default_rng(seed)
    examples, boxes = [], []
    for i in range(n):
        background, color = rng.permutation([(230, 25, 25), (30, 60, 220), (240, 220, 30), (15, 15, 15)])[:2]
        image = np.empty((size, size, 3), np.float64)
        image[:] = background
        top, left = rng.integers(3, size // 2, 2)
        bottom, right = top + rng.integers(4, size // 2 - 2), left + rng.integers(4, size // 2 - 2)
        image[top:bottom, left:right] = color
        image += rng.normal(0, 3, image.shape)
        examples.append({"image": np.clip(np.round(image), 0, 255).astype(np.uint8), "text": "a box"})
        boxes.append((int(top), int(left), int(bottom), int(right)))
    return examples, boxes


VAE_CASES = [  # pipeline shape (VAE (16, 32) / 8 groups, factor 2; (8, 16, 16) / 4 groups, factor 4), size, options
    ("a", 16, {}),
    ("b", 32, {"kl_weight": 10.0}),  # random weights: the KL per pixel value is ~3e-2 of the L1
    ("b", 32, {"vae_decoder_only": True}),  # the decoder fine-tune: the same loss, the decoder side's grads
    ("a", 16, {"mask_weight": 0.5, "smooth_weight": 2.0}),  # the latent shaping terms, on pictures of objects
    ("b", 32, {"mask_weight": 0.2}),
]


@pytest.mark.parametrize("shape,size,options", VAE_CASES)
def test_vae_loss_and_grads_match_torch(pipeline_pairs, pipeline_dirs, fast_compile, shape, size, options):
    ref, pipe, params = pipeline_pairs("unclip_img2img", shape)
    objective, pipe, params = build_objective("vae", pipe, params, options)
    shaping = bool(options.get("mask_weight") or options.get("smooth_weight"))
    batch = objective.collate(object_examples(2, size, seed=3)[0] if shaping else random_examples(2, size, seed=3))
    trainable, frozen = objective.split(params)
    assert set(trainable) == {"vae"}
    decoder_side = {"decoder", "post_quant_conv"}
    if options.get("vae_decoder_only"):
        assert set(trainable["vae"]) == decoder_side and set(frozen["vae"]) == {"encoder", "quant_conv"}
    else:
        assert decoder_side < set(trainable["vae"]) and "vae" not in frozen
    key = jax.random.key(5)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(trainable, frozen, batch, key)
    # The objective's one draw: the posterior's standard normal, channels-last latents.
    factor, channels = pipe.vae.config.downsample_factor, pipe.vae.config.latent_channels
    noise = jax.random.normal(key, (2, size // factor, size // factor, channels))

    _track(ref.vae)
    keep = ("",)
    if options.get("vae_decoder_only"):  # the torch fine-tune: the encoder side takes no gradient
        keep = ("decoder.", "post_quant_conv.")
        for name, p in ref.vae.named_parameters():
            p.requires_grad_(name.startswith(keep))
    kl_weight = options.get("kl_weight", 1e-6)
    ref_loss, ref_l1, ref_kl = torch_vae_loss(ref.vae, batch["pixel_values"], noise, kl_weight)
    if shaping:
        mask_weight, smooth_weight = options.get("mask_weight", 0.0), options.get("smooth_weight", 0.0)
        ref_shaping, ref_mask, ref_smooth = torch_latent_shaping(
            ref.vae.encode(nchw(batch["pixel_values"])).latent_dist.mean, t(batch["foreground"]),
            ref.vae.config.scaling_factor, mask_weight, smooth_weight)
        assert float(to_numpy(ref_shaping)) > 0.1 * float(to_numpy(ref_loss)), "the shaping terms weigh in"
        ref_loss = ref_loss + ref_shaping
        assert relative(metrics["mask"], to_numpy(ref_mask)) <= TOL
        assert ("smooth" in metrics) == bool(smooth_weight)
        if smooth_weight:
            assert relative(metrics["smooth"], to_numpy(ref_smooth)) <= TOL
    ref_loss.backward()
    ref_grads = torch_grads(ref.vae, trainable["vae"], rules_of(pipeline_dirs("unclip_img2img", shape) / "vae"),
                            keep=keep)
    ref.vae.zero_grad(set_to_none=True)

    kl_err = relative(metrics["kl"], to_numpy(ref_kl))
    kl_share = kl_weight * float(to_numpy(ref_kl)) / batch["pixel_values"][0].size / float(to_numpy(ref_loss))
    check_parity(f"vae {shape}", loss, ref_loss, grads["vae"], ref_grads, tol=TOL,
                 extra=f"; kl rel {kl_err:.2e}, KL term {kl_share:.1%} of the loss")
    assert kl_err <= TOL, kl_err
    assert relative(metrics["l1"], to_numpy(ref_l1)) <= TOL
    if "kl_weight" in options:  # the KL term weighs in the comparison
        assert kl_share > 0.1, kl_share


def torch_ssi_loss(prediction, target, eps=1e-6):
    """MiDaS's scale-and-shift-invariant loss of [B, h, w] prediction and [B, H, W] target: the target resized
    to the prediction's size, then both normalised per example (minus the mean, over the mean absolute
    deviation) and compared by the mean absolute difference."""
    target = torch.nn.functional.interpolate(target[:, None], size=prediction.shape[1:], mode="bilinear",
                                             align_corners=False)[:, 0]

    def normalized(x):
        x = x.flatten(1).double()
        deviation = x - x.mean(1, keepdim=True)
        return deviation / (deviation.abs().mean(1, keepdim=True) + eps)

    return (normalized(prediction) - normalized(target)).abs().mean().float()


DPT_CASES = [  # pipeline shape (hybrid at 32, prediction 32; ViT at 40, prediction 40), data size
    ("a", 48),  # the target is downsized 48 -> 32
    ("b", 32),  # the target is upsized 32 -> 40
]


@pytest.mark.parametrize("shape,size", DPT_CASES)
def test_dpt_loss_and_grads_match_torch(pipeline_pairs, pipeline_dirs, fast_compile, shape, size):
    ref, pipe, params = pipeline_pairs("depth2img", shape)
    objective, pipe, params = build_objective("dpt", pipe, params, {})
    examples = random_examples(2, size, seed=6)
    rng = np.random.default_rng(7)
    for e in examples:  # a smooth disparity with noise, so the fit is neither exact nor degenerate
        yy, xx = np.mgrid[0:size, 0:size] / size
        e["depth"] = (1 + 3 * xx + rng.uniform(0, 2) * yy + rng.normal(0, 0.3, (size, size))).astype(np.float32)
    batch = objective.collate(examples)
    trainable, frozen = objective.split(params)
    assert set(trainable) == {"depth_estimator"}
    step = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
    (loss, _), grads = step(trainable, frozen, batch, jax.random.key(0))

    model = ref.depth_estimator
    _track(model)
    prediction = model(nchw(batch["pixel_values"])).predicted_depth
    assert prediction.shape[1:] != batch["depth"].shape[1:]
    ref_loss = torch_ssi_loss(prediction, t(batch["depth"]))
    ref_loss.backward()
    ref_grads = torch_grads(model, trainable["depth_estimator"],
                            rules_of(pipeline_dirs("depth2img", shape) / "depth_estimator"))
    model.zero_grad(set_to_none=True)

    check_parity(f"dpt {shape}", loss, ref_loss, grads["depth_estimator"], ref_grads, tol=TOL, grad_tol=DPT_GRAD_TOL)


def test_foreground_coverage_is_each_latent_cell_s_share_of_the_object():
    from unclip_jax.training.objectives.vae import foreground_coverage

    examples, boxes = object_examples(3, 32, seed=11)
    coverage = foreground_coverage(np.stack([e["image"] for e in examples]), 4)
    assert coverage.shape == (3, 8, 8)
    for cov, (top, left, bottom, right) in zip(coverage, boxes):
        mask = np.zeros((32, 32))
        mask[top:bottom, left:right] = 1
        np.testing.assert_allclose(cov, mask.reshape(8, 4, 8, 4).mean(axis=(1, 3)), atol=1e-6)


def test_vae_latent_shaping_refuses_bad_options(pipeline_pairs):
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    with pytest.raises(ValueError, match="mask_weight -1.0: must be >= 0"):
        build_objective("vae", pipe, params, {"mask_weight": -1})
    with pytest.raises(ValueError, match="smooth_weight shapes the encoder's latents, which vae_decoder_only"):
        build_objective("vae", pipe, params, {"smooth_weight": 1.0, "vae_decoder_only": True})
    objective, _, _ = build_objective("vae", pipe, params, {})
    assert "foreground" not in objective.collate(random_examples(2, 16, seed=0))  # no mask work when off


def test_vae_and_dpt_are_train_choices():
    from unclip_jax.cli import parser

    assert {"vae", "dpt"} <= set(OBJECTIVES)
    for name in ("vae", "dpt"):
        args = parser().parse_args(["train", name, "--model", "m", "--data", "d", "--out", "o", "--steps", "1",
                                   "--batch-size", "1"])
        assert (args.command, args.objective) == ("train", name)
    from unclip_jax.training.command import _options

    args = parser().parse_args(["train", "vae", "--model", "m", "--data", "d", "--out", "o", "--steps", "1",
                               "--batch-size", "1", "--vae-decoder-only"])
    assert _options(args)["vae_decoder_only"] is True
    args = parser().parse_args(["train", "vae", "--model", "m", "--data", "d", "--out", "o", "--steps", "1",
                               "--batch-size", "1", "--vae-mask-weight", "0.2", "--vae-smooth-weight", "1"])
    assert (_options(args)["mask_weight"], _options(args)["smooth_weight"]) == (0.2, 1.0)


def test_vae_and_dpt_refuse_what_they_cannot_train(pipeline_pairs):
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    with pytest.raises(TypeError, match="needs a pipeline with a VAE; got object"):
        build_objective("vae", object(), {}, {})
    with pytest.raises(TypeError, match="needs a pipeline with a depth estimator; got StableUnCLIPImg2ImgPipeline"):
        build_objective("dpt", pipe, params, {})
    objective, _, _ = build_objective("vae", pipe, params, {})
    with pytest.raises(ValueError, match="15 x 15 are not multiples of the VAE factor 2"):
        objective.collate(random_examples(2, 15, seed=0))

    _, pipe, params = pipeline_pairs("depth2img", "a")
    objective, _, _ = build_objective("dpt", pipe, params, {})
    examples = random_examples(2, 16, seed=0)
    for e in examples:
        e["depth"] = np.ones((16, 12), np.float32)
    with pytest.raises(ValueError, match=r"depth maps \(16, 12\) differ from the images' \(16, 16\)"):
        objective.collate(examples)
