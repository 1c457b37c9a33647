"""StableDiffusionDepth2ImgPipeline: end-to-end parity with diffusers on tiny random-weight checkpoints
(both fixture shapes), given the same explicit random inputs; PyTorch's bicubic resize; one compiled
loop; errors before work."""

from __future__ import annotations

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from torch_ref import feed_noise, nchw_to_nhwc, nhwc_to_nchw

from unclip_jax.image_processing import vae_pixels
from unclip_jax.models.resize import resize_bicubic
from unclip_jax.pipelines.depth2img import StableDiffusionDepth2ImgPipeline

TOL = 2e-3  # max abs on images in [0, 1], fp32
PIPELINE_MODULE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_depth2img"
HW = (32, 48)


@pytest.fixture(scope="module")
def depth2img(pipeline_pairs):
    return pipeline_pairs("depth2img", "a")


def _image(seed, hw=HW):
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray(rng.randint(0, 256, hw + (3,), dtype=np.uint8))


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float32))


def run_both(ref, pipe, params, *, prompt, image, steps, strength, depth=None, ref_depth=None, eta=0.0, seed=0,
             ref_callback=None, callback=None, **kw):
    """Runs diffusers with fed draws (posterior noise, start noise, DDIM noise), captures its VAE posterior
    sample, and runs ours on the same draws. Returns (ours, diffusers', posterior sample, eps)."""
    import importlib

    mod = importlib.import_module(PIPELINE_MODULE)
    n_images = 1 if isinstance(image, PIL.Image.Image) else len(image)
    batch = (1 if isinstance(prompt, str) else len(prompt)) * kw.get("num_images_per_prompt", 1)
    f = pipe.vae_scale_factor
    h, w = HW[0] // f, HW[1] // f
    rng = np.random.RandomState(seed)
    eps = rng.randn(n_images, h, w, 4).astype(np.float32)
    noise = rng.randn(batch, h, w, 4).astype(np.float32)
    n_run = min(int(steps * strength), steps)
    step_noise = rng.randn(n_run, batch, h, w, 4).astype(np.float32)
    draws = [nhwc_to_nchw(eps), nhwc_to_nchw(noise)] + ([nhwc_to_nchw(x) for x in step_noise] if eta > 0 else [])
    captured = []
    original = mod.retrieve_latents

    def capture(*a, **k):
        captured.append(original(*a, **k))
        return captured[-1]

    mod.retrieve_latents = capture
    try:
        with feed_noise(["diffusers.models.autoencoders.vae", PIPELINE_MODULE,
                         "diffusers.schedulers.scheduling_ddim"], draws):
            expected = ref(prompt=prompt, image=image, depth_map=ref_depth, strength=strength,
                           num_inference_steps=steps, eta=eta, output_type="np",
                           callback_on_step_end=ref_callback, **kw).images
    finally:
        mod.retrieve_latents = original
    posterior = nchw_to_nhwc(captured[0])
    out = pipe(prompt, image=image, params=params, key=jax.random.key(0), depth_map=depth, strength=strength,
               num_inference_steps=steps, eta=eta, output_type="np", image_latents=posterior, noise=noise,
               step_noise=step_noise if eta > 0 else None, callback_on_step_end=callback, **kw).images
    assert out.shape == expected.shape == (batch, *HW, 3)
    return out, expected, posterior, eps


# Between them, on each shape: strength < 1 and = 1, a given depth map (array on "a", PIL on "b") and an
# estimated one, guidance on and off, batched prompts, two images per prompt, DDIM noise (eta > 0).
# The callback test adds a single prompt with guidance and estimated depth.
CASES = {
    "cfg_depth_given_two_per_prompt": dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"],
                                           guidance_scale=5.0, strength=0.6, steps=5, num_images_per_prompt=2),
    "nocfg_strength1_two_images_eta": dict(prompt=["a cat", "a dog on a hill"], guidance_scale=1.0, strength=1.0,
                                           steps=3, images=2, eta=0.7),
}


