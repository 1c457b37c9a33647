"""Parity of the unCLIP prior and Stable unCLIP's image normalizer with diffusers, and their conversion."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PriorTransformer as TorchPrior
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer as TorchNormalizer,
)

from conftest import real_config
from torch_ref import assert_close, randomize_, to_numpy
from unclip_jax.models.config import UnsupportedConfigError
from unclip_jax.models.prior import (
    ImageNormalizerConfig,
    PriorTransformer,
    PriorTransformerConfig,
    StableUnCLIPImageNormalizer,
    dummy_normalizer_inputs,
    dummy_prior_inputs,
    prior_attention_mask,
)
from unclip_jax.weights.convert import abstract_params, convert, plan
from unclip_jax.weights.tables import IMAGE_NORMALIZER, PRIOR

FP32_REL = 1e-4
# bf16 activations (8-bit mantissa) through 1-2 blocks: measured max error 2e-2 x output scale
# (fp32 measures ~1e-6).
BF16_REL = 4e-2

# Differently shaped tiny configs covering every option the real priors (and Shap-E's) use.
CONFIGS = {
    # Karlo / unclip-small layout: text tokens projected, prd token, default options.
    "karlo": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12,
                  num_embeddings=5, additional_embeddings=4),
    # Every size set apart and both optional layer norms, gelu time embedding.
    "options": dict(num_attention_heads=3, attention_head_dim=4, num_layers=1, embedding_dim=8,
                    num_embeddings=3, additional_embeddings=4, time_embed_act_fn="gelu", norm_in_type="layer",
                    embedding_proj_norm_type="layer", time_embed_dim=20, embedding_proj_dim=10, clip_embed_dim=6),
    # Shap-E layout: image tokens [B, N, D], no text tokens, no prd, positional table padded in front.
    "shap_e": dict(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=6, num_embeddings=4,
                   additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
                   embedding_proj_norm_type="layer", encoder_hid_proj_type=None, added_emb_type=None,
                   time_embed_dim=16, embedding_proj_dim=5, clip_embed_dim=7),
    # Unprojected text tokens (already inner_dim wide) with a prd token, mish time embedding.
    "raw_text": dict(num_attention_heads=1, attention_head_dim=8, num_layers=1, embedding_dim=5, num_embeddings=3,
                     additional_embeddings=4, encoder_hid_proj_type=None, time_embed_act_fn="mish"),
}

BATCH = 3


@dataclasses.dataclass
class Case:
    torch_model: TorchPrior
    config: PriorTransformerConfig
    params: dict
    apply: object  # jitted fp32 apply
    apply_bf16: object  # jitted bf16-compute apply of the same fp32 params


def _inputs(name: str, c: PriorTransformerConfig, seed: int):
    """numpy (hidden_states, proj_embedding, encoder_hidden_states)."""
    rng = np.random.default_rng(seed)
    if name == "shap_e":
        hidden = rng.standard_normal((BATCH, c.num_embeddings, c.embedding_dim))
        text = None
    else:
        hidden = rng.standard_normal((BATCH, c.embedding_dim))
        width = c.embedding_dim if c.encoder_hid_proj_type else c.inner_dim
        text = rng.standard_normal((BATCH, c.num_embeddings, width)).astype(np.float32)
    proj = rng.standard_normal((BATCH, c.proj_dim))
    return hidden.astype(np.float32), proj.astype(np.float32), text


# Right padding (the tokenizer's), a row padded at its first token (whose early rows then see no
# unpadded causal key: diffusers' additive mask lets them attend to padding), and no padding.
def _mask(t: int) -> np.ndarray:
    m = np.ones((BATCH, t), bool)
    m[0, 2:] = False
    m[1, :2] = False
    return m


def _reference(kwargs: dict, seed: int) -> TorchPrior:
    m = randomize_(TorchPrior(**kwargs), seed=seed)
    # randomize_ also fills buffers: give the causal mask back its meaning (diffusers' construction).
    length = m.causal_attention_mask.shape[-1]
    with torch.no_grad():
        m.causal_attention_mask.copy_(torch.full((length, length), -10000.0).triu_(1)[None])
    return m


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request) -> tuple[str, Case]:
    return request.param, _build(request.param)


# Cached apart from the fixture: tests that take only some configs (indirect parametrization) reuse
# the same reference model and compiled functions.
@functools.cache
def _build(name: str) -> Case:
    torch_model = _reference(CONFIGS[name], seed=len(name))
    config = PriorTransformerConfig.from_dict(dict(torch_model.config))
    model = PriorTransformer(config)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = convert(state, abstract_params(model, *dummy_prior_inputs(config)), PRIOR, "prior")
    bf16 = PriorTransformer(config, dtype=jnp.bfloat16)
    return Case(torch_model, config, params, jax.jit(lambda p, *a: model.apply({"params": p}, *a)),
                jax.jit(lambda p, *a: bf16.apply({"params": p}, *a)))


def _torch_out(m: TorchPrior, hidden, timestep, proj, text, mask):
    with torch.no_grad():
        return to_numpy(m(
            torch.from_numpy(hidden), timestep, torch.from_numpy(proj),
            encoder_hidden_states=None if text is None else torch.from_numpy(text),
            attention_mask=None if mask is None else torch.from_numpy(mask),
        ).predicted_image_embedding)


TIMESTEPS = {
    "scalar": (lambda: torch.tensor(37), lambda: jnp.asarray(37)),
    "per_row": (lambda: torch.tensor([0, 500, 999]), lambda: jnp.asarray([0, 500, 999])),
    "fractional": (lambda: torch.tensor([0.5, 12.25, 998.75]), lambda: jnp.asarray([0.5, 12.25, 998.75])),
}


# diffusers' mask covers num_embeddings text tokens: Shap-E's layout has none to mask.
WITH_TEXT = [n for n in CONFIGS if n != "shap_e"]


@pytest.mark.parametrize("case, masked", [(n, False) for n in CONFIGS] + [(n, True) for n in WITH_TEXT],
                         indirect=["case"])
def test_prior_matches_diffusers(case, masked):
    name, k = case
    hidden, proj, text = _inputs(name, k.config, seed=1)
    mask = _mask(k.config.num_embeddings) if masked else None
    for what, (t_torch, t_jax) in TIMESTEPS.items():
        if (masked or name != "karlo") and what != "per_row":
            continue  # each timestep form once: they differ before the first block only
        want = _torch_out(k.torch_model, hidden, t_torch(), proj, text, mask)
        got = k.apply(k.params, hidden, t_jax(), proj, text, mask)
        assert_close(got, want, FP32_REL, f"{name} {what} mask={masked}")


@pytest.mark.parametrize("case", WITH_TEXT, indirect=True)
def test_mask_changes_the_output(case):
    """The padded rows must differ from the unmasked run: guards against a mask silently dropped."""
    name, k = case
    hidden, proj, text = _inputs(name, k.config, seed=2)
    t = jnp.asarray([3, 3, 3])
    free = np.asarray(k.apply(k.params, hidden, t, proj, text, None))
    masked = np.asarray(k.apply(k.params, hidden, t, proj, text, _mask(k.config.num_embeddings)))
    # Rows 0 and 1 have padding (row 2 may match: the prd token sees every key causally anyway).
    assert np.abs(free - masked)[:2].max(axis=-1).min() > 1e-3


def test_prior_mask_is_diffusers_additive_mask():
    """The boolean mask keeps exactly the keys where diffusers' additive mask is the row maximum."""
    c = PriorTransformerConfig(**CONFIGS["karlo"])
    m = TorchPrior(**CONFIGS["karlo"])
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    additive = (1 - torch.from_numpy(mask).float()) * -10000.0
    additive = torch.nn.functional.pad(additive, (0, c.additional_embeddings))[:, None, :] + m.causal_attention_mask
    additive = additive.numpy()
    want = additive == additive.max(axis=-1, keepdims=True)
    got = np.asarray(prior_attention_mask(jnp.asarray(mask), c.seq_len))[:, 0]
    np.testing.assert_array_equal(got, want)
    assert got.any(axis=-1).all()  # no fully masked row
    # A right-padded row is the plain causal-and-padding mask.
    causal = np.tril(np.ones((c.seq_len, c.seq_len), bool))
    keys = np.concatenate([mask[0], np.ones(c.additional_embeddings, bool)])
    np.testing.assert_array_equal(got[0, c.num_embeddings:], (causal & keys)[c.num_embeddings:])


