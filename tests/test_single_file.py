"""Stability's single-file checkpoints: LDM key layout -> our params, and `unclip-jax convert FILE OUT`.

The LDM files are written here, from the random diffusers reference models, with the original
naming of Stability's inference configs (/work/shared/reference-configs/Stability-AI_stablediffusion__*:
openaimodel's block numbering, the LDM VAE's `down.i.block.j` / reversed `up.i`, OpenCLIP's fused
in_proj, `x @ proj` visual projection and its extra penultimate-dropped block), with the buffers real
files carry beside the params. What is measured: the single file loads to exactly the params of the
diffusers folder (every component, both fixture shapes), makes the same images, and a real-size LDM state
dict (shapes from the real configs on torch's meta device) maps tensor for tensor with nothing left over.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch

from unclip_jax.weights import ldm
from unclip_jax.weights.checkpoint import load_state_dict, read_config
from unclip_jax.weights.errors import CheckpointError, ConversionError
from unclip_jax.weights.single_file import infer_kind, plan_component

# Verbatim copies of the real configs recovered in the team's shared reference-configs folder (same names).
REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "configs", "reference")


# ---- The LDM naming, written from the diffusers names (independently of unclip_jax.weights.ldm) ----

def _resnet_ldm(rest: str) -> str:
    for a, b in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    raise AssertionError(rest)


def unet_to_ldm(sd: dict, config: dict) -> dict:
    n = config["layers_per_block"]
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "class_embedding.linear_1": "label_emb.0.0",
             "class_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.attentions.0": "middle_block.1"}
    out = {}
    for key, t in sd.items():
        module, leaf = key.rsplit(".", 1)
        parts = key.split(".")
        if module in fixed or module.startswith("mid_block.attentions.0."):
            head = next(k for k in fixed if module == k or module.startswith(k + "."))
            new = fixed[head] + key[len(head):]
        elif key.startswith("mid_block.resnets."):
            new = f"middle_block.{2 * int(parts[2])}." + _resnet_ldm(".".join(parts[3:]))
        elif parts[0] == "down_blocks":
            b, what = int(parts[1]), parts[2]
            if what == "downsamplers":
                new = f"input_blocks.{(b + 1) * (n + 1)}.0.op." + ".".join(parts[5:])
            else:
                i = 1 + b * (n + 1) + int(parts[3])
                rest = ".".join(parts[4:])
                new = f"input_blocks.{i}.0." + _resnet_ldm(rest) if what == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif parts[0] == "up_blocks":
            b, what = int(parts[1]), parts[2]
            if what == "upsamplers":
                has_attn = "CrossAttn" in config["up_block_types"][b]
                new = f"output_blocks.{b * (n + 1) + n}.{2 if has_attn else 1}.conv." + ".".join(parts[5:])
            else:
                i = b * (n + 1) + int(parts[3])
                rest = ".".join(parts[4:])
                new = f"output_blocks.{i}.0." + _resnet_ldm(rest) if what == "resnets" else f"output_blocks.{i}.1.{rest}"
        else:
            raise AssertionError(key)
        out["model.diffusion_model." + new] = t
    return out


def vae_to_ldm(sd: dict, config: dict) -> dict:
    levels = len(config["block_out_channels"])
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        new = key
        if parts[1] == "down_blocks":
            what = "block." + parts[4] if parts[3] == "resnets" else "downsample"
            new = f"encoder.down.{parts[2]}.{what}." + ".".join(parts[5:] if parts[3] == "resnets" else parts[5:])
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            what = "block." + parts[4] if parts[3] == "resnets" else "upsample"
            new = f"decoder.up.{i}.{what}." + ".".join(parts[5:])
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block":
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
            new = f"{parts[0]}.mid.attn_1.{name}.{parts[-1]}"
            if parts[-1] == "weight" and name != "norm":
                t = t[:, :, None, None]  # LDM's attention projections are 1x1 convs
        elif parts[1] == "conv_norm_out":
            new = f"{parts[0]}.norm_out.{parts[-1]}"
        new = new.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = t
    return out


def _clip_layers_to_ldm(sd: dict, src: str, dst: str) -> dict:
    """HF CLIP encoder layers under `src` -> OpenCLIP resblocks under `dst` (q, k, v fused)."""
    out, names = {}, {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                      "self_attn.out_proj": "attn.out_proj"}
    for key, t in sd.items():
        m = re.fullmatch(re.escape(src) + r"(\d+)\.(.*)\.(weight|bias)", key)
        if m is None:
            continue
        i, module, leaf = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":
                out[f"{dst}{i}.attn.in_proj_{leaf}"] = torch.cat(
                    [sd[f"{src}{i}.self_attn.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")])
            continue
        out[f"{dst}{i}.{names[module]}.{leaf}"] = t
    return out


def text_to_ldm(sd: dict, config: dict) -> dict:
    p = "cond_stage_model.model."
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = _clip_layers_to_ldm(sd, "encoder.layers.", p + "transformer.resblocks.")
    out[p + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"], out[p + "ln_final.bias"] = sd["final_layer_norm.weight"], sd["final_layer_norm.bias"]
    # SD 2 reads the penultimate layer: the file has one block more than the diffusers text encoder.
    n = config["num_hidden_layers"]
    out.update({k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): torch.randn_like(v)
                for k, v in list(out.items()) if f"resblocks.{n - 1}." in k})
    width = sd["final_layer_norm.weight"].shape[0]
    out[p + "text_projection"], out[p + "logit_scale"] = torch.randn(width, width), torch.tensor(4.6)
    return out


def vision_to_ldm(sd: dict) -> dict:
    p = "embedder.model.visual."
    out = _clip_layers_to_ldm(sd, "vision_model.encoder.layers.", p + "transformer.resblocks.")
    e = "vision_model.embeddings."
    out[p + "conv1.weight"] = sd[e + "patch_embedding.weight"]
    out[p + "class_embedding"] = sd[e + "class_embedding"]
    out[p + "positional_embedding"] = sd[e + "position_embedding.weight"]
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for leaf in ("weight", "bias"):
            out[f"{p}{theirs}.{leaf}"] = sd[f"vision_model.{ours}.{leaf}"]
    out[p + "proj"] = sd["visual_projection.weight"].T.contiguous()  # OpenCLIP: x @ proj
    # The text tower OpenCLIP keeps beside the image tower (FrozenOpenCLIPImageEmbedder deletes only its
    # transformer), and the embedder's normalisation buffers.
    out["embedder.model.token_embedding.weight"] = torch.randn(10, 8)
    out["embedder.model.ln_final.weight"] = torch.ones(8)
    out["embedder.mean"], out["embedder.std"] = torch.rand(3), torch.rand(3)
    return out


def _torch_state(sub: str) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in load_state_dict(sub).items()}


def write_ldm(folder, path, *, ckpt: bool = False) -> str:
    """A single file in Stability's layout with the weights of the diffusers folder's models."""
    folder = str(folder)
    sub = {n: os.path.join(folder, n) for n in os.listdir(folder)}
    sd = {}
    sd.update(unet_to_ldm(_torch_state(sub["unet"]), read_config(sub["unet"])))
    sd.update(vae_to_ldm(_torch_state(sub["vae"]), read_config(sub["vae"])))
    sd.update(text_to_ldm(_torch_state(sub["text_encoder"]), read_config(sub["text_encoder"])))
    if "image_encoder" in sub:
        sd.update(vision_to_ldm(_torch_state(sub["image_encoder"])))
    if "image_normalizer" in sub:
        norm = _torch_state(sub["image_normalizer"])
        sd["noise_augmentor.data_mean"], sd["noise_augmentor.data_std"] = norm["mean"], norm["std"]
        sd["noise_augmentor.betas"] = torch.rand(1000)
    # Buffers every LDM checkpoint carries beside the params.
    sd["betas"], sd["alphas_cumprod"], sd["model_ema.decay"] = torch.rand(1000), torch.rand(1000), torch.tensor(0.9)
    if ckpt:
        torch.save({"state_dict": sd, "global_step": 7}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return str(path)


# ---- Loading ----

def _prediction_type(folder) -> str:
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)["prediction_type"]


def _assert_same_params(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        flat_got = dict(jax.tree_util.tree_flatten_with_path(got[name])[0])
        flat_want = dict(jax.tree_util.tree_flatten_with_path(want[name])[0])
        assert flat_got.keys() == flat_want.keys(), name
        for k in flat_want:
            np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]), err_msg=f"{name} {k}")


@pytest.mark.parametrize("kind, shape, fmt", [("unclip_img2img", "a", "safetensors"), ("unclip_img2img", "b", "ckpt"),
                                              ("unclip", "a", "safetensors"), ("depth2img", "a", "safetensors"),
                                              ("depth2img", "b", "ckpt")])
def test_single_file_loads_the_folders_params(pipeline_pairs, pipeline_dirs, tmp_path, kind, shape, fmt):
    _, pipe, params = pipeline_pairs(kind, shape)
    folder = pipeline_dirs(kind, shape)
    path = write_ldm(folder, tmp_path / f"model.{fmt}", ckpt=fmt == "ckpt")
    ours, got = type(pipe).from_single_file(path, config=str(folder), prediction_type=_prediction_type(folder))
    _assert_same_params(got, params)
    assert ours.scheduler.config == pipe.scheduler.config


def test_decoder_file_with_a_prior_from_elsewhere(pipeline_pairs, pipeline_dirs, tmp_path):
    """StableUnCLIPPipeline from a decoder-only file (configs from an img2img folder) and another
    checkpoint's prior, as with stable-diffusion-2-1-unclip-small and Karlo."""
    import unclip_jax as uj

    _, _, decoder_params = pipeline_pairs("unclip_img2img", "a")
    folder = pipeline_dirs("unclip_img2img", "a")
    prior_folder = pipeline_dirs("unclip", "a")
    path = write_ldm(folder, tmp_path / "sd21-unclip.safetensors")
    pipe, params = uj.StableUnCLIPPipeline.from_single_file(path, config=str(folder), prior=str(prior_folder))
    _, prior_params = uj.StableUnCLIPPipeline.from_pretrained(str(prior_folder))
    _assert_same_params({n: params[n] for n in ("unet", "vae", "text_encoder", "image_normalizer")},
                        {n: decoder_params[n] for n in ("unet", "vae", "text_encoder", "image_normalizer")})
    _assert_same_params({n: params[n] for n in ("prior", "prior_text_encoder")},
                        {n: prior_params[n] for n in ("prior", "prior_text_encoder")})


