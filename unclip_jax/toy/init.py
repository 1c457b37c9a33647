"""The toy model family's configs, and the random-weight pipeline folders its training starts from.

`write_initial(folder, seed)` writes two `save_pretrained` folders with random weights
(`unclip_jax.tiny.random_params`, drawn on the host):

  FOLDER/unclip     every component of StableUnCLIPPipeline and StableUnCLIPImg2ImgPipeline in one folder
                    (each pipeline's `from_pretrained` picks its own): the prior's tokenizer and CLIP text
                    tower with projection, the prior and its DDPM scheduler, the image normalizer and
                    noising scheduler, the decoder's tokenizer and text encoder, the unCLIP UNet, DDIM,
                    the VAE, the CLIP vision tower with projection and its image processor
  FOLDER/depth2img  StableDiffusionDepth2ImgPipeline: tokenizer, text encoder, the 5-channel UNet, PNDM,
                    the VAE, a DPT-Hybrid and its processor

Sizes (pictures 64 x 64, VAE factor 4, latents 16 x 16 x 4, CLIP embeddings of 32):

  component            what                                                            params
  text towers          CLIP text, 3 layers of 32 (4 heads), the real 49,408-token BPE   1,621,696
                       (almost all of it the token table), three copies of one tower:      (x 2)
                       the decoder's, the depth model's, and the prior's, which adds a   1,622,720
                       32 x 32 projection
  image_encoder        CLIP ViT, 64 px, patches of 8, 3 layers of 64                       168,768
  prior                PriorTransformer, 4 layers of 64 (4 heads of 16), embeddings of 32  222,112
  image_normalizer     mean and std of the image embedding                                      64
  unet (unCLIP)        [32, 64, 64] channels, 1 layer per block, cross-attention to the  1,421,732
                       text's 32 at 8 x 8 only, class embedding from the noised image
                       embedding
  unet (depth)         the same with cross-attention at 16 x 16 too, 5 input channels    1,466,788
                       and no class embedding
  vae                  AutoencoderKL [16, 32, 32] (factor 4), 4 latent channels,           242,327
                       shipped twice (x 2)
  depth_estimator      DPT-Hybrid (BiT + ViT of 4 layers of 32), 64 px                     107,249

In all 8,737,479 params: 17.5 MB in fp16 (the issue's limit: 25 MB). `parameter_counts()` recomputes
the counts from the abstract params (nothing is initialised); `shipped_bytes()` the total.

Choices the training plan (scripts/train_default_model.py) relies on: the text towers of the three
places share one trained CLIP text tower (the clip objective trains the decoder's `text_encoder` with the
`image_encoder`; `tie_text_encoders` copies it to the prior's, with an identity projection, and to the
depth model's; the decoders keep it frozen, as Stable unCLIP does); the decoder's and the depth model's VAE are the
same VAE; the decoder samples with v-prediction like stable-diffusion-2-1-unclip, the depth model with
epsilon like stable-diffusion-2-depth.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from unclip_jax import tiny
from unclip_jax.toy.domain import SIZE

EMBED = 32  # CLIP embedding (projection) size: the prior's and the decoder's image embedding
TEXT_HIDDEN = 32
LATENT_SIZE = SIZE // 4

TEXT = dict(architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model", vocab_size=49408,
            hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=EMBED, hidden_act="quick_gelu", eos_token_id=2,
            bos_token_id=0, pad_token_id=1)
# The decoder's and the depth model's text encoder: the same tower read without its projection.
TEXT_NO_PROJECTION = dict(TEXT, architectures=["CLIPTextModel"])

VISION = dict(architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model", image_size=SIZE,
              patch_size=8, num_channels=3, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, projection_dim=EMBED, hidden_act="quick_gelu")

PRIOR = dict(_class_name="PriorTransformer", num_attention_heads=4, attention_head_dim=16, num_layers=4,
             embedding_dim=EMBED, num_embeddings=77, additional_embeddings=4)

_UNET = dict(_class_name="UNet2DConditionModel", sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
             layers_per_block=1, block_out_channels=[32, 64, 64], norm_num_groups=16,
             down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             cross_attention_dim=TEXT_HIDDEN, attention_head_dim=[2, 4, 4], use_linear_projection=True)
# The unCLIP decoder attends at 8 x 8 only: a step takes about half the time of attending at 16 x 16 too,
# and it draws shapes no worse (toy README). The depth decoder keeps both (its measured runs had them).
UNET_UNCLIP = dict(_UNET, class_embed_type="projection", projection_class_embeddings_input_dim=2 * EMBED,
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
UNET_DEPTH = dict(_UNET, in_channels=5)

VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
           block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8,
           down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
           sample_size=SIZE, scaling_factor=1.0)

DPT = dict(architectures=["DPTForDepthEstimation"], model_type="dpt", is_hybrid=True, embedding_type="hybrid",
           image_size=SIZE, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
           num_attention_heads=4, intermediate_size=64, backbone_out_indices=[0, 1, 2, 3],
           backbone_featmap_shape=[1, 32, SIZE // 16, SIZE // 16], neck_hidden_sizes=[16, 16, 32, 32],
           reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, readout_type="project",
           backbone_config=dict(model_type="bit", global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                                hidden_sizes=[16, 16, 32], embedding_dynamic_padding=True, num_groups=2,
                                embedding_size=8, out_features=["stage1", "stage2", "stage3"]))

_SD2_BETAS = dict(tiny.SD2_BETAS, num_train_timesteps=1000)

# folder -> (pipeline class, {component: config}); tokenizers and processors apart, below.
CONFIGS: dict[str, tuple[str, dict[str, dict]]] = {
    "unclip": ("StableUnCLIPPipeline", {
        "prior_text_encoder": TEXT,
        "prior": PRIOR,
        "prior_scheduler": dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                clip_sample_range=5.0, num_train_timesteps=1000, prediction_type="sample",
                                variance_type="fixed_small_log"),
        "image_normalizer": dict(_class_name="StableUnCLIPImageNormalizer", embedding_dim=EMBED),
        "image_noising_scheduler": dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2",
                                        num_train_timesteps=1000),
        "text_encoder": TEXT_NO_PROJECTION,
        "unet": UNET_UNCLIP,
        "scheduler": dict(_class_name="DDIMScheduler", prediction_type="v_prediction", **_SD2_BETAS),
        "vae": VAE,
        "image_encoder": VISION,
    }),
    "depth2img": ("StableDiffusionDepth2ImgPipeline", {
        "text_encoder": TEXT_NO_PROJECTION,
        "unet": UNET_DEPTH,
        "scheduler": dict(_class_name="PNDMScheduler", prediction_type="epsilon", skip_prk_steps=True,
                          **_SD2_BETAS),
        "vae": VAE,
        "depth_estimator": DPT,
    }),
}
FOLDERS = tuple(CONFIGS)

# Tokenizer folders -> pad token, and image processors: folder -> {name: (class, preprocessor config)};
# the tables of unclip_jax.tiny (the toy's pictures are larger).
TOKENIZERS = {"unclip": {"prior_tokenizer": tiny.PRIOR_PAD, "tokenizer": tiny.SD2_PAD},
              "depth2img": {"tokenizer": tiny.SD2_PAD}}
PROCESSORS = {"unclip": {"feature_extractor": tiny.clip_processor(SIZE)},
              "depth2img": {"feature_extractor": tiny.dpt_processor(SIZE)}}


def _abstract(config: dict):
    from unclip_jax.weights.components import build  # noqa: PLC0415
    from unclip_jax.weights.convert import abstract_params  # noqa: PLC0415

    built = build(config)
    return built, abstract_params(built.module, *built.dummy_inputs)


def parameter_counts() -> dict[str, dict[str, int]]:
    """folder -> {component: parameter count}, from the abstract params (no weights are made)."""
    out: dict[str, dict[str, int]] = {}
    for folder, (_, configs) in CONFIGS.items():
        out[folder] = {}
        for name, config in configs.items():
            if name.endswith("scheduler"):
                continue
            _, abstract = _abstract(config)
            out[folder][name] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))
    return out


def shipped_bytes(bytes_per_param: int = 2) -> int:
    """The size of every shipped copy of every model's params (fp16 by default)."""
    return bytes_per_param * sum(n for counts in parameter_counts().values() for n in counts.values())


