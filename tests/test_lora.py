"""LoRA: files made with peft/diffusers on the tiny fixture pipelines, loaded by diffusers and by us, give
the same UNet / text-encoder outputs and the same images (several scales, fused and unfused, two
adapters with weights, kohya and old diffusers spellings); bad files fail naming the tensor."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_ref import assert_close, feed_noise, nchw_to_nhwc, nhwc_to_nchw

from unclip_jax import lora as L
from unclip_jax.weights.safetensors_io import SafetensorsFile, read_metadata

MODEL_REL = 1e-4  # x output scale, fp32
TOL = 2e-3  # max abs on images in [0, 1]

# Adapter "a": one config over attention, projections, feed-forward and resnet convs (3x3 and 1x1);
# adapter "b": per-module ranks and alphas (peft's rank_pattern / alpha_pattern).
CONFIGS = {
    "a": dict(unet=dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1",
                                                            "conv_shortcut", "ff.net.0.proj"]),
              text_encoder=dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "out_proj", "fc1"])),
    "b": dict(unet=dict(r=3, lora_alpha=2, target_modules=["to_k", "to_out.0", "conv2", "proj_out"],
                        rank_pattern={"to_k": 2}, alpha_pattern={"conv2": 5}),
              text_encoder=dict(r=4, lora_alpha=4, target_modules=["k_proj", "fc2"], use_rslora=True)),
}


def _fill_lora_(module, seed):
    """peft initialises B to zero; random A and B (scaled like a trained update) make the LoRA visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))