@pytest.mark.parametrize("shape, case", [(s, c) for s in "ab" for c in CASES])
def test_parity(pipeline_pairs, shape, case):
    ref, pipe, params = pipeline_pairs("depth2img", shape)
    kw = dict(CASES[case])
    n_images = kw.pop("images", 1)
    image = _image(1) if n_images == 1 else [_image(i + 1) for i in range(n_images)]
    depth = ref_depth = None
    if "two_per_prompt" in case and shape == "a":  # another size than the image: resized to the latent grid
        depth = np.random.RandomState(5).rand(1, 20, 28).astype(np.float32) * 10
        ref_depth = _t(depth)
    elif "two_per_prompt" in case:
        depth = PIL.Image.fromarray(np.random.RandomState(6).randint(0, 256, (24, 40), dtype=np.uint8), mode="L")
        ref_depth = _t(np.asarray(depth, np.float32))[None]
    out, expected, posterior, eps = run_both(ref, pipe, params, image=image, depth=depth, ref_depth=ref_depth,
                                             seed=len(case), **kw)
    err = float(np.abs(out - expected).max())
    print(f"depth2img {shape}-{case}: max abs error {err:.3g}")
    assert err <= TOL, f"max abs error {err:.3g}"
    if n_images > 1:
        # Our own preprocessing + VAE encoder give diffusers' posterior sample from the same noise.
        ours = pipe.encode_image(params, image, noise=eps)
        np.testing.assert_allclose(np.asarray(ours), posterior, atol=1e-4 * max(1.0, np.abs(posterior).max()))


def test_callback_on_step_end_parity_heun(depth2img):
    """With a second-order scheduler (Heun: the start index is scaled by the order, two UNet calls per
    step), the callback sees each step's index, timestep and latents, and what it returns replaces them."""
    import diffusers

    from unclip_jax.schedulers import SCHEDULERS

    ref0, pipe0, params = depth2img
    heun = diffusers.HeunDiscreteScheduler.from_config(ref0.scheduler.config)
    ref = diffusers.StableDiffusionDepth2ImgPipeline(**{**ref0.components, "scheduler": heun})
    ref.set_progress_bar_config(disable=True)
    config = {k: v for k, v in heun.config.items() if not k.startswith("_")}
    pipe = StableDiffusionDepth2ImgPipeline(**{**{n: getattr(pipe0, n) for n in pipe0.COMPONENTS},
                                               "scheduler": SCHEDULERS["HeunDiscreteScheduler"].from_config(config)})
    seen, ref_seen = [], []

    def callback(p, i, t, kw):
        assert p is pipe and kw["depth_mask"].shape == (2, 16, 24, 1)
        seen.append((i, t, kw["latents"].copy()))
        return {"latents": kw["latents"] * 0.5} if i == 1 else {}

    def ref_callback(p, i, t, kw):
        ref_seen.append((i, int(t), nchw_to_nhwc(kw["latents"])))
        return {"latents": kw["latents"] * 0.5} if i == 1 else {}

    out, expected, _, _ = run_both(ref, pipe, params, prompt="a cat", image=_image(3), steps=4, strength=0.75,
                                   guidance_scale=4.0, callback=callback, ref_callback=ref_callback,
                                   callback_on_step_end_tensor_inputs=["latents", "depth_mask"])
    assert [(i, t) for i, t, _ in seen] == [(i, t) for i, t, _ in ref_seen] and len(seen) == 5
    for (_, _, a), (_, _, b) in zip(seen, ref_seen):
        np.testing.assert_allclose(a, b, atol=1e-3 * max(1.0, np.abs(b).max()))
    err = float(np.abs(out - expected).max())
    print(f"depth2img callback heun: max abs error {err:.3g}")
    assert err <= TOL


@pytest.mark.parametrize("size_in, size_out", [((20, 28), (16, 24)), ((7, 5), (16, 24)), ((32, 32), (8, 12)),
                                               ((3, 40), (3, 9))])
def test_resize_bicubic_matches_torch(size_in, size_out):
    x = np.random.RandomState(0).randn(2, *size_in).astype(np.float32)
    expected = torch.nn.functional.interpolate(_t(x)[:, None], size=size_out, mode="bicubic",
                                               align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(resize_bicubic(x, size_out)), expected, atol=1e-5)