@pytest.mark.parametrize("case", ["karlo", "shap_e"], indirect=True)  # with and without text tokens
def test_prior_bf16(case):
    name, k = case
    hidden, proj, text = _inputs(name, k.config, seed=3)
    mask = None if name == "shap_e" else _mask(k.config.num_embeddings)
    t = torch.tensor([5, 250, 900])
    want = _torch_out(k.torch_model, hidden, t, proj, text, mask)
    got = k.apply_bf16(k.params, hidden, jnp.asarray(t.numpy()), proj, text, mask)
    assert got.dtype == jnp.bfloat16
    assert_close(np.asarray(got, np.float32), want, BF16_REL, f"{name} bf16")


def test_post_process_latents(case):
    name, k = case
    latents = np.random.default_rng(4).standard_normal((BATCH, k.config.clip_dim)).astype(np.float32)
    with torch.no_grad():
        want = to_numpy(k.torch_model.post_process_latents(torch.from_numpy(latents)))
    got = PriorTransformer(k.config).apply({"params": k.params}, latents, method="post_process_latents")
    assert_close(got, want, FP32_REL, f"{name} post_process_latents")


@pytest.mark.parametrize(
    "key, value",
    [("time_embed_act_fn", "tanh"), ("norm_in_type", "group"), ("embedding_proj_norm_type", "rms"),
     ("encoder_hid_proj_type", "mlp"), ("added_emb_type", "clip")],
)
def test_unsupported_prior_config_names_the_key(key, value):
    with pytest.raises(UnsupportedConfigError, match=key):
        PriorTransformerConfig.from_dict({**CONFIGS["karlo"], key: value})