def _fresh_ref(pipeline_dirs, kind, shape):
    import diffusers

    ref = getattr(diffusers, {"unclip": "StableUnCLIPPipeline", "unclip_img2img": "StableUnCLIPImg2ImgPipeline"}[kind]
                  ).from_pretrained(str(pipeline_dirs(kind, shape)))
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def lora_files(pipeline_dirs, tmp_path_factory):
    """`lora_files(kind, shape)` -> {adapter: path}: the adapters of CONFIGS made with peft on a fresh
    diffusers pipeline and saved with diffusers' `save_lora_weights` (adapter config in the header)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cache = {}

    def get(kind, shape):
        if (kind, shape) not in cache:
            ref = _fresh_ref(pipeline_dirs, kind, shape)
            out = {}
            for i, (name, cfg) in enumerate(CONFIGS.items()):
                layers, meta = {}, {}
                for component in ("unet", "text_encoder"):
                    model = getattr(ref, component)
                    config = LoraConfig(**cfg[component])
                    model.add_adapter(config, adapter_name=name)
                    _fill_lora_(model, seed=10 * i + len(component))
                    layers[component] = get_peft_model_state_dict(model, adapter_name=name)
                    meta[component] = config.to_dict()
                folder = tmp_path_factory.mktemp(f"lora_{kind}_{shape}_{name}")
                type(ref).save_lora_weights(str(folder), unet_lora_layers=layers["unet"],
                                            text_encoder_lora_layers=layers["text_encoder"],
                                            unet_lora_adapter_metadata=meta["unet"],
                                            text_encoder_lora_adapter_metadata=meta["text_encoder"])
                out[name] = str(folder / L.LORA_WEIGHT_NAME)
            cache[kind, shape] = out
        return cache[kind, shape]

    return get


def _read(path):
    return {k: np.array(v) for k, v in SafetensorsFile(path).items()}


def _kohya(path, alpha):
    """The same adapter in kohya / A1111 spelling, with one network alpha (which replaces the file's)."""
    out = {}
    for key, value in _read(path).items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if component == "text_encoder":
            module = "text_model." + module  # A1111 files name the CLIP text model
        name = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.float32(alpha)
    return out


def _old_spelling(path):
    """The adapter as diffusers' attention-processor LoRA files spelled it (no alphas: scale 1)."""
    out = {}
    for key, value in _read(path).items():
        head, kind = key.rsplit(".lora_", 1)
        updown = "down" if kind == "A.weight" else "up"
        for proj in ("q", "k", "v", "out"):
            unet_name, te_name = (f".to_{proj}", f".{proj}_proj")
            unet_name += ".0" if proj == "out" else ""
            if key.startswith("unet.") and head.endswith(unet_name) and ".attn" in head:
                key = f"{head[: -len(unet_name)]}.processor.to_{proj}_lora.{updown}.weight"
                break
            if key.startswith("text_encoder.") and head.endswith(te_name):
                key = f"{head[: -len(te_name)]}.to_{proj}_lora.{updown}.weight"
                break
        else:
            key = f"{head}.lora{'_linear_layer' if key.startswith('text_encoder.') else ''}.{updown}.weight"
        out[key] = value
    return out


def _model_inputs(ref, seed=0):
    rng = np.random.RandomState(seed)
    cfg = ref.unet.config
    return dict(x=rng.randn(2, 8, 8, 4).astype(np.float32),
                ctx=rng.randn(2, 7, cfg.cross_attention_dim).astype(np.float32),
                labels=rng.randn(2, cfg.projection_class_embeddings_input_dim).astype(np.float32),
                ids=np.asarray(ref.tokenizer(["a photo of a cat", "x"], padding="max_length", max_length=77).input_ids))


def _ref_outputs(ref, inp, scale=None):
    kw = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    with torch.no_grad():
        unet = ref.unet(nhwc_to_nchw(inp["x"]), 10, torch.from_numpy(inp["ctx"]),
                        class_labels=torch.from_numpy(inp["labels"]), **kw).sample
        # As diffusers' encode_prompt applies the per-call scale to the text encoder's LoRA.
        if scale is not None:
            scale_lora_layers(ref.text_encoder, scale)
        text = ref.text_encoder(torch.from_numpy(inp["ids"])).last_hidden_state
        if scale is not None:
            unscale_lora_layers(ref.text_encoder, scale)
    return nchw_to_nhwc(unet), text.numpy()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(unet, text_encoder, params, x, ctx, labels, ids):
    return (unet.apply({"params": params["unet"]}, x, jnp.array(10), ctx, labels),
            text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state)


def _our_outputs(pipe, params, inp):
    out = _forward(pipe.unet, pipe.text_encoder, {c: params[c] for c in ("unet", "text_encoder")}, inp["x"],
                   inp["ctx"], inp["labels"], inp["ids"])
    return tuple(np.asarray(o) for o in out)


def _assert_outputs_close(ours, ref, what, base=None):
    for i, name in enumerate(("unet", "text_encoder")):
        assert_close(ours[i], ref[i], MODEL_REL, f"{what} {name}")
        if base is not None:  # the LoRA must change the output far beyond the tolerance
            effect = np.abs(base[i] - ref[i]).max()
            assert effect > 100 * MODEL_REL * np.abs(ref[i]).max(), f"{what} {name}: the LoRA has no effect"


# ---------------------------------------------------------------- model level


def test_model_parity_scales_and_adapters(pipeline_dirs, pipeline_pairs, lora_files, shape="a"):
    """(Shape "b" is covered through the kohya and old-spelling files.)"""
    files = lora_files("unclip_img2img", shape)
    _, pipe, params = pipeline_pairs("unclip_img2img", shape)
    ref = _fresh_ref(pipeline_dirs, "unclip_img2img", shape)
    inp = _model_inputs(ref)
    base = _our_outputs(pipe, params, inp)
    ref.load_lora_weights(files["a"], adapter_name="a")
    ours = L.load_lora_weights(params, files["a"], adapter_name="a")
    assert set(ours) == set(params) | {"lora"} and ours["unet"] is params["unet"]  # nothing merged yet
    merge = jax.jit(L.lora_params)
    for scale in (1.0, 0.5, 1.7):  # jitted: one compile, the scale is traced
        _assert_outputs_close(_our_outputs(pipe, merge(ours, scale), inp), _ref_outputs(ref, inp, scale),
                              f"adapter a, scale {scale}", base)
    # Eager and jitted merges agree; the merged tree is the base tree.
    eager, jitted = L.lora_params(ours, 0.5), merge(ours, 0.5)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), eager, jitted)

    ref.load_lora_weights(files["b"], adapter_name="b")
    ours = L.load_lora_weights(ours, files["b"], adapter_name="b")
    assert list(ours["lora"]["active"]) == ["b"]  # as in diffusers, the last adapter loaded is the active one
    _assert_outputs_close(_our_outputs(pipe, L.lora_params(ours, 0.8), inp), _ref_outputs(ref, inp, 0.8),
                          "adapter b, just loaded")
    for names, weights in ((["a", "b"], [0.6, 1.3]), (["a", "b"], [{"unet": 0.4}, 1.0])):
        ref.set_adapters(names, adapter_weights=weights)
        p = L.set_adapters(ours, names, weights)
        _assert_outputs_close(_our_outputs(pipe, L.lora_params(p, 0.8), inp), _ref_outputs(ref, inp, 0.8),
                              f"adapters {names} weights {weights}")