def test_vae_pixels_match_diffusers_preprocessing():
    """Images whose size is not a multiple of the VAE factor are cut down as diffusers does (Lanczos for
    PIL, nearest for float arrays)."""
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=4)
    pil = _image(7, hw=(33, 50))
    arr = np.random.RandomState(8).rand(2, 35, 21, 3).astype(np.float32)
    for image, ours in ((pil, vae_pixels([pil], 4)), (arr, vae_pixels(list(arr), 4))):
        expected = nchw_to_nhwc(proc.preprocess(image))
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_one_compiled_loop_and_float_images(depth2img):
    """A second call with the same static configuration compiles nothing; a float image in [0, 1] is the
    image it equals (not transformers' truncated, twice-rescaled pixels)."""
    _, pipe, params = depth2img
    kw = dict(params=params, key=jax.random.key(1), strength=0.7, num_inference_steps=3, guidance_scale=2.0,
              output_type="np")
    image = _image(4)
    a = pipe("a cat", image=image, **kw).images
    size = pipe.compiled_cache_sizes()
    b = pipe("a dog", image=np.asarray(image, np.float32)[None] / 255, **kw).images
    assert pipe.compiled_cache_sizes() == size
    c = pipe("a cat", image=np.asarray(image, np.float32)[None] / 255, **kw).images
    np.testing.assert_allclose(c, a, atol=1e-6)
    assert np.abs(a - b).max() > 1e-3
    # The same key gives the same images; another key other images.
    d = pipe("a cat", image=image, **dict(kw, key=jax.random.key(2))).images
    assert np.abs(a - d).max() > 1e-3


def test_given_latents_and_depth_need_no_image_or_key(depth2img):
    """image=None with `image_latents` and `depth_map` (and no key when every draw is given) gives what the
    image gives with the same draws; the depth map is resized to the latent grid."""
    _, pipe, params = depth2img
    kw = dict(params=params, strength=0.7, num_inference_steps=3, guidance_scale=2.0, output_type="np")
    image = _image(6)
    latents = pipe.encode_image(params, image, key=jax.random.key(3))
    depth = np.asarray(pipe.estimate_depth(params, image))
    noise = np.random.RandomState(2).randn(1, 16, 24, 4).astype(np.float32)
    a = pipe("a cat", image=image, key=jax.random.key(5), image_latents=latents, noise=noise, **kw).images
    b = pipe("a cat", image=None, image_latents=latents, depth_map=depth, noise=noise, **kw).images
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_output_types(depth2img):
    _, pipe, params = depth2img
    kw = dict(params=params, key=jax.random.key(1), strength=0.7, num_inference_steps=3, guidance_scale=2.0)
    pil = pipe("a cat", image=_image(1), **kw).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (48, 32)
    lat = pipe("a cat", image=_image(1), output_type="latent", **kw).images
    assert lat.shape == (1, 16, 24, 4)
    (arr,) = pipe("a cat", image=_image(1), output_type="np", return_dict=False, **kw)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))


def test_errors_before_work(depth2img):
    """Every error comes before any model runs: params are empty here."""
    _, pipe, _ = depth2img
    kw = dict(params={}, key=jax.random.key(0), num_inference_steps=3)
    image = _image(0)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe("x", image=image, strength=1.5, **kw)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe("x", image=image, strength=-0.1, **kw)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        pipe("x", image=image, strength=0.3, **kw)
    with pytest.raises(ValueError, match=r"depth_map must be \[B, H, W\]"):
        pipe("x", image=image, depth_map=np.zeros((1, 1, 8, 8)), **kw)
    with pytest.raises(ValueError, match="3 depth map"):
        pipe(["x", "y"], image=image, depth_map=np.zeros((3, 8, 8)), **kw)
    with pytest.raises(ValueError, match="single-channel"):
        pipe("x", image=image, depth_map=image, **kw)
    with pytest.raises(TypeError, match="depth_map: expected an array"):
        pipe("x", image=image, depth_map="deep", **kw)
    with pytest.raises(TypeError, match="expected a PIL image"):
        pipe("x", image="not an image", **kw)
    with pytest.raises(ValueError, match="give `image`"):
        pipe("x", image=None, **kw)
    with pytest.raises(ValueError, match="3 image"):
        pipe(["x", "y"], image=[image] * 3, **kw)
    with pytest.raises(ValueError, match=r"float image must lie in \[0, 1\]"):
        pipe("x", image=np.full((1, 32, 48, 3), 2.0, np.float32), **kw)
    with pytest.raises(ValueError, match=r"`noise` has shape"):
        pipe("x", image=image, noise=np.zeros((1, 4, 16, 24)), **kw)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("x", image=image, callback_on_step_end_tensor_inputs=["timesteps"], **kw)
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", image=image, output_type="tensor", **kw)


# ---------------------------------------------------------------- issue 15: inputs of every kind, refused early


