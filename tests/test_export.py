"""Export to diffusers: params -> PyTorch-named safetensors through the conversion tables run backwards.

What is measured: the derived PyTorch names of every fixture component are exactly the names diffusers /
transformers saved (both shapes) and the exported tensors equal the originals bit for bit; an exported
pipeline (params perturbed first, so nothing is just copied through) loads in diffusers with no missing
or unexpected keys and makes our images (max abs <= 2e-3, fp32, 2 steps); fp16 and bf16 variants load too;
the command writes atomically.
"""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import PIL.Image
import pytest
import torch
from torch_ref import feed_noise, nhwc_to_nchw

from unclip_jax.weights import components as registry
from unclip_jax.weights.checkpoint import load_state_dict, read_config
from unclip_jax.weights.convert import ConversionError, abstract_params
from unclip_jax.weights.export import to_state_dict, torch_layout

TOL = 2e-3  # max abs on images in [0, 1], fp32
KINDS = {"unclip": "StableUnCLIPPipeline", "unclip_img2img": "StableUnCLIPImg2ImgPipeline",
         "depth2img": "StableDiffusionDepth2ImgPipeline"}


def _models(folder):
    """(component name, sub-folder) of every model component of a pipeline folder."""
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    return [(n, os.path.join(folder, n)) for n, v in index.items()
            if not n.startswith("_") and v[1] in registry.ARCHITECTURES]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", ["a", "b"])
def test_derived_names_are_the_saved_names(pipeline_pairs, pipeline_dirs, kind, shape):
    _, _, params = pipeline_pairs(kind, shape)
    for name, sub in _models(pipeline_dirs(kind, shape)):
        saved = load_state_dict(sub)
        built = registry.build(read_config(sub))
        state = to_state_dict(params[name], abstract_params(built.module, *built.dummy_inputs), built.rules, name)
        # transformers v5 saves CLIPTextModel without the `text_model.` prefix that every hub checkpoint
        # (and our export) has; v5 reads both.
        flat = read_config(sub).get("architectures") == ["CLIPTextModel"]
        expected = {("text_model." + k if flat else k) for k in saved}
        assert set(state) == expected, (name, sorted(set(state) ^ expected)[:8])
        for key in saved:
            got = state["text_model." + key if flat else key]
            if "residual_layer1" in key or key.startswith("dpt.layernorm"):
                assert got.shape == saved[key].shape  # never read: written as a same-shaped twin
            else:
                np.testing.assert_array_equal(got, saved[key], err_msg=f"{name}: {key}")


def test_names_that_do_not_map_back_are_an_error():
    from unclip_jax.weights.convert import Rules

    abstract = {"down_blocks_0": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32)}}
    # A table whose rename sends the derived name elsewhere cannot run backwards: named, not guessed.
    with pytest.raises(ConversionError, match="down_blocks.0.weight"):
        torch_layout(abstract, Rules(renames=((r"^down_blocks\.", "up_blocks."),)), "toy")


def _perturbed(params, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: np.asarray(x) * (1 + 0.1 * rng.uniform(-1, 1, np.shape(x))).astype(np.float32),
                        params)


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float32))


def _image(seed, hw=(32, 32)):
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, hw + (3,), dtype=np.uint8))