def test_fuse_unfuse_and_unload(pipeline_dirs, pipeline_pairs, lora_files):
    files = lora_files("unclip_img2img", "a")
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    ref = _fresh_ref(pipeline_dirs, "unclip_img2img", "a")
    inp = _model_inputs(ref, seed=1)
    ref.load_lora_weights(files["a"], adapter_name="a")
    ref.load_lora_weights(files["b"], adapter_name="b")
    ref.set_adapters(["a", "b"], [0.7, 1.2])
    ours = L.set_adapters(L.load_lora_weights(L.load_lora_weights(params, files["a"], adapter_name="a"),
                                              files["b"], adapter_name="b"), ["a", "b"], [0.7, 1.2])
    ref.fuse_lora(lora_scale=0.6)
    fused = L.fuse_lora(ours, lora_scale=0.6)
    assert fused["lora"]["active"] == {} and set(fused["lora"]["fused"]) == {"a", "b"}
    # Fused adapters no longer follow the per-call scale, as in diffusers.
    _assert_outputs_close(_our_outputs(pipe, L.lora_params(fused, 0.3), inp), _ref_outputs(ref, inp, 0.3), "fused")
    ref.unfuse_lora()
    unfused = L.unfuse_lora(fused)
    _assert_outputs_close(_our_outputs(pipe, L.lora_params(unfused, 0.3), inp), _ref_outputs(ref, inp, 0.3),
                          "unfused")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           L.unload_lora_weights(unfused), params)
    ref.unload_lora_weights()
    _assert_outputs_close(_our_outputs(pipe, L.unload_lora_weights(unfused), inp), _ref_outputs(ref, inp),
                          "unloaded")
    only_a = L.delete_adapters(unfused, "b")
    assert set(only_a["lora"]["adapters"]) == {"a"} and set(only_a["lora"]["active"]) == {"a"}
    assert "lora" not in L.delete_adapters(only_a, ["a"])
    # The pipeline mixin is the same functions.
    m = L.LoraLoaderMixin()
    via = m.unfuse_lora(m.fuse_lora(m.set_adapters(m.load_lora_weights(params, files["a"], adapter_name="a"), "a", 0.5)))
    assert via["lora"]["active"] == {"a": {"unet": 0.5, "text_encoder": 0.5}} and via["lora"]["fused"] == {}
    assert "lora" not in m.unload_lora_weights(via)


