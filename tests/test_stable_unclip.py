"""StableUnCLIPPipeline and StableUnCLIPImg2ImgPipeline: end-to-end parity with diffusers on tiny
random-weight checkpoints, given the same explicit random inputs."""

from __future__ import annotations

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from torch_ref import feed_noise, nhwc_to_nchw

from unclip_jax.pipelines.stable_unclip import StableUnCLIPImg2ImgPipeline
from unclip_jax.tokenizer import tokenize

TOL = 2e-3  # max abs on images in [0, 1], fp32


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float32))


@pytest.fixture(scope="module")
def unclip(pipeline_pairs):
    return pipeline_pairs("unclip", "a")


CASES = {
    "cfg_noise0": dict(prompt="a cat", guidance_scale=7.0, prior_guidance_scale=4.0, noise_level=0),
    "nocfg_noise": dict(prompt=["a cat", "a dog on a hill"], guidance_scale=1.0, prior_guidance_scale=1.0,
                        noise_level=250),
    "negative_two_per_prompt": dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"],
                                    guidance_scale=5.0, prior_guidance_scale=3.0, noise_level=100,
                                    num_images_per_prompt=2),
    "clip_skip_eta": dict(prompt="a red car", guidance_scale=3.0, prior_guidance_scale=2.0, noise_level=10,
                          clip_skip=1, eta=0.7),
}


@pytest.mark.parametrize("shape, case", [("a", c) for c in CASES] + [("b", "negative_two_per_prompt"),
                                                                       ("b", "clip_skip_eta")])
def test_txt2img_parity(pipeline_pairs, shape, case):
    ref, pipe, params = pipeline_pairs("unclip", shape)
    kw = dict(CASES[case])
    prompts = [kw["prompt"]] if isinstance(kw["prompt"], str) else kw["prompt"]
    b = len(prompts) * kw.get("num_images_per_prompt", 1)
    steps, prior_steps, hw = 3, 4, 32
    rng = np.random.RandomState(len(case))
    d = pipe.prior.config.embedding_dim
    prior_latents = rng.randn(b, d).astype(np.float32)
    prior_noise = rng.randn(prior_steps, b, d).astype(np.float32)
    embed_noise = rng.randn(b, d).astype(np.float32)
    h = hw // pipe.vae_scale_factor
    latents = rng.randn(b, h, h, 4).astype(np.float32)
    step_noise = rng.randn(steps, b, h, h, 4).astype(np.float32)
    eta = kw.get("eta", 0.0)
    # diffusers draws: DDPM prior noise at every step but the last (t = 0), the image-embedding noise,
    # then DDIM variance noise per step when eta > 0.
    draws = [_t(n) for n in prior_noise[:-1]] + [_t(embed_noise)]
    draws += [nhwc_to_nchw(n) for n in step_noise] if eta > 0 else []
    with feed_noise(["diffusers.schedulers.scheduling_ddpm", "diffusers.schedulers.scheduling_unclip",
                     "diffusers.pipelines.stable_diffusion.pipeline_stable_unclip",
                     "diffusers.schedulers.scheduling_ddim"], draws):
        expected = ref(height=hw, width=hw, num_inference_steps=steps, prior_num_inference_steps=prior_steps,
                       prior_latents=_t(prior_latents), latents=nhwc_to_nchw(latents), output_type="np",
                       **kw).images
    out = pipe(params=params, key=jax.random.key(0), height=hw, width=hw, num_inference_steps=steps,
               prior_num_inference_steps=prior_steps, prior_latents=prior_latents, image_embeds_noise=embed_noise,
               latents=latents, prior_step_noise=prior_noise, step_noise=step_noise if eta > 0 else None,
               output_type="np", **kw).images
    assert out.shape == expected.shape == (b, hw, hw, 3)
    err = float(np.abs(out - expected).max())
    assert err <= TOL, f"max abs error {err:.3g}"