def run_both(kind, ref, pipe, params, seed=0):
    """Our images and diffusers' for the same draws: 2 steps, guidance on, 32 x 32."""
    rng = np.random.RandomState(seed)
    f = pipe.vae_scale_factor
    latents = rng.randn(1, 32 // f, 32 // f, 4).astype(np.float32)
    common = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
    if kind == "unclip":
        d = pipe.prior.config.embedding_dim
        prior_latents, prior_noise, embed_noise = (rng.randn(*s).astype(np.float32) for s in
                                                   ((1, d), (2, 1, d), (1, d)))
        with feed_noise(["diffusers.schedulers.scheduling_ddpm", "diffusers.schedulers.scheduling_unclip",
                         "diffusers.pipelines.stable_diffusion.pipeline_stable_unclip"],
                        [_t(prior_noise[0]), _t(embed_noise)]):
            theirs = ref("a cat", height=32, width=32, prior_num_inference_steps=2, noise_level=100,
                         prior_latents=_t(prior_latents), latents=nhwc_to_nchw(latents), **common).images
        ours = pipe("a cat", params=params, key=jax.random.key(0), height=32, width=32, prior_num_inference_steps=2,
                    noise_level=100, prior_latents=prior_latents, prior_step_noise=prior_noise,
                    image_embeds_noise=embed_noise, latents=latents, **common).images
    elif kind == "unclip_img2img":
        embed_noise = rng.randn(1, pipe.image_encoder.config.projection_dim).astype(np.float32)
        with feed_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_unclip_img2img"], [_t(embed_noise)]):
            theirs = ref(_image(1), prompt="a cat", height=32, width=32, noise_level=100,
                         latents=nhwc_to_nchw(latents), **common).images
        ours = pipe(_image(1), prompt="a cat", params=params, key=jax.random.key(0), height=32, width=32,
                    noise_level=100, latents=latents, image_embeds_noise=embed_noise, **common).images
    else:
        from test_depth2img import run_both as depth_run_both

        ours, theirs, _, _ = depth_run_both(ref, pipe, params, prompt="a cat", image=_image(1, (32, 48)), steps=2,
                                            strength=1.0, seed=seed, guidance_scale=5.0)
    return np.asarray(ours), np.asarray(theirs)


def _loading_problems(folder, **kw):
    """Each model component loaded by its own library: {component: non-empty loading-info lists}."""
    import diffusers
    import transformers
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    classes = {"StableUnCLIPImageNormalizer": StableUnCLIPImageNormalizer}
    problems = {}
    for name, sub in _models(folder):
        config = read_config(sub)
        cls_name = config.get("_class_name") or config["architectures"][0]
        cls = classes.get(cls_name) or getattr(diffusers, cls_name, None) or getattr(transformers, cls_name)
        _, info = cls.from_pretrained(sub, output_loading_info=True, **kw)
        bad = {k: sorted(v) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                     "mismatched_keys")}
        if bad:
            problems[name] = bad
    return problems


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_pipeline_loads_in_diffusers_and_makes_our_images(pipeline_pairs, kind, tmp_path):
    import diffusers

    _, pipe, params = pipeline_pairs(kind, "a")
    params = _perturbed(params)
    out = tmp_path / "exported"
    pipe.save_pretrained(str(out), params, format="diffusers")
    assert _loading_problems(str(out)) == {}
    ref = getattr(diffusers, KINDS[kind]).from_pretrained(str(out))
    ref.set_progress_bar_config(disable=True)
    object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)  # as conftest does, for clip_skip
    ours, theirs = run_both(kind, ref, pipe, params)
    err = float(np.abs(ours - theirs).max())
    print(f"export {kind}: max abs error {err:.3g}")
    assert err <= TOL, f"{kind}: max abs error {err:.3g}"


@pytest.mark.parametrize("dtype, torch_dtype, np_dtype", [("fp16", torch.float16, np.float16),
                                                          ("bf16", torch.bfloat16, ml_dtypes.bfloat16)])
def test_half_precision_variants_load_in_diffusers(pipeline_pairs, tmp_path, dtype, torch_dtype, np_dtype):
    import diffusers

    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    out = tmp_path / dtype
    pipe.save_pretrained(str(out), params, format="diffusers", dtype=dtype, variant=dtype)
    assert os.path.isfile(out / "unet" / f"diffusion_pytorch_model.{dtype}.safetensors")
    assert os.path.isfile(out / "image_encoder" / f"model.{dtype}.safetensors")
    assert _loading_problems(str(out), variant=dtype, dtype=torch_dtype) == {}
    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(str(out), variant=dtype, dtype=torch_dtype)
    assert ref.unet.dtype == torch_dtype
    got = ref.unet.conv_in.weight.detach().float().numpy()
    want = np.asarray(params["unet"]["conv_in"]["kernel"]).astype(np_dtype).astype(np.float32).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(got, want)


def test_command_writes_atomically(pipeline_dirs, tmp_path, capsys):
    from unclip_jax.cli import export as command
    from unclip_jax.cli import main
    from unclip_jax.weights.convert import DTYPES

    assert set(command.DTYPES) == set(DTYPES)
    src = str(pipeline_dirs("depth2img", "b"))
    out = tmp_path / "exported"
    assert main(["export", src, str(out), "--dtype", "fp16", "--variant", "--quiet"]) == 0
    assert sorted(os.listdir(out / "unet")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert _loading_problems(str(out), variant="fp16", dtype=torch.float16) == {}
    # An existing OUT is refused whole (nothing touched); a bad source is one line naming it.
    assert main(["export", src, str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no partial folders left behind