def write_initial(folder: str, seed: int = 0) -> str:
    """Writes FOLDER/unclip and FOLDER/depth2img (see the module docstring) with random weights; the
    text towers of both start equal (the decoder's is the prior's without projection). Returns
    `folder`, which must not exist; it is written beside itself and renamed into place."""
    from unclip_jax.weights.folder import atomic_folder  # noqa: PLC0415

    with atomic_folder(folder) as tmp:
        for i, (name, (cls, configs)) in enumerate(CONFIGS.items()):
            tiny.write_pipeline(os.path.join(tmp, name), cls, configs, tokenizers=TOKENIZERS[name],
                                processors=PROCESSORS[name], seed=seed + i)
        tie_text_encoders(os.path.join(tmp, "unclip"), os.path.join(tmp, "depth2img"))
    return folder


def tie_text_encoders(unclip: str, depth2img: str | None = None, trained: bool = False) -> None:
    """Makes the text towers of the pipeline folder `unclip` (and of `depth2img`) one tower.

    At initialisation (`trained=False`) the `text_encoder`'s tower is copied into the `prior_text_encoder`,
    with an identity text projection (the text width is the embedding width). After the clip objective
    has trained the prior's text encoder (`trained=True`), its tower is copied back into the
    `text_encoder` of `unclip` (the decoder's) and of `depth2img`."""
    from unclip_jax.weights.orbax_io import ORBAX_DIR, restore_params, saved_structure  # noqa: PLC0415

    prior_dir = os.path.join(unclip, "prior_text_encoder")
    if trained:
        tower = {"text_model": restore_params(os.path.join(prior_dir, ORBAX_DIR))["text_model"]}
        replace_params(os.path.join(unclip, "text_encoder"), tower)
    else:
        tower = restore_params(os.path.join(unclip, "text_encoder", ORBAX_DIR))
        want = saved_structure(os.path.join(prior_dir, ORBAX_DIR))
        shape = tuple(want["text_projection"]["kernel"].shape)
        if shape[0] != shape[1]:
            raise ValueError(f"{prior_dir}: a text projection of {shape} cannot be the identity; the text width "
                             "must equal the embedding width")
        projection = {"kernel": np.eye(shape[0], dtype=want["text_projection"]["kernel"].dtype)}
        replace_params(prior_dir, {"text_model": tower["text_model"], "text_projection": projection})
    if depth2img is not None:
        replace_params(os.path.join(depth2img, "text_encoder"), tower)


