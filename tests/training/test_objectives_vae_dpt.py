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


VAE_CASES = [  # pipeline shape (VAE (16, 32) / 8 groups, factor 2; (8, 16, 16) / 4 groups, factor 4), size, options
    ("a", 16, {}),
    ("b", 32, {"kl_weight": 10.0}),  # random weights: the KL per pixel value is ~3e-2 of the L1
    ("b", 32, {"vae_decoder_only": True}),  # the decoder fine-tune: the same loss, the decoder side's grads
]


@pytest.mark.parametrize("shape,size,options", VAE_CASES)
def test_vae_loss_and_grads_match_torch(pipeline_pairs, pipeline_dirs, fast_compile, shape, size, options):
    ref, pipe, params = pipeline_pairs("unclip_img2img", shape)
    objective, pipe, params = build_objective("vae", pipe, params, options)
    batch = objective.collate(random_examples(2, size, seed=3))
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