def test_txt2img_prompt_embeds_need_the_prompt_alone(unclip):
    """As in diffusers, text-to-image takes `prompt` (the prior reads it) and refuses `prompt_embeds` beside it."""
    ref, pipe, params = unclip
    ids, _ = tokenize(pipe.tokenizer, ["a cat"])
    embeds = pipe.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    common = dict(params=params, key=jax.random.key(3), height=32, width=32, num_inference_steps=2,
                  prior_num_inference_steps=2, output_type="np", guidance_scale=1.0)
    a = pipe("a cat", **common).images
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        pipe("a cat", prompt_embeds=embeds, **common)
    assert np.isfinite(a).all()


def test_same_key_same_images(unclip):
    _, pipe, params = unclip
    kw = dict(params=params, height=32, width=32, num_inference_steps=2, prior_num_inference_steps=2,
              output_type="np", noise_level=50)
    a = pipe("a cat", key=jax.random.key(1), **kw).images
    b = pipe("a cat", key=jax.random.key(1), **kw).images
    c = pipe("a cat", key=jax.random.key(2), **kw).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_output_types(unclip):
    _, pipe, params = unclip
    kw = dict(params=params, key=jax.random.key(0), height=32, width=32, num_inference_steps=2,
              prior_num_inference_steps=2)
    pil = pipe("a cat", **kw).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 32)
    lat = pipe("a cat", output_type="latent", **kw).images
    assert lat.shape == (1, 16, 16, 4)
    (arr,) = pipe("a cat", output_type="np", return_dict=False, **kw)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))


def test_errors_before_work(unclip):
    _, pipe, params = unclip
    kw = dict(params=params, key=jax.random.key(0), num_inference_steps=2, prior_num_inference_steps=2)
    with pytest.raises(ValueError, match="height must be a positive multiple of 2; got 31"):
        pipe("x", height=31, width=32, **kw)
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 999\]"):
        pipe("x", height=32, width=32, noise_level=1000, **kw)
    with pytest.raises(ValueError, match=r"`latents` has shape \(1, 4, 16, 16\); expected \(1, 16, 16, 4\)"):
        pipe("x", height=32, width=32, latents=np.zeros((1, 4, 16, 16)), **kw)
    with pytest.raises(ValueError, match="give `prompt` or `prompt_embeds`"):
        pipe(None, height=32, width=32, **kw)
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        pipe(5, height=32, width=32, **kw)
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", height=32, width=32, output_type="tensor", **kw)


# ---------------------------------------------------------------- img2img


@pytest.fixture(scope="module")
def img2img(pipeline_pairs):
    return pipeline_pairs("unclip_img2img", "a")


def _image(seed, hw=(40, 48), mode="RGB"):
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray(rng.randint(0, 256, hw + (3,), dtype=np.uint8)).convert(mode)


I2I_CASES = {
    "pil_cfg": dict(prompt="a cat", guidance_scale=6.0, noise_level=0),
    "pil_nocfg_noise": dict(prompt="", guidance_scale=1.0, noise_level=300),
    "two_per_prompt_negative": dict(prompt="a dog", negative_prompt="ugly", guidance_scale=4.0, noise_level=20,
                                    num_images_per_prompt=2),
}


@pytest.mark.parametrize("shape, case", [("a", c) for c in I2I_CASES] + [("b", "two_per_prompt_negative")])
def test_img2img_parity(pipeline_pairs, shape, case):
    ref, pipe, params = pipeline_pairs("unclip_img2img", shape)
    kw = dict(I2I_CASES[case])
    n = kw.get("num_images_per_prompt", 1)
    rng = np.random.RandomState(7)
    d = pipe.image_encoder.config.projection_dim
    h = 32 // pipe.vae_scale_factor
    embed_noise = rng.randn(1, d).astype(np.float32)
    latents = rng.randn(n, h, h, 4).astype(np.float32)
    image = _image(1)
    with feed_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_unclip_img2img"], [_t(embed_noise)]):
        expected = ref(image, height=32, width=32, num_inference_steps=3, latents=nhwc_to_nchw(latents),
                       output_type="np", **kw).images
    out = pipe(image, params=params, key=jax.random.key(0), height=32, width=32, num_inference_steps=3,
               latents=latents, image_embeds_noise=embed_noise, output_type="np", **kw).images
    err = float(np.abs(out - expected).max())
    assert err <= TOL, f"max abs error {err:.3g}"