def _mode_images():
    """One image per PIL mode (RGB, RGBA, LA, L, P with transparency, I;16, CMYK) and arrays with 1, 3, 4
    channels, all 32 x 48."""
    rng = np.random.RandomState(11)
    rgb = _image(10)
    rgba = PIL.Image.fromarray(rng.randint(0, 256, HW + (4,), dtype=np.uint8))
    p = rgb.convert("P")
    p.info["transparency"] = 3
    pils = [rgb, rgba, rgba.convert("LA"), rgb.convert("L"), p,
            PIL.Image.fromarray(rng.randint(0, 65536, HW).astype(np.uint16)), rgb.convert("CMYK")]
    return pils + [rng.randint(0, 256, HW + (c,), dtype=np.uint8) for c in (1, 3, 4)]


def test_every_image_mode_as_transformers_and_diffusers_convert_it(depth2img):
    """The depth estimator reads what transformers' DPTImageProcessor (do_convert_rgb) gives for every mode;
    the VAE reads what diffusers' VaeImageProcessor (do_convert_rgb) gives where it accepts the image (no
    transparency: diffusers drops alpha, we composite onto white as transformers does)."""
    from diffusers.image_processor import VaeImageProcessor
    from transformers import DPTImageProcessor

    from unclip_jax.image_processing_dpt import dpt_input

    _, pipe, _ = depth2img
    dpt_ref = DPTImageProcessor(**{**pipe.feature_extractor.to_dict(), "do_convert_rgb": True})
    vae_ref = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True)
    for image in _mode_images():
        what = getattr(image, "mode", None) or f"array {image.shape}"
        want = dpt_ref(image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(pipe.feature_extractor([dpt_input(image)]), want, atol=1e-5, err_msg=what)
        if isinstance(image, PIL.Image.Image) and "A" not in image.getbands() and "transparency" not in image.info:
            np.testing.assert_allclose(vae_pixels([image], pipe.vae_scale_factor),
                                       nchw_to_nhwc(vae_ref.preprocess(image)), atol=1e-6, err_msg=what)


def test_every_image_mode_runs(depth2img):
    """An RGBA image (refused by the depth estimator before) goes through depth estimation and the VAE."""
    _, pipe, params = depth2img
    inputs, _ = pipe.prepare("a cat", image=_mode_images()[1], params=params, key=jax.random.key(0),
                             num_inference_steps=2)
    assert inputs.image_latents.shape == (1, 16, 24, 4) and np.isfinite(np.asarray(inputs.depth_map)).all()


def test_pixel_budget_and_non_finite_inputs(depth2img):
    """Checked before any work (params are empty: a check that passes reaches the params check)."""
    _, pipe, _ = depth2img
    kw = dict(params={}, key=jax.random.key(0), num_inference_steps=3)
    big = PIL.Image.new("RGB", (1100, 1000))
    with pytest.raises(ValueError, match=r"image is 1100x1000 = 1,100,000 pixels, past the budget of 1,048,576"):
        pipe("x", image=big, **kw)
    with pytest.raises(ValueError, match=r"image\[1\] is 80x64 = 5,120 pixels, past the budget of 5,000"):
        pipe("x", image=[_image(0), _image(1, (64, 80))], max_pixels=5000, **kw)
    with pytest.raises(ValueError, match="params has no 'text_encoder'"):
        pipe("x", image=big, max_pixels=None, **kw)
    nan = np.float32("nan")
    with pytest.raises(ValueError, match="depth_map has non-finite values"):
        pipe("x", image=_image(0), depth_map=np.full((1, 8, 8), nan), **kw)
    lat = dict(image_latents=np.zeros((1, 16, 24, 4), np.float32), depth_map=np.ones((1, 8, 8), np.float32))
    for name in ("image_latents", "noise", "step_noise"):
        shape = {"image_latents": (1, 16, 24, 4), "noise": (1, 16, 24, 4), "step_noise": (2, 1, 16, 24, 4)}[name]
        with pytest.raises(ValueError, match=f"`{name}` has non-finite values"):
            pipe("x", **{**lat, name: np.full(shape, nan)}, strength=0.7, eta=0.5, **kw)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]; got 0"):
        pipe("x", image=_image(0), strength=0.0, **kw)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe("x", image=_image(0), guidance_scale=float("nan"), **kw)
    with pytest.raises(TypeError, match=r"key is an old-style uint32 key .*jax\.random\.key\(0\)"):
        pipe("x", image=_image(0), **dict(kw, key=jax.random.PRNGKey(0)))
