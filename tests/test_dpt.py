"""DPTForDepthEstimation (ViT and BiT-hybrid), its conversion and DPT preprocessing against transformers.

Parity runs on tiny random-weight configs (`randomize_`), batch 2, with the reference model built once
per case. The cases cover both backbones, every readout type, factors 4/2/1/0.5, BiT's static and
dynamic ("SAME") padding, batch norm in the fusion units (running statistics converted), the head
projection, an inner `head_in_index`, position embeddings resized up and down, and odd token grids
(the fusion stage then resizes the residual). Real-size configs are checked through shapes only.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import DPTConfig as TorchDPTConfig
from transformers import DPTForDepthEstimation as TorchDPT
from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

from torch_ref import assert_close, nhwc_to_nchw, randomize_, to_numpy
from unclip_jax.image_processing_dpt import DPTImageProcessor
from unclip_jax.models.config import UnsupportedConfigError
from unclip_jax.models.dpt import DPTConfig, DPTForDepthEstimation, dummy_inputs
from unclip_jax.weights.convert import abstract_params, convert, plan
from unclip_jax.weights.tables import DPT

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")

FP32_REL = 1e-4
# bf16 activations and matmuls (norm statistics, softmax and weight standardisation in float32) through
# random-weight networks: measured max errors 3.2e-2 (hybrid) and 2.5e-2 (ViT) of the output scale,
# mean errors 3e-4 and 4e-3.
BF16_REL = 8e-2
BF16_MEAN_REL = 1e-2

_BIT = dict(
    global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64], embedding_size=8,
    num_groups=4, embedding_dynamic_padding=True, out_features=["stage1", "stage2", "stage3"],
)

# name -> (transformers DPTConfig kwargs, input (H, W))
CASES = {
    # The SD 2 depth estimator's architecture in miniature: BiT with TF-"SAME" padding, factors 1/1/1/0.5.
    "hybrid_same": (dict(
        is_hybrid=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=64, patch_size=16, backbone_out_indices=[2, 5, 0, 1], neck_hidden_sizes=[16, 32, 24, 24],
        reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16, backbone_featmap_shape=[1, 64, 4, 4],
        backbone_config=_BIT,
    ), (64, 64)),
    # Static padding, a padded stem pool, two layers in stage 1, a hidden_sizes list longer than depths,
    # batch norm in the fusion units, a 5 x 5 token grid (odd: residuals get resized), factor 2.
    "hybrid_static_bn": (dict(
        is_hybrid=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        image_size=80, patch_size=16, backbone_out_indices=[0, 0, 1, 0], neck_hidden_sizes=[16, 32, 24, 16],
        reassemble_factors=[1, 1, 2, 0.5], fusion_hidden_size=16, backbone_featmap_shape=[1, 64, 5, 5],
        use_batch_norm_in_fusion_residual=True,
        backbone_config=dict(_BIT, global_padding=None, embedding_dynamic_padding=False, depths=[2, 1, 1],
                             hidden_sizes=[16, 32, 64, 128]),
    ), (80, 80)),
    # dpt-large's factors 4/2/1/0.5 with the "add" readout, no qkv bias, batch norm + bias, out-of-order
    # indices, position embeddings resized 4 -> 5 (odd grid), head on the second-finest map.
    "vit_add_bn": (dict(
        hidden_size=24, num_hidden_layers=4, num_attention_heads=3, intermediate_size=40, image_size=32, patch_size=8,
        backbone_out_indices=[3, 1, 2, 0], neck_hidden_sizes=[8, 16, 16, 24], readout_type="add", qkv_bias=False,
        fusion_hidden_size=16, use_batch_norm_in_fusion_residual=True, use_bias_in_fusion_residual=True,
        head_in_index=-2,
    ), (40, 40)),
    # "ignore" readout, two neck stages, the 256-channel head projection, position embeddings 4 -> 3.
    "vit_ignore_proj": (dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], reassemble_factors=[2, 0.5], readout_type="ignore",
        fusion_hidden_size=256, add_projection=True,
    ), (24, 24)),
}


@functools.lru_cache(maxsize=None)
def _build(name):
    kwargs, (h, w) = CASES[name]
    ref = randomize_(TorchDPT(TorchDPTConfig(**kwargs)), seed=len(name))
    x = np.random.default_rng(len(name)).standard_normal((2, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(nhwc_to_nchw(x), output_hidden_states=True)
    config = DPTConfig.from_dict(ref.config.to_dict())
    params = convert({k: to_numpy(v) for k, v in ref.state_dict().items()},
                     abstract_params(DPTForDepthEstimation(config), *dummy_inputs(config)), DPT, "depth_estimator")
    return dict(
        config=config, params=params, x=x,
        depth=to_numpy(out.predicted_depth), hidden=[to_numpy(s) for s in out.hidden_states],
    )


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param, _build(request.param)


def _apply(config, dtype=jnp.float32):
    model = DPTForDepthEstimation(config, dtype=dtype)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))


def test_parity_fp32(case):
    name, c = case
    out = _apply(c["config"])(c["params"], c["x"])
    assert out.predicted_depth.dtype == jnp.float32
    assert_close(out.predicted_depth, c["depth"], FP32_REL, f"{name} predicted_depth")
    assert len(out.hidden_states) == len(c["hidden"])
    for i, (a, e) in enumerate(zip(out.hidden_states, c["hidden"])):
        assert_close(a, e, FP32_REL, f"{name} hidden_states[{i}]")


def test_bf16_compute():
    # The hybrid case runs every kind of layer but the ViT patch conv.
    name = "hybrid_same"
    c = _build(name)
    depth = np.asarray(_apply(c["config"], jnp.bfloat16)(c["params"], c["x"]).predicted_depth)
    assert depth.dtype == np.float32
    assert_close(depth, c["depth"], BF16_REL, f"{name} bf16 predicted_depth")
    mean_err = np.abs(depth - c["depth"]).mean()
    assert mean_err <= BF16_MEAN_REL * np.abs(c["depth"]).max(), f"bf16 mean error {mean_err:.3g}"


@pytest.mark.parametrize("fixture", ["dpt_hybrid_midas", "dpt_large"])
def test_config_round_trip(fixture):
    with open(os.path.join(FIXTURES, f"{fixture}.json")) as f:
        config = DPTConfig.from_dict(json.load(f))
    d = json.loads(json.dumps(config.to_dict()))
    assert DPTConfig.from_dict(d) == config
    assert DPTConfig.from_dict(TorchDPTConfig.from_dict(d).to_dict()) == config


def test_hybrid_rejects_other_sizes():
    config = DPTConfig.from_dict(TorchDPTConfig(**CASES["hybrid_same"][0]).to_dict())
    model = DPTForDepthEstimation(config)
    with pytest.raises(ValueError, match="64x64"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 80, 80, 3))))


# Tensors that inference never reads, and nothing else, are dropped.
_IGNORED = {
    "dpt.layernorm.weight", "dpt.layernorm.bias",
    "neck.fusion_stage.layers.0.residual_layer1.convolution1.weight",
    "neck.fusion_stage.layers.0.residual_layer1.convolution1.bias",
    "neck.fusion_stage.layers.0.residual_layer1.convolution2.weight",
    "neck.fusion_stage.layers.0.residual_layer1.convolution2.bias",
}


@pytest.mark.parametrize("fixture", ["dpt_hybrid_midas", "dpt_large"])
def test_real_size_conversion_plan(fixture):
    with open(os.path.join(FIXTURES, f"{fixture}.json")) as f:
        d = json.load(f)
    with torch.device("meta"):
        ref = TorchDPT(TorchDPTConfig.from_dict(d))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    config = DPTConfig.from_dict(d)
    steps = plan(shapes, abstract_params(DPTForDepthEstimation(config), *dummy_inputs(config)), DPT, fixture)
    assert set(shapes) - {s.source for s in steps} == _IGNORED
    if config.is_hybrid:
        assert config.backbone_config.out_features == ("stage1", "stage2", "stage3")
        assert config.vit_out_layers == (8, 11)
        assert config.reassemble_factors == (1, 1, 1, 0.5)
    else:
        assert config.vit_out_layers == (5, 11, 17, 23)


def _bad(**changes):
    d = dict(CASES["hybrid_same"][0], model_type="dpt")
    d.update(changes)
    return d


@pytest.mark.parametrize("d, key", [
    (_bad(backbone_config=dict(_BIT, layer_type="preactivation")), "layer_type"),
    (_bad(backbone_config=dict(_BIT, output_stride=8)), "output_stride"),
    (_bad(readout_type="add"), "readout_type"),
    (_bad(neck_ignore_stages=[0]), "neck_ignore_stages"),
    (_bad(is_hybrid=False, backbone_config={"model_type": "dinov2"}), "backbone_config"),
    (_bad(is_hybrid=False, backbone_config=None, backbone="facebook/dinov2-small"), "backbone"),
    (_bad(add_projection=True), "add_projection"),
    (_bad(hidden_act="leaky_relu"), "hidden_act"),  # in transformers, not in our one activation table
    (_bad(reassemble_factors=[1, 1, 1, 0.4]), "reassemble_factors"),
    (_bad(model_type="dpt_beit"), "model_type"),
])
def test_unsupported_config_names_the_key(d, key):
    with pytest.raises(UnsupportedConfigError, match=key):
        DPTConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------------
# Preprocessing

def _images():
    rng = np.random.default_rng(0)
    return {
        "pil": PIL.Image.fromarray(rng.integers(0, 256, (50, 37, 3), dtype=np.uint8)),
        "uint8": rng.integers(0, 256, (40, 61, 3), dtype=np.uint8),
        "float01": rng.random((33, 45, 3)),
        "float255": rng.integers(0, 256, (30, 30, 3)).astype(np.float32),
        "batch": rng.integers(0, 256, (2, 21, 26, 3), dtype=np.uint8),
        "list": [PIL.Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(2)],
    }


_PROCESSOR_CONFIGS = {
    "sd2_depth": json.load(open(os.path.join(FIXTURES, "dpt_preprocessor_sd2_depth.json"))),
    "aspect_multiple_pad": {
        "image_processor_type": "DPTImageProcessor", "do_resize": True, "size": {"height": 40, "width": 56},
        "keep_aspect_ratio": True, "ensure_multiple_of": 14, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "do_pad": True, "size_divisor": 32,
    },
    "no_resize_no_rescale": {"do_resize": False, "do_rescale": False, "image_mean": 0.3, "image_std": 0.7},
}


@pytest.mark.parametrize("config_name", list(_PROCESSOR_CONFIGS))
def test_preprocessing_matches_transformers(config_name):
    d = _PROCESSOR_CONFIGS[config_name]
    ref, ours = DPTImageProcessorPil.from_dict(d), DPTImageProcessor.from_dict(d)
    for kind, images in _images().items():
        if config_name == "no_resize_no_rescale" and kind in ("batch", "list"):
            images = images[0]
        expected = np.moveaxis(ref(images, return_tensors="np").pixel_values, 1, -1)
        got = ours(images)
        assert got.dtype == np.float32
        assert got.shape == expected.shape, (kind, got.shape, expected.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{config_name}/{kind}")


def test_preprocessing_aspect_ratio_sizes():
    p = DPTImageProcessor.from_dict(_PROCESSOR_CONFIGS["aspect_multiple_pad"])
    # 50 x 37 -> scales 0.8 (h) and 1.51 (w): the height changes less, so both sides scale by 0.8 and
    # round to multiples of 14: (40, 29.6) -> (42, 28); padding to multiples of 32 gives (64, 32).
    assert p.output_size(50, 37) == (42, 28)
    assert p(_images()["pil"]).shape == (1, 64, 32, 3)


def test_preprocessing_convert_rgb_with_alpha():
    rng = np.random.default_rng(3)
    image = PIL.Image.fromarray(rng.integers(0, 256, (24, 20, 4), dtype=np.uint8), mode="RGBA")
    d = dict(_PROCESSOR_CONFIGS["sd2_depth"], do_convert_rgb=True, size=32)
    expected = np.moveaxis(DPTImageProcessorPil.from_dict(d)(image, return_tensors="np").pixel_values, 1, -1)
    np.testing.assert_allclose(DPTImageProcessor.from_dict(d)(image), expected, rtol=0, atol=1e-6)


def test_preprocessor_save_load(tmp_path):
    p = DPTImageProcessor.from_dict(_PROCESSOR_CONFIGS["aspect_multiple_pad"])
    p.save_pretrained(str(tmp_path))
    assert DPTImageProcessor.from_pretrained(str(tmp_path)) == p
    # transformers reads what we write and computes the same.
    with open(tmp_path / "preprocessor_config.json") as f:
        ref = DPTImageProcessorPil.from_dict(json.load(f))
    image = _images()["uint8"]
    np.testing.assert_allclose(p(image), np.moveaxis(ref(image, return_tensors="np").pixel_values, 1, -1), atol=1e-6)
    # ... and we read what transformers writes.
    theirs = DPTImageProcessorPil(size={"height": 32, "width": 48}, keep_aspect_ratio=True, ensure_multiple_of=8)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = DPTImageProcessor.from_pretrained(str(tmp_path / "theirs"))
    np.testing.assert_allclose(ours(image), np.moveaxis(theirs(image, return_tensors="np").pixel_values, 1, -1),
                               atol=1e-6)


def test_preprocessor_rejects_unknown_size_and_keys():
    with pytest.raises(UnsupportedConfigError, match="size"):
        DPTImageProcessor.from_dict({"size": {"shortest_edge": 384}})
    with pytest.raises(UnsupportedConfigError, match="do_magic"):
        DPTImageProcessor.from_dict({"do_magic": True})