def test_img2img_image_embeds_given(img2img):
    ref, pipe, params = img2img
    rng = np.random.RandomState(3)
    embeds = rng.randn(2, 32).astype(np.float32)
    noise = rng.randn(2, 32).astype(np.float32)
    latents = rng.randn(2, 16, 16, 4).astype(np.float32)
    kw = dict(prompt=["a", "b"], height=32, width=32, num_inference_steps=2, guidance_scale=3.0, noise_level=5,
              output_type="np")
    with feed_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_unclip_img2img"], [_t(noise)]):
        expected = ref(image_embeds=_t(embeds), latents=nhwc_to_nchw(latents), **kw).images
    out = pipe(image_embeds=embeds, params=params, key=jax.random.key(0), latents=latents,
               image_embeds_noise=noise, **kw).images
    assert float(np.abs(out - expected).max()) <= TOL


def test_img2img_image_modes_and_errors(img2img):
    _, pipe, params = img2img
    kw = dict(params=params, key=jax.random.key(0), height=32, width=32, num_inference_steps=2,
              guidance_scale=1.0, output_type="np")
    for mode in ("RGB", "RGBA", "L"):
        assert pipe(_image(2, mode=mode), **kw).images.shape == (1, 32, 32, 3)
    assert pipe(np.random.RandomState(0).rand(1, 50, 40, 3).astype(np.float32), **kw).images.shape == (1, 32, 32, 3)
    with pytest.raises(TypeError, match="expected a PIL image"):
        pipe("not an image", **kw)
    with pytest.raises(ValueError, match="exactly one of `image` and `image_embeds`"):
        pipe(None, **kw)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(np.full((1, 8, 8, 3), 3.0, np.float32), **kw)


def test_save_and_reload_gives_same_images(img2img, tmp_path):
    _, pipe, params = img2img
    pipe.save_pretrained(str(tmp_path / "saved"), params)
    pipe2, params2 = StableUnCLIPImg2ImgPipeline.from_pretrained(str(tmp_path / "saved"))
    kw = dict(key=jax.random.key(4), height=32, width=32, num_inference_steps=2, output_type="np", noise_level=3)
    np.testing.assert_array_equal(pipe(_image(5), params=params, **kw).images,
                                  pipe2(_image(5), params=params2, **kw).images)


def test_second_call_compiles_nothing_and_progress_bar(unclip, capsys):
    """Same static configuration: the compiled loops are reused (new key, new prompt text, new inputs)."""
    _, pipe, params = unclip
    kw = dict(params=params, height=32, width=32, num_inference_steps=3, prior_num_inference_steps=2,
              output_type="latent", guidance_scale=2.0, progress_bar=True)
    pipe("a cat", key=jax.random.key(0), **kw)
    sizes = pipe.compiled_cache_sizes()
    pipe("a dog in the rain", key=jax.random.key(1), **kw)
    assert pipe.compiled_cache_sizes() == sizes
    err = capsys.readouterr().err
    assert "prior:" in err and "/2" in err and "denoising:" in err and "/3" in err


def test_guidance_argument_types(unclip):
    _, pipe, params = unclip
    kw = dict(params=params, key=jax.random.key(0), height=32, width=32)
    with pytest.raises(TypeError, match="guidance_scale must be a number; got str"):
        pipe("x", guidance_scale="7", **kw)
    with pytest.raises(TypeError, match="prior_guidance_scale must be a number; got NoneType"):
        pipe("x", prior_guidance_scale=None, **kw)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1; got 0"):
        pipe("x", num_inference_steps=0, **kw)