def test_single_file_makes_the_folders_images(pipeline_pairs, pipeline_dirs, tmp_path):
    from test_export import run_both

    ref, pipe, _ = pipeline_pairs("unclip_img2img", "a")
    folder = pipeline_dirs("unclip_img2img", "a")
    path = write_ldm(folder, tmp_path / "unclip.safetensors")
    ours, params = type(pipe).from_single_file(path, config=str(folder))  # v_prediction: the kind's default
    got, expected = run_both("unclip_img2img", ref, ours, params)
    err = float(np.abs(got - expected).max())
    print(f"single file unclip_img2img: max abs error {err:.3g}")
    assert err <= 2e-3


def test_kind_from_shapes_and_clear_errors(pipeline_dirs, tmp_path):
    import unclip_jax as uj

    unet = "model.diffusion_model."
    kind = lambda **s: infer_kind({unet + "input_blocks.0.0.weight": (320, 4, 3, 3), **s}).name  # noqa: E731
    assert "depth" in infer_kind({unet + "input_blocks.0.0.weight": (320, 5, 3, 3)}).name
    assert "unclip-h" in kind(**{unet + "label_emb.0.0.weight": (1280, 2048)})
    assert "unclip-l" in kind(**{unet + "label_emb.0.0.weight": (1280, 1536)})
    with pytest.raises(CheckpointError, match="not a checkpoint this reads"):
        kind()
    with pytest.raises(CheckpointError, match="not a Stable Diffusion"):
        infer_kind({"foo": (1,)}, "x.ckpt")

    folder = pipeline_dirs("unclip_img2img", "a")
    path = write_ldm(folder, tmp_path / "unclip.safetensors")
    # A tiny unCLIP has no default hub configs: the error says to pass config=.
    with pytest.raises(CheckpointError, match="config="):
        uj.StableUnCLIPImg2ImgPipeline.from_single_file(path)
    # A config folder without the tokenizer: named.
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(CheckpointError, match="lacks tokenizer"):
        uj.StableUnCLIPImg2ImgPipeline.from_single_file(path, config=str(partial))
    # A tensor that belongs to nothing is named, not dropped.
    from safetensors.numpy import load_file, save_file

    sd = load_file(path)
    sd["mystery.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConversionError, match="mystery.weight"):
        uj.StableUnCLIPImg2ImgPipeline.from_single_file(str(tmp_path / "extra.safetensors"), config=str(folder))


def test_ckpt_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from unclip_jax.weights.single_file import open_single_file

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="needs torch"):
        open_single_file(str(path))