@pytest.mark.parametrize("spelling", ["kohya", "old_diffusers"])
def test_other_spellings_parity(pipeline_dirs, pipeline_pairs, lora_files, spelling):
    """kohya/A1111 and old diffusers key spellings: diffusers and we load the same dict alike."""
    path = lora_files("unclip_img2img", "b")["a"]
    state = _kohya(path, alpha=3.0) if spelling == "kohya" else _old_spelling(path)
    _, pipe, params = pipeline_pairs("unclip_img2img", "b")
    ref = _fresh_ref(pipeline_dirs, "unclip_img2img", "b")
    inp = _model_inputs(ref, seed=2)
    base = _our_outputs(pipe, params, inp)
    ref.load_lora_weights({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    ours = L.load_lora_weights(params, state)
    n_layers = sum(len(v) for v in ours["lora"]["adapters"]["default_0"].values())
    assert 2 * n_layers == len(_read(path))  # every layer of the file, none dropped
    _assert_outputs_close(_our_outputs(pipe, L.lora_params(ours, 0.9), inp), _ref_outputs(ref, inp, 0.9),
                          spelling, base)


def test_save_lora_weights_round_trip(pipeline_dirs, pipeline_pairs, lora_files, tmp_path):
    """Our saved file (kohya-loaded adapter, pattern ranks and alphas) reads back in diffusers as we read it."""
    files = lora_files("unclip_img2img", "a")
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    ours = L.load_lora_weights(params, _kohya(files["a"], alpha=5.0), adapter_name="k")
    ours = L.load_lora_weights(ours, files["b"], adapter_name="b")
    with pytest.raises(L.LoraError, match="give adapter_name"):
        L.save_lora_weights(str(tmp_path), ours)
    saved = {n: L.save_lora_weights(str(tmp_path / n), ours, adapter_name=n) for n in ("k", "b")}
    ref = _fresh_ref(pipeline_dirs, "unclip_img2img", "a")
    inp = _model_inputs(ref, seed=3)
    for name, path in saved.items():
        ref.load_lora_weights(path, adapter_name=name)
        back = L.load_lora_weights(params, path, adapter_name=name)
        ref.set_adapters([name])
        _assert_outputs_close(_our_outputs(pipe, L.lora_params(back, 0.4), inp), _ref_outputs(ref, inp, 0.4),
                              f"saved {name}")
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                               L.lora_params(back, 0.4), L.lora_params(L.set_adapters(ours, [name]), 0.4))


# ---------------------------------------------------------------- pipeline level


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float32))


def _images(ref, pipe, params, ref_scale=None, seed=0):
    """The same img2img run (given image embeddings and noise) on diffusers and ours, both given the
    LoRA scale as `cross_attention_kwargs` (ours merges the unfused adapters in `params` itself)."""
    rng = np.random.RandomState(seed)
    embeds, noise = rng.randn(2, 32).astype(np.float32), rng.randn(2, 32).astype(np.float32)
    latents = rng.randn(2, 16, 16, 4).astype(np.float32)
    kw = dict(prompt=["a cat", "a red dog"], negative_prompt=["", "blurry"], height=32, width=32,
              num_inference_steps=2, guidance_scale=5.0, noise_level=10, output_type="np")
    extra = {} if ref_scale is None else {"cross_attention_kwargs": {"scale": ref_scale}}
    with feed_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_unclip_img2img"], [_t(noise)]):
        expected = ref(image_embeds=_t(embeds), latents=nhwc_to_nchw(latents), **kw, **extra).images
    out = pipe(image_embeds=embeds, params=params, key=jax.random.key(0), latents=latents,
               image_embeds_noise=noise, **kw, **extra).images
    return out, expected


def test_pipeline_images_parity(pipeline_dirs, pipeline_pairs, lora_files):
    files = lora_files("unclip_img2img", "a")
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    ref = _fresh_ref(pipeline_dirs, "unclip_img2img", "a")
    plain, _ = _images(ref, pipe, params)
    ref.load_lora_weights(files["a"], adapter_name="a")
    ref.load_lora_weights(files["b"], adapter_name="b")
    ours = L.load_lora_weights(L.load_lora_weights(params, files["a"], adapter_name="a"), files["b"],
                               adapter_name="b")
    cases = [("a", None, 1.0), ("a", None, 0.5), (["a", "b"], [0.6, 1.3], 0.8)]
    for names, weights, scale in cases:
        ref.set_adapters(names, weights)
        out, expected = _images(ref, pipe, pipe.set_adapters(ours, names, weights), scale)
        err = float(np.abs(out - expected).max())
        assert err <= TOL, f"{names} {weights} scale {scale}: max abs error {err:.3g}"
        assert np.abs(plain - expected).max() > 50 * TOL, "the LoRA does not change the images"
    ref.fuse_lora(lora_scale=0.7)
    out, expected = _images(ref, pipe, pipe.fuse_lora(pipe.set_adapters(ours, *cases[2][:2]), 0.7))
    assert float(np.abs(out - expected).max()) <= TOL, "fused"


# ---------------------------------------------------------------- bad files, sharding