def test_img2img_prompt_embeds_given(img2img):
    """Given prompt and negative prompt embeddings (clip_skip applied by us when encoding them) match
    diffusers fed the same embeddings."""
    ref, pipe, params = img2img
    ids, _ = tokenize(pipe.tokenizer, ["a cat", "a dog"])
    nids, _ = tokenize(pipe.tokenizer, ["", "blurry"])
    enc = pipe.text_encoder.apply
    pe = np.asarray(enc({"params": params["text_encoder"]}, ids, clip_skip=1).last_hidden_state)
    npe = np.asarray(enc({"params": params["text_encoder"]}, nids).last_hidden_state)
    rng = np.random.RandomState(11)
    embeds, noise = rng.randn(2, 32).astype(np.float32), rng.randn(2, 32).astype(np.float32)
    latents = rng.randn(2, 16, 16, 4).astype(np.float32)
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=4.0, noise_level=7, output_type="np")
    with feed_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_unclip_img2img"], [_t(noise)]):
        expected = ref(image_embeds=_t(embeds), prompt_embeds=_t(pe), negative_prompt_embeds=_t(npe),
                       latents=nhwc_to_nchw(latents), **kw).images
    out = pipe(image_embeds=embeds, prompt_embeds=pe, negative_prompt_embeds=npe, params=params,
               key=jax.random.key(0), latents=latents, image_embeds_noise=noise, **kw).images
    assert float(np.abs(out - expected).max()) <= TOL


def test_callback_sees_every_step(unclip):
    _, pipe, params = unclip
    seen = []
    pipe("a cat", params=params, key=jax.random.key(0), height=32, width=32, num_inference_steps=4,
         prior_num_inference_steps=3, output_type="latent", callback=lambda i, t, x: seen.append((i, t, x.shape)),
         callback_steps=2)
    # Prior steps 0 and 2 (of 3) on [1, 32] embeddings, then decoder steps 0 and 2 (of 4) on latents.
    assert [(i, s) for i, _, s in seen] == [(0, (1, 32)), (2, (1, 32)), (0, (1, 16, 16, 4)), (2, (1, 16, 16, 4))]
    assert seen[0][1] > seen[1][1] and seen[2][1] > seen[3][1]  # timesteps count down


# ---------------------------------------------------------------- bad inputs refused before work (issue 15)


def test_image_modes_match_transformers(img2img):
    """Every PIL mode and 1/3/4-channel arrays: the CLIP pixels equal transformers' CLIPImageProcessor's
    (its convert_rgb), and the pipeline takes them."""
    from transformers import CLIPImageProcessor

    _, pipe, params = img2img
    ref = CLIPImageProcessor(**pipe.feature_extractor.to_dict())
    rng = np.random.RandomState(5)
    rgb = _image(9)
    p = rgb.convert("P")
    p.info["transparency"] = 0
    images = [rgb.convert(m) for m in ("RGB", "RGBA", "LA", "L", "P", "CMYK")] + [p]
    images.append(PIL.Image.fromarray(rng.randint(0, 65536, (40, 48)).astype(np.uint16)))  # I;16
    images += [rng.randint(0, 256, (40, 48, c), dtype=np.uint8) for c in (1, 3, 4)]
    for image in images:
        want = ref(image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        got = pipe.feature_extractor(image)
        what = getattr(image, "mode", None) or f"array {image.shape}"
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=what)
    inputs, _ = pipe.prepare(images[1], params=params, key=jax.random.key(0), height=32, width=32,
                             num_inference_steps=2)
    assert inputs.image_embeds.shape == (1, 32)


def test_img2img_image_embeds_width(img2img):
    _, pipe, params = img2img
    with pytest.raises(ValueError, match=r"`image_embeds` must be \[B, 32\] .*got shape \(1, 31\)"):
        pipe.prepare(image_embeds=np.zeros((1, 31), np.float32), params=params, key=jax.random.key(0))


