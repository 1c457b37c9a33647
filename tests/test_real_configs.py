"""The real hub configs kept in tests/fixtures/configs (recovered copies: /work/shared/reference-configs,
README there; `.INFERRED` files are rebuilt, not seen) load into our classes and behave as diffusers' and
transformers' do with them: the schedulers' tables and short trajectories, the SD 2 depth VAE's tiling tile
(its sample_size 256), the model indexes' components, the tokenizers' padding."""

from __future__ import annotations

import json

import diffusers
import pytest
from conftest import FIXTURES, real_config

CONFIGS = FIXTURES / "configs"


def test_sd2_depth_vae_tile_comes_from_its_sample_size():
    import torch

    from unclip_jax.models.vae import AutoencoderKLConfig

    d = real_config("vae_sd2_depth.json")
    config = AutoencoderKLConfig.from_dict(d)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(d)
    assert d["sample_size"] == 256
    assert (config.tile_sample_size, config.tile_latent_size) == (ref.tile_sample_min_size, ref.tile_latent_min_size)


@pytest.mark.parametrize("index, pipeline", [("model_index_sd2_depth.json", "StableDiffusionDepth2ImgPipeline"),
                                             ("model_index_sd21_unclip.INFERRED.json", "StableUnCLIPImg2ImgPipeline")])
def test_model_indexes_name_our_components(index, pipeline):
    import unclip_jax

    d = real_config(index)
    assert d["_class_name"] == pipeline
    assert set(getattr(unclip_jax, pipeline).COMPONENTS) == {k for k in d if not k.startswith("_")}


def test_karlo_prior_components_are_where_the_prior_layout_says(tmp_path):
    from unclip_jax.weights.folder import prior_layout

    d = real_config("model_index_karlo.json")
    assert d["_class_name"] == "UnCLIPPipeline"
    (tmp_path / "model_index.json").write_text(json.dumps(d))
    assert set(prior_layout(str(tmp_path)).values()) <= {k for k in d if not k.startswith("_")}


@pytest.mark.parametrize("special_tokens_map, pad", [("tokenizer_special_tokens_map_karlo.json", "!"),
                                                     ("tokenizer_special_tokens_map_sd21_unclip_small.json", "!")])
def test_real_tokenizers_pad_with_exclamation_mark(tmp_path, special_tokens_map, pad):
    """Karlo's and SD 2's tokenizers pad with "!" (id 0), whatever tokenizer_config.json says: transformers
    lets special_tokens_map.json win, and we load through it."""
    import shutil

    from unclip_jax.tokenizer import load_tokenizer, tokenize, write_clip_tokenizer

    write_clip_tokenizer(str(tmp_path), pad_token="<|endoftext|>")
    shutil.copy(CONFIGS / "tokenizer_config_sd21_unclip.json", tmp_path / "tokenizer_config.json")
    shutil.copy(CONFIGS / special_tokens_map, tmp_path / "special_tokens_map.json")
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == pad
    ids, mask = tokenize(tok, "a cat")
    assert ids[0, -1] == tok.convert_tokens_to_ids(pad) == 0 and mask[0, -1] == 0