def test_bad_files_name_the_tensor(pipeline_pairs, lora_files, tmp_path):
    _, _, params = pipeline_pairs("unclip_img2img", "a")
    good = _read(lora_files("unclip_img2img", "a")["a"])
    # A LoRA made for another architecture: B @ A does not fit the base weight.
    with pytest.raises(L.LoraError, match=r"wrong base shape: (unet|text_encoder)\.\S+\.lora_A\.weight \(B @ A is "
                                          r"\(\d+, \d+\) in PyTorch layout; \S+/kernel is \(\d+, \d+\)\)"):
        L.load_lora_weights(params, lora_files("unclip_img2img", "b")["a"])
    with pytest.raises(L.LoraError, match=r"no such layer: unet\.down_blocks\.7\.attentions\.0\.to_q\.lora_A\.weight"):
        L.load_lora_weights(params, {**good, "unet.down_blocks.7.attentions.0.to_q.lora_A.weight": np.zeros((4, 32)),
                                     "unet.down_blocks.7.attentions.0.to_q.lora_B.weight": np.zeros((32, 4))})
    with pytest.raises(L.LoraError, match=r"tensor 'model\.diffusion_model\.x\.weight': unknown LoRA key format"):
        L.load_lora_weights(params, {"model.diffusion_model.x.weight": np.zeros(3)})
    with pytest.raises(L.LoraError, match=r"tensor 'lora_unet_nowhere_to_q\.lora_down\.weight': not a LoRA tensor"):
        L.load_lora_weights(params, {"lora_unet_nowhere_to_q.lora_down.weight": np.zeros((4, 32))})
    key = next(k for k in good if k.endswith("lora_B.weight"))
    with pytest.raises(L.LoraError, match="has no lora_B tensor"):
        L.load_lora_weights(params, {k: v for k, v in good.items() if k != key})
    with pytest.raises(L.LoraError, match=rf"tensor '{key}' has shape \(\d+, 5\)"):
        L.load_lora_weights(params, {**good, key: np.zeros((good[key].shape[0], 5), np.float32)})
    with pytest.raises(L.LoraError, match="DoRA adapters are not supported"):
        L.load_lora_weights(params, {**good, "unet.conv_in.lora_magnitude_vector": np.zeros(3)})
    with pytest.raises(L.LoraError, match="no such LoRA file"):
        L.load_lora_weights(params, str(tmp_path))
    loaded = L.load_lora_weights(params, good, adapter_name="x")
    with pytest.raises(L.LoraError, match="'x' is already in use"):
        L.load_lora_weights(loaded, good, adapter_name="x")
    with pytest.raises(L.LoraError, match=r"no adapter named 'y'; loaded: \['x'\]"):
        L.set_adapters(loaded, ["x", "y"])
    # The prior's text encoder takes no LoRA: a file for a component the params lack is refused.
    with pytest.raises(L.LoraError, match="has no text_encoder params"):
        L.load_lora_weights({"unet": params["unet"]}, good)


def test_sharded_params_keep_their_sharding(pipeline_dirs, lora_files):
    """On 8 forced CPU devices: lora_params (eager and jitted) keeps each base kernel's NamedSharding."""
    code = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from unclip_jax import lora as L
        from unclip_jax.weights.components import load_component
        folder = {str(pipeline_dirs("unclip_img2img", "a"))!r}
        params = {{c: load_component(os.path.join(folder, c))[1] for c in ("unet", "text_encoder")}}
        mesh = Mesh(np.array(jax.devices()), ("data",))
        def place(x):
            spec = P(*([None] * (x.ndim - 1) + ["data"])) if x.ndim and x.shape[-1] % 8 == 0 else P()
            return jax.device_put(x, NamedSharding(mesh, spec))
        params = jax.tree_util.tree_map(place, params)
        params = L.load_lora_weights(params, {lora_files("unclip_img2img", "a")["a"]!r})
        for merged in (L.lora_params(params, 0.5), jax.jit(L.lora_params)(params, 0.5)):
            for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(merged)[0],
                                    jax.tree_util.tree_leaves(L.unload_lora_weights(params))):
                assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (path, a.sharding, b.sharding)
        k = params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
        assert k.sharding.spec == P(None, "data")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_metadata_is_read_from_the_header(lora_files):
    meta = json.loads(read_metadata(lora_files("unclip_img2img", "a")["b"])[L.METADATA_KEY])
    assert meta["unet.rank_pattern"] == {"to_k": 2} and meta["text_encoder.use_rslora"] is True