def replace_params(component: str, params) -> None:
    """Replaces a saved component's orbax params (same tree, same shapes) by `params`: written beside
    them, then swapped in by renames."""
    import shutil  # noqa: PLC0415

    from unclip_jax.weights.orbax_io import ORBAX_DIR, save_params, saved_structure  # noqa: PLC0415

    path = os.path.join(component, ORBAX_DIR)
    _select(params, saved_structure(path), component)  # the same tree and shapes, or an error naming the first
    tmp = tempfile.mkdtemp(prefix=f".{ORBAX_DIR}.partial-", dir=component)
    os.rmdir(tmp)
    save_params(tmp, params)
    old = tempfile.mkdtemp(prefix=f".{ORBAX_DIR}.old-", dir=component)
    os.rename(path, os.path.join(old, ORBAX_DIR))
    os.rename(tmp, path)
    shutil.rmtree(old)


def set_embedding_stats(folder: str, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Sets the image normalizer's mean/std and the prior's clip_mean/clip_std of the pipeline folder
    `folder` (FOLDER/unclip) to the per-dimension mean and standard deviation of its CLIP image
    embeddings of `images` (uint8 [N, 64, 64, 3]), as Stable unCLIP's and Karlo's were set from their
    CLIP's statistics. Run after CLIP training, before the prior and the decoder. Returns (mean, std)."""
    from unclip_jax.pipelines.stable_unclip import StableUnCLIPImg2ImgPipeline  # noqa: PLC0415
    from unclip_jax.weights.orbax_io import ORBAX_DIR, restore_params  # noqa: PLC0415

    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be [N >= 2, H, W, 3], got shape {images.shape}")
    pipe, params = StableUnCLIPImg2ImgPipeline.from_pretrained(folder)
    embeds = np.concatenate([np.asarray(pipe.encode_image(params, images[i:i + batch]))
                             for i in range(0, len(images), batch)])
    mean, std = embeds.mean(axis=0, keepdims=True), embeds.std(axis=0, keepdims=True)
    replace_params(os.path.join(folder, "image_normalizer"), {"mean": mean, "std": std})
    prior = restore_params(os.path.join(folder, "prior", ORBAX_DIR))
    prior["clip_mean"], prior["clip_std"] = mean.astype(prior["clip_mean"].dtype), std.astype(prior["clip_std"].dtype)
    replace_params(os.path.join(folder, "prior"), prior)
    return mean[0], std[0]


def _select(tree: dict, like: dict, where: str) -> dict:
    """The subtree of `tree` with `like`'s keys (and shapes), or an error naming what is missing."""
    out = {}
    for key, sub in like.items():
        if key not in tree:
            raise KeyError(f"{where}: the prior's text encoder has no {key!r}")
        if isinstance(sub, dict):
            out[key] = _select(tree[key], sub, f"{where}/{key}")
        else:
            if tuple(np.shape(tree[key])) != tuple(sub.shape):
                raise ValueError(f"{where}/{key}: shape {np.shape(tree[key])} where {tuple(sub.shape)} is wanted")
            out[key] = tree[key]
    return out