def test_unsupported_class_is_refused():
    with pytest.raises(UnsupportedConfigError, match="_class_name"):
        PriorTransformerConfig.from_dict({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(UnsupportedConfigError, match="_class_name"):
        ImageNormalizerConfig.from_dict({"_class_name": "PriorTransformer", "embedding_dim": 4})


def test_shape_errors_are_explained():
    c = PriorTransformerConfig(**CONFIGS["karlo"])
    model = PriorTransformer(c)
    hidden, t, proj, text = dummy_prior_inputs(c, batch=2)
    params = abstract_params(model, hidden, t, proj, text)
    with pytest.raises(ValueError, match="encoder_hidden_states is required"):
        jax.eval_shape(lambda p: model.apply({"params": p}, hidden, t, proj), params)
    with pytest.raises(ValueError, match="num_embeddings"):
        jax.eval_shape(lambda p: model.apply({"params": p}, hidden, t, proj, text[:, :3]), params)
    with pytest.raises(ValueError, match="attention_mask"):
        jax.eval_shape(lambda p: model.apply({"params": p}, hidden, t, proj, text, jnp.ones((2, 4), bool)), params)


# --- StableUnCLIPImageNormalizer -------------------------------------------------------------------


@pytest.mark.parametrize("dim", [4, 9])
def test_image_normalizer_matches_diffusers(dim):
    torch_model = TorchNormalizer(embedding_dim=dim)
    with torch.no_grad():
        torch_model.mean.copy_(torch.randn(1, dim))
        torch_model.std.copy_(torch.rand(1, dim) + 0.5)
    config = ImageNormalizerConfig.from_dict(dict(torch_model.config))
    model = StableUnCLIPImageNormalizer(config)
    params = convert({k: v.numpy() for k, v in torch_model.state_dict().items()},
                     abstract_params(model, *dummy_normalizer_inputs(config)), IMAGE_NORMALIZER, "image_normalizer")
    x = np.random.default_rng(dim).standard_normal((2, dim)).astype(np.float32)
    with torch.no_grad():
        want_scaled = to_numpy(torch_model.scale(torch.from_numpy(x)))
        want_unscaled = to_numpy(torch_model.unscale(torch.from_numpy(x)))
    variables = {"params": params}
    assert_close(model.apply(variables, x, method="scale"), want_scaled, FP32_REL, "scale")
    assert_close(model.apply(variables, x), want_scaled, FP32_REL, "__call__")
    assert_close(model.apply(variables, x, method="unscale"), want_unscaled, FP32_REL, "unscale")
    round_trip = model.apply(variables, model.apply(variables, x, method="scale"), method="unscale")
    assert_close(round_trip, x, FP32_REL, "round trip")


# --- Real-size conversion coverage (shapes only) ---------------------------------------------------


def _meta_shapes(module_cls, config: dict) -> dict[str, tuple[int, ...]]:
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        m = module_cls(**kwargs)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_karlo_prior_real_size():
    """Every tensor of the real Karlo prior maps with its shape, and the model runs (shapes only) on
    the pipeline's inputs: 77 masked text tokens, a scalar timestep, bf16 compute."""
    raw = real_config("prior_karlo.json")
    config = PriorTransformerConfig.from_dict(raw)
    assert (config.inner_dim, config.seq_len, config.clip_dim) == (2048, 81, 768)
    hidden, _, proj, text = dummy_prior_inputs(config, batch=2)
    assert text.shape == (2, 77, 768)
    model = PriorTransformer(config, dtype=jnp.bfloat16)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), hidden, jnp.asarray(999), proj, text,
                                       jnp.ones((2, 77), bool))
    )
    assert out.shape == (2, 768) and out.dtype == jnp.bfloat16
    shapes = _meta_shapes(TorchPrior, raw)
    steps = plan(shapes, variables["params"], PRIOR, "prior")
    assert len(steps) == len(shapes) == 4 + 2 * 2 + 3 * 2 + 20 * 16 + 2 + 2
    # A checkpoint that still carries the causal-mask buffer converts too.
    plan({**shapes, "causal_attention_mask": (1, 81, 81)}, variables["params"], PRIOR, "prior")


@pytest.mark.parametrize("name, dim", [("image_normalizer_h.json", 1024), ("image_normalizer_l.json", 768)])
def test_image_normalizer_real_size_plan(name, dim):
    raw = real_config(name)
    config = ImageNormalizerConfig.from_dict(raw)
    assert config.embedding_dim == dim
    shapes = _meta_shapes(TorchNormalizer, raw)
    steps = plan(shapes, abstract_params(StableUnCLIPImageNormalizer(config), *dummy_normalizer_inputs(config)),
                 IMAGE_NORMALIZER, "image_normalizer")
    assert sorted(s.source for s in steps) == ["mean", "std"]