def test_non_finite_inputs_refused(unclip, img2img):
    _, pipe, params = unclip
    kw = dict(params=params, key=jax.random.key(0), height=32, width=32, num_inference_steps=2,
              prior_num_inference_steps=2)
    nan = np.float32("nan")
    bad = {
        "latents": np.full((1, 16, 16, 4), nan),
        "prior_latents": np.full((1, 32), np.inf, np.float32),
        "image_embeds_noise": np.full((1, 32), nan),
        "step_noise": np.full((2, 1, 16, 16, 4), nan),
        "prior_step_noise": np.full((2, 1, 32), nan),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"`{name}` has non-finite values"):
            pipe.prepare("x", **{name: value}, **kw)
    for name in ("guidance_scale", "prior_guidance_scale"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                pipe("x", **{name: value}, **kw)
    _, pipe2, params2 = img2img
    with pytest.raises(ValueError, match="`image_embeds` has non-finite values"):
        pipe2.prepare(image_embeds=np.full((1, 32), nan), params=params2, key=jax.random.key(0))
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        embeds = {"prompt_embeds": np.zeros((1, 77, 32), np.float32), name: np.full((1, 77, 32), nan)}
        with pytest.raises(ValueError, match=f"`{name}` has non-finite values"):
            pipe2.prepare(image_embeds=np.zeros((1, 32), np.float32), params=params2, key=jax.random.key(0),
                          **embeds)


def test_keys_params_and_components_checked_first(unclip):
    _, pipe, params = unclip
    kw = dict(params=params, height=32, width=32, num_inference_steps=2, prior_num_inference_steps=2)
    for key in (0, "seed", jax.random.PRNGKey(0)):
        with pytest.raises(TypeError, match=r"key .*jax\.random\.key\(0\)"):
            pipe("x", key=key, **kw)
    kw["key"] = jax.random.key(0)
    unet = dict(params["unet"])
    del unet["conv_in"]
    with pytest.raises(ValueError, match=r"params\['unet'\]: .*\n  missing from the params \(2\): conv_in/bias, conv_in/kernel"):
        pipe("x", **dict(kw, params={**params, "unet": unet}))
    unet = {**params["unet"], "conv_out": {**params["unet"]["conv_out"], "bias": np.zeros(5, np.float32)}}
    with pytest.raises(ValueError, match=r"wrong shape \(1\): conv_out/bias \(5,\), expected \(4,\)"):
        pipe("x", **dict(kw, params={**params, "unet": unet}))
    with pytest.raises(ValueError, match="params has no 'vae' entry"):
        pipe("x", **dict(kw, params={k: v for k, v in params.items() if k != "vae"}))
    broken = type(pipe)(**{**{n: getattr(pipe, n) for n in pipe.COMPONENTS}, "vae": None})
    with pytest.raises(ValueError, match=r"has no vae \(None\)"):
        broken("x", **kw)


def test_non_finite_result_warns_naming_the_stage(img2img):
    """A NaN made during sampling (here by a NaN weight) is reported with the stage that made it."""
    _, pipe, params = img2img
    embeds = np.random.RandomState(0).randn(1, 32).astype(np.float32)
    kw = dict(image_embeds=embeds, key=jax.random.key(0), height=32, width=32, num_inference_steps=2,
              guidance_scale=1.0, output_type="np")
    kernel = params["unet"]["conv_out"]["kernel"]
    unet = {**params["unet"], "conv_out": {**params["unet"]["conv_out"], "kernel": kernel * np.float32("nan")}}
    with pytest.warns(RuntimeWarning, match=r"the decoder \(UNet loop\) produced non-finite values"):
        pipe(params={**params, "unet": unet}, **kw)
    kernel = params["vae"]["decoder"]["conv_out"]["kernel"]
    decoder = {**params["vae"]["decoder"], "conv_out": {**params["vae"]["decoder"]["conv_out"], "kernel": kernel * np.inf}}
    with pytest.warns(RuntimeWarning, match="the VAE decoder produced non-finite values"):
        pipe(params={**params, "vae": {**params["vae"], "decoder": decoder}}, **kw)