def test_convert_command_writes_an_orbax_folder(pipeline_pairs, pipeline_dirs, tmp_path):
    from unclip_jax.cli import main

    _, pipe, params = pipeline_pairs("depth2img", "b")
    folder = pipeline_dirs("depth2img", "b")
    path = write_ldm(folder, tmp_path / "512-depth-ema.safetensors")
    out = tmp_path / "converted"
    assert main(["convert", path, str(out), "--config-from", str(folder), "--quiet"]) == 0
    loaded, got = type(pipe).from_pretrained(str(out))
    _assert_same_params(got, params)
    assert loaded.scheduler.config.prediction_type == "epsilon"  # depth's, whatever the config folder says
    # Without --config-from, a depth file takes its configs from stable-diffusion-2-depth: not cached here.
    assert main(["convert", path, str(tmp_path / "x"), "--local-files-only", "--quiet"]) == 2
    assert not os.path.exists(tmp_path / "x")


# ---- Real size: shapes only ----

def _meta_state_shapes(cls, config: dict) -> dict:
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return {k: v for k, v in model.state_dict().items()}


def _real_configs(kind: str) -> dict:
    def read(name):
        with open(os.path.join(REFERENCE, name)) as f:
            return json.load(f)
    if kind == "unclip-h":
        return {"unet": read("inferred/stabilityai_stable-diffusion-2-1-unclip__unet_config.INFERRED.json"),
                "vae": read("inferred/stabilityai_stable-diffusion-2-1-unclip__vae_config.INFERRED.json"),
                "text_encoder": read("inferred/stabilityai_stable-diffusion-2-1-unclip__text_encoder_config.INFERRED.json"),
                "image_encoder": read("ckpt_zero123plus-v1.1__vision_encoder_config.RESAVE_of_sd21-unclip.json"),
                "image_normalizer": read("stabilityai_stable-diffusion-2-1-unclip__image_normalizer_config.json")}
    return {"unet": read("stabilityai_stable-diffusion-2-depth__unet_config.json"),
            "vae": read("marcbarouky_test-v3__vae_config.RESAVE_of_sd2-depth.json"),
            "text_encoder": read("ChenyangSi_FreeU-space__stable-diffusion-2-1_text_encoder_config.json")}


