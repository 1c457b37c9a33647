"""CLIP text and vision encoders: parity with transformers on random weights, loading, bf16."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from conftest import real_config
from torch_ref import assert_close, nhwc_to_nchw, randomize_, to_numpy

from unclip_jax.image_processing import CLIPImageProcessor
from unclip_jax.models import clip
from unclip_jax.tokenizer import load_tokenizer, tokenize
from unclip_jax.weights.components import load_component
from unclip_jax.weights.convert import abstract_params, plan

TOL = 1e-4  # fp32, relative to the output's scale

# Three text shapes: OpenCLIP-like (gelu, old eos id 2 -> argmax pooling), OpenAI-like with projection
# (quick_gelu, real eos id), and a deeper one with odd head size.
TEXT_CONFIGS = {
    "openclip_gelu": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                          hidden_act="gelu", eos_token_id=2, projection_dim=16, arch="CLIPTextModel"),
    "openai_proj": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                        hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=49407,
                        projection_dim=24, arch="CLIPTextModelWithProjection"),
    "deep_proj": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=5, num_attention_heads=5,
                      hidden_act="gelu", eos_token_id=2, projection_dim=20, arch="CLIPTextModelWithProjection"),
}
VISION_CONFIGS = {
    "p8_i32": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, projection_dim=16, hidden_act="gelu"),
    "p6_i30": dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                   image_size=30, patch_size=6, projection_dim=12, hidden_act="quick_gelu"),
    "p16_i48": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
                    image_size=48, patch_size=16, projection_dim=32, hidden_act="gelu"),
}
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on the moon, highly detailed, 4k", ""]


def _save(model, path):
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=list(TEXT_CONFIGS))
def text_pair(request, fixture_dir):
    """(torch model, folder, our module, our params) for one tiny text config."""
    kw = dict(TEXT_CONFIGS[request.param])
    arch = kw.pop("arch")
    cfg = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kw)
    cls = getattr(transformers, arch)
    ref = randomize_(cls(cfg), seed=hash(request.param) % 1000)
    folder = _save(ref, fixture_dir / f"clip_text_{request.param}")
    module, params = load_component(str(folder))
    return ref, folder, module, params


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dirs):
    return load_tokenizer(str(clip_tokenizer_dirs["sd2"]))


def _ref_text(ref, ids, mask, clip_skip):
    """transformers' outputs (hidden states, pooled, projected) and diffusers' clip_skip prompt embeds."""
    ids_t = torch.from_numpy(ids).long()
    mask_t = None if mask is None else torch.from_numpy(mask).long()
    tower = getattr(ref, "text_model", ref)  # transformers v5 flattened the bare CLIPTextModel
    with torch.no_grad():
        out = tower(ids_t, attention_mask=mask_t, output_hidden_states=True)
        embeds = ref(ids_t, attention_mask=mask_t).text_embeds if hasattr(ref, "text_projection") else None
        if clip_skip is None:
            last = out.last_hidden_state
        else:  # what diffusers' encode_prompt does with clip_skip
            last = tower.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
    return out, embeds, to_numpy(last)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_text_parity(text_pair, tokenizer, use_mask, clip_skip):
    ref, _, module, params = text_pair
    ids, mask = tokenize(tokenizer, PROMPTS)
    mask = mask if use_mask else None
    out = jax.jit(module.apply, static_argnames=("output_hidden_states", "clip_skip"))(
        {"params": params}, ids, mask, output_hidden_states=True, clip_skip=clip_skip)
    ref_out, ref_embeds, ref_last = _ref_text(ref, ids, mask, clip_skip)
    assert_close(out.last_hidden_state, ref_last, TOL, "last_hidden_state")
    if clip_skip is None:
        assert_close(out.pooler_output, to_numpy(ref_out.pooler_output), TOL, "pooler_output")
        if module.with_projection:
            assert_close(out.embeds, to_numpy(ref_embeds), TOL, "text_embeds")
        assert len(out.hidden_states) == len(ref_out.hidden_states)
        for i, (a, b) in enumerate(zip(out.hidden_states, ref_out.hidden_states)):
            assert_close(a, to_numpy(b), TOL, f"hidden_states[{i}]")


def test_text_eos_pooling_differs_by_config(text_pair, tokenizer):
    """Pooling picks the EOS position even when padding tokens follow it (pad '!' = id 0 in SD 2.x)."""
    ref, _, module, params = text_pair
    ids, _ = tokenize(tokenizer, ["x y z"])
    out = module.apply({"params": params}, ids)
    ref_out, _, _ = _ref_text(ref, ids, None, None)
    assert_close(out.pooler_output, to_numpy(ref_out.pooler_output), TOL, "pooler_output")
    np.testing.assert_allclose(out.pooler_output, out.last_hidden_state[:, 4], rtol=0, atol=0)


def test_text_bf16_compute(text_pair, tokenizer):
    """bf16 activations with fp32 params stay within 5% of the output scale."""
    ref, folder, _, params = text_pair
    module_bf16, _ = load_component(str(folder), dtype=jnp.bfloat16)
    ids, _ = tokenize(tokenizer, PROMPTS)
    out = module_bf16.apply({"params": params}, ids)
    _, _, ref_last = _ref_text(ref, ids, None, None)
    assert jax.tree.leaves(params)[0].dtype == np.float32
    assert_close(out.last_hidden_state, ref_last, 5e-2, "bf16 last_hidden_state")


def test_text_too_long():
    c = clip.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=8, vocab_size=100)
    m = clip.CLIPTextModel(c)
    with pytest.raises(ValueError, match="at most 8"):
        m.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match=r"clip_skip=2 is outside \[0, 1\]"):
        m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), clip_skip=2)


# ---------------------------------------------------------------- vision


def _images(size_hw=(41, 57)):
    rng = np.random.RandomState(0)
    h, w = size_hw
    rgb = PIL.Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    rgba = PIL.Image.fromarray(rng.randint(0, 256, (w, h, 4), dtype=np.uint8), "RGBA")
    gray = PIL.Image.fromarray(rng.randint(0, 256, (h + 7, h + 7), dtype=np.uint8), "L")
    return [rgb, rgba, gray]


@pytest.fixture(scope="module", params=list(VISION_CONFIGS))
def vision_pair(request, fixture_dir):
    kw = VISION_CONFIGS[request.param]
    cfg = transformers.CLIPVisionConfig(**kw)
    ref = randomize_(transformers.CLIPVisionModelWithProjection(cfg), seed=7)
    folder = _save(ref, fixture_dir / f"clip_vision_{request.param}")
    module, params = load_component(str(folder))
    return ref, folder, module, params


def _ref_processor(image_size, **kw):
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}, **kw)


def test_vision_parity(vision_pair):
    ref, _, module, params = vision_pair
    size = ref.config.image_size
    images = _images()
    ours = CLIPImageProcessor(size=size, crop_size=(size, size))(images)
    theirs = np.stack(_ref_processor(size)(images)["pixel_values"])
    np.testing.assert_allclose(ours, np.moveaxis(theirs, 1, -1), rtol=0, atol=1e-6)
    out = jax.jit(module.apply, static_argnames="output_hidden_states")({"params": params}, ours,
                                                                         output_hidden_states=True)
    with torch.no_grad():
        r = ref(nhwc_to_nchw(ours), output_hidden_states=True)
    assert_close(out.embeds, to_numpy(r.image_embeds), TOL, "image_embeds")
    assert_close(out.last_hidden_state, to_numpy(r.last_hidden_state), TOL, "last_hidden_state")
    for i, (a, b) in enumerate(zip(out.hidden_states, r.hidden_states)):
        assert_close(a, to_numpy(b), TOL, f"hidden_states[{i}]")


def test_vision_wrong_size(vision_pair):
    _, _, module, params = vision_pair
    with pytest.raises(ValueError, match="vision encoder takes"):
        module.apply({"params": params}, jnp.zeros((1, 17, 17, 3)))


# ------------------------------------------------------------- processor


@pytest.mark.parametrize("hw", [(41, 57), (90, 33), (224, 224), (300, 200), (12, 20)])
def test_processor_pil_modes_and_sizes(hw):
    cfg = real_config("clip_preprocessor_unclip.json")
    ours = CLIPImageProcessor.from_dict(cfg)
    theirs = transformers.CLIPImageProcessorPil(**{k: v for k, v in cfg.items() if not k.endswith("_type")})
    rng = np.random.RandomState(hw[0])
    pal = PIL.Image.fromarray(rng.randint(0, 256, hw, dtype=np.uint8), "L").convert("P")
    pal.info["transparency"] = 3
    images = _images(hw) + [pal]
    expected = np.moveaxis(np.stack(theirs(images)["pixel_values"]), 1, -1)
    np.testing.assert_allclose(ours(images), expected, rtol=0, atol=1e-6)


def test_processor_arrays():
    cfg = real_config("clip_preprocessor_unclip.json")
    ours = CLIPImageProcessor.from_dict(cfg)
    kw = {k: v for k, v in cfg.items() if not k.endswith("_type")}
    rng = np.random.RandomState(1)
    u8 = rng.randint(0, 256, (2, 250, 310, 3), dtype=np.uint8)
    theirs = transformers.CLIPImageProcessorPil(**kw)
    expected = np.moveaxis(np.stack(theirs(list(u8), input_data_format="channels_last")["pixel_values"]), 1, -1)
    np.testing.assert_allclose(ours(u8), expected, rtol=0, atol=1e-6)
    # float images in [0, 1] are already rescaled: transformers must be told so (do_rescale=False).
    f = rng.uniform(0, 1, (2, 230, 260, 3)).astype(np.float32)
    theirs = transformers.CLIPImageProcessorPil(**dict(kw, do_rescale=False))
    expected = np.moveaxis(np.stack(theirs(list(f), input_data_format="channels_last")["pixel_values"]), 1, -1)
    np.testing.assert_allclose(ours(f), expected, rtol=0, atol=1e-5)
    # RGBA arrays composite onto white like RGBA PIL images.
    rgba = rng.randint(0, 256, (60, 70, 4), dtype=np.uint8)
    np.testing.assert_allclose(ours(rgba), ours(PIL.Image.fromarray(rgba, "RGBA")), rtol=0, atol=1e-6)


def test_processor_bad_inputs():
    p = CLIPImageProcessor()
    with pytest.raises(TypeError, match="expected a PIL image"):
        p("not an image")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p(np.full((10, 10, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="channels-last"):
        p(np.zeros((3, 10, 10), np.float32))


# ------------------------------------------------------ real-size coverage

REAL = {
    "clip_text_sd2_openclip_h.json": (transformers.CLIPTextConfig, "CLIPTextModel"),
    "clip_text_karlo_vit_l_proj.json": (transformers.CLIPTextConfig, "CLIPTextModelWithProjection"),
    "clip_vision_unclip_vit_h_proj.json": (transformers.CLIPVisionConfig, "CLIPVisionModelWithProjection"),
    "clip_vision_unclip_small_vit_l_proj.json": (transformers.CLIPVisionConfig, "CLIPVisionModelWithProjection"),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_state_dict_maps(name):
    """Every tensor of a real-size checkpoint (shapes only: meta device, eval_shape) maps exactly."""
    from unclip_jax.weights.components import build

    config = real_config(name)
    cfg_cls, arch = REAL[name]
    assert config["architectures"] == [arch]
    with torch.device("meta"):
        ref = getattr(transformers, arch)(cfg_cls(**config))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    tower = "text_model" if "text" in name else "vision_model"
    # Exports before transformers v5 (the hub's SD 2.x files) prefix every key with the tower name and
    # carry the position_ids buffer: both layouts must map.
    old = {(k if k.startswith(("text_", "vision_", "visual_")) else f"{tower}.{k}"): s for k, s in shapes.items()}
    old[f"{tower}.embeddings.position_ids"] = (1, 77)
    built = build(config)
    abstract = abstract_params(built.module, *built.dummy_inputs)
    for layout in (shapes, old):
        steps = plan(layout, abstract, built.rules, name)
        assert len(steps) == len(shapes) == len(jax.tree.leaves(abstract))
    n_params = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith("position_ids"))
    expected = {"clip_text_sd2_openclip_h.json": 340_387_840, "clip_text_karlo_vit_l_proj.json": 123_650_304,
                "clip_vision_unclip_vit_h_proj.json": 632_076_800,
                "clip_vision_unclip_small_vit_l_proj.json": 303_966_208}[name]
    assert n_params == expected


# -------------------------------------------- encoders inside pipeline folders


@pytest.mark.parametrize("component", ["text_encoder", "prior_text_encoder"])
def test_text_encoders_of_unclip_pipeline_folder(unclip_pipeline_dir, component):
    """The encoders of a diffusers pipeline folder (real layout) load and match transformers."""
    folder = unclip_pipeline_dir / component
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    ref = getattr(transformers, arch).from_pretrained(str(folder)).eval()
    module, params = load_component(str(folder))
    tok_dir = unclip_pipeline_dir / ("prior_tokenizer" if component.startswith("prior") else "tokenizer")
    ids, _ = tokenize(load_tokenizer(str(tok_dir)), PROMPTS)
    out = module.apply({"params": params}, ids)
    ref_out, ref_embeds, ref_last = _ref_text(ref, ids, None, None)
    assert_close(out.last_hidden_state, ref_last, TOL, f"{arch} last_hidden_state")
    if module.with_projection:
        assert_close(out.embeds, to_numpy(ref_embeds), TOL, f"{arch} text_embeds")


def test_image_encoder_of_img2img_pipeline_folder(unclip_img2img_pipeline_dir):
    folder = unclip_img2img_pipeline_dir
    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder")).eval()
    theirs = transformers.CLIPImageProcessorPil.from_pretrained(str(folder / "feature_extractor"))
    ours = CLIPImageProcessor.from_pretrained(str(folder / "feature_extractor"))
    module, params = load_component(str(folder / "image_encoder"))
    images = _images((70, 50))
    pixels = ours(images)
    np.testing.assert_allclose(pixels, np.moveaxis(np.stack(theirs(images)["pixel_values"]), 1, -1), atol=1e-6)
    with torch.no_grad():
        expected = to_numpy(ref(nhwc_to_nchw(pixels)).image_embeds)
    assert_close(module.apply({"params": params}, pixels).embeds, expected, TOL, "image_embeds")


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_layer_norm_two_pass_statistics_settle_clip_parity(fixture_dir, tokenizer, offset, monkeypatch):
    """CLIP uses the models' one LayerNorm helper (two-pass float32 variance). With token embeddings
    shifted so the residual stream's mean is large against its spread, the one-pass form (flax's
    `use_fast_variance`) loses digits that PyTorch keeps; the two-pass form stays within TOL. Measured
    (relative to the output's scale): offset 30: two-pass 1.6e-5, one-pass 9.7e-4; offset 0: both 6e-7."""
    import flax.linen as nn

    from unclip_jax.models import layers

    cfg = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=32,
                                      intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      hidden_act="gelu", eos_token_id=2)
    ref = randomize_(transformers.CLIPTextModel(cfg), seed=11)
    tower = getattr(ref, "text_model", ref)  # transformers v5 flattened the bare CLIPTextModel
    with torch.no_grad():
        tower.embeddings.token_embedding.weight += offset
    folder = _save(ref, fixture_dir / f"clip_text_offset_{int(offset)}")
    ids, _ = tokenize(tokenizer, PROMPTS)
    with torch.no_grad():
        expected = to_numpy(tower(torch.from_numpy(ids).long()).last_hidden_state)

    def error():
        module, params = load_component(str(folder))
        got = np.asarray(module.apply({"params": params}, ids).last_hidden_state, np.float64)
        return float(np.abs(got - expected).max()) / max(float(np.abs(expected).max()), 1e-6)

    two_pass = error()
    assert two_pass <= TOL, two_pass
    monkeypatch.setattr(clip, "layer_norm", lambda eps, name: nn.LayerNorm(epsilon=eps, dtype=jnp.float32,
                                                                             use_fast_variance=True, name=name))
    one_pass = error()
    assert two_pass <= one_pass, (two_pass, one_pass)
    if offset:
        assert one_pass > TOL, one_pass  # what the choice is about
    assert layers.layer_norm(1e-5, "n").use_fast_variance is False