@pytest.mark.parametrize("kind", ["unclip-h", "depth"])
def test_real_size_ldm_state_dict_maps_completely(kind):
    import diffusers
    import transformers
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    configs = _real_configs(kind)
    meta = {"unet": lambda c: _meta_state_shapes(diffusers.UNet2DConditionModel, c),
            "vae": lambda c: _meta_state_shapes(diffusers.AutoencoderKL, c),
            "text_encoder": lambda c: _meta_state_shapes(transformers.CLIPTextModel,
                                                         transformers.CLIPTextConfig(**c)),
            "image_encoder": lambda c: _meta_state_shapes(transformers.CLIPVisionModelWithProjection,
                                                          transformers.CLIPVisionConfig(**c.get("vision_config", c))),
            "image_normalizer": lambda c: _meta_state_shapes(StableUnCLIPImageNormalizer, c)}
    sd = {}
    for name, config in configs.items():
        state = meta[name](config)
        if name == "unet":
            sd.update(unet_to_ldm(state, config))
        elif name == "vae":
            sd.update(vae_to_ldm(state, config))
        elif name == "text_encoder":
            sd.update(text_to_ldm(state, config))
        elif name == "image_encoder":
            sd.update(vision_to_ldm(state))
        else:
            sd["noise_augmentor.data_mean"], sd["noise_augmentor.data_std"] = state["mean"], state["std"]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert infer_kind(shapes).name.lower().startswith("stable unclip h" if kind == "unclip-h" else "stable diffusion 2")
    mapped = set()
    for name, config in configs.items():
        if name == "image_encoder":
            config = config.get("vision_config", config) | {"architectures": ["CLIPVisionModelWithProjection"]}
        steps = plan_component(shapes, name, config, what=kind)  # raises on anything missing/extra/misshaped
        mapped |= {s.source for s in steps}
    # Every param tensor of the file lands somewhere (q/k/v via their fused in_proj); only the known
    # non-params (the penultimate-dropped block, projections SD 2 does not use, the extra towers) remain.
    view_keys = {k for prefix, _ in ldm.COMPONENTS.values() for k in ldm.LDMView({}, prefix, shapes)}
    left = sorted(view_keys - mapped)
    assert all(re.search(r"resblocks\.23\.|text_projection|logit_scale|embedder\.model\.(?!visual)", k) for k in left), left[:5]

