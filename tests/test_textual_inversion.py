"""Textual inversion: the same embedding files (diffusers and A1111 formats, single- and multi-vector)
loaded by diffusers and by us give the same token ids, prompt embeddings and images."""

from __future__ import annotations

import contextlib
import copy

import jax
import numpy as np
import pytest
import torch
from torch_ref import assert_close, feed_noise, nhwc_to_nchw

from unclip_jax.pipelines.common import encode_prompt
from unclip_jax.textual_inversion import TextualInversionLoaderMixin, read_embeddings
from unclip_jax.tokenizer import maybe_convert_prompt, tokenize
from unclip_jax.weights.safetensors_io import save_file

TOL = 2e-3  # max abs on images in [0, 1]
PROMPT = ["a <cat-toy> in <style> style", "a1111tok and <emb>, a cat"]
NEGATIVE = ["<style> blur", ""]


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    """Four sources for a width-32 text encoder: diffusers single-vector safetensors (a folder),
    diffusers 3-vector .bin, A1111 2-vector .pt (`string_to_param`), A1111 2-vector `emb_params`
    safetensors (token given on load)."""
    d = tmp_path_factory.mktemp("textual_inversion")
    rng = np.random.RandomState(0)
    vec = lambda *s: rng.randn(*s).astype(np.float32)  # noqa: E731
    (d / "cat").mkdir()
    save_file({"<cat-toy>": vec(32)}, str(d / "cat" / "learned_embeds.safetensors"))
    torch.save({"<style>": torch.from_numpy(vec(3, 32))}, d / "style.bin")
    torch.save({"string_to_param": {"*": torch.from_numpy(vec(2, 32))}, "name": "a1111tok", "step": 100},
               d / "a1111.pt")
    save_file({"emb_params": vec(2, 32)}, str(d / "emb.safetensors"))
    return [(str(d / "cat"), None), (str(d / "style.bin"), None), (str(d / "a1111.pt"), None),
            (str(d / "emb.safetensors"), "<emb>")]


@contextlib.contextmanager
def _with_own_tokenizer(pipe):
    """The session pipeline with a copy of its tokenizer; its tokenizer and text encoder are restored
    afterwards (the compiled sampling loop, keyed on the pipeline, is reused)."""
    saved = pipe.tokenizer, pipe.text_encoder
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    try:
        yield pipe
    finally:
        pipe.tokenizer, pipe.text_encoder = saved


@pytest.fixture(scope="module")
def loaded(pipeline_dirs, pipeline_pairs, embedding_files):
    """(diffusers pipeline, our pipeline, our params) with every embedding loaded, both sides; ours is
    the session pipeline with its own tokenizer for the module's duration."""
    import diffusers

    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(str(pipeline_dirs("unclip_img2img", "a")))
    ref.set_progress_bar_config(disable=True)
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    with _with_own_tokenizer(pipe):
        for path, token in embedding_files:
            ref.load_textual_inversion(path, token=token)
            params = TextualInversionLoaderMixin.load_textual_inversion(pipe, params, path, token=token)
        yield ref, pipe, params


def test_tokens_table_and_prompt_embeds_match(loaded, embedding_files):
    ref, pipe, params = loaded
    added = ["<cat-toy>", "<style>", "<style>_1", "<style>_2", "a1111tok", "a1111tok_1", "<emb>", "<emb>_1"]
    assert [pipe.tokenizer.convert_tokens_to_ids(t) for t in added] == [ref.tokenizer.convert_tokens_to_ids(t)
                                                                        for t in added] == list(range(49408, 49416))
    table = np.asarray(params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    assert table.shape[0] == pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49416
    np.testing.assert_array_equal(table, ref.text_encoder.get_input_embeddings().weight.detach().numpy())
    expected = np.stack([e for path, token in embedding_files for _, e in read_embeddings(path, token)])
    np.testing.assert_array_equal(table[49408:], expected)

    converted = maybe_convert_prompt(PROMPT, pipe.tokenizer)
    assert converted == ref.maybe_convert_prompt(PROMPT, ref.tokenizer)
    assert converted[0] == "a <cat-toy> in <style> <style>_1 <style>_2 style"
    ours_ids, _ = tokenize(pipe.tokenizer, converted)
    np.testing.assert_array_equal(ours_ids, ref.tokenizer(converted, padding="max_length", max_length=77).input_ids)
    with torch.no_grad():
        pe, npe = ref.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE)
    # encode_prompt spells out the multi-vector tokens itself, as diffusers' does.
    ours = encode_prompt(pipe.text_encoder, params["text_encoder"], pipe.tokenizer, PROMPT, num_images_per_prompt=1,
                         do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    assert_close(ours[0], pe.numpy(), 1e-4, "prompt_embeds")
    assert_close(ours[1], npe.numpy(), 1e-4, "negative_prompt_embeds")


def test_images_match(loaded):
    ref, pipe, params = loaded
    rng = np.random.RandomState(5)
    embeds, noise = rng.randn(2, 32).astype(np.float32), rng.randn(2, 32).astype(np.float32)
    latents = rng.randn(2, 16, 16, 4).astype(np.float32)
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=5.0, noise_level=10, output_type="np")
    with feed_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_unclip_img2img"], [torch.from_numpy(noise)]):
        expected = ref(prompt=PROMPT, negative_prompt=NEGATIVE, image_embeds=torch.from_numpy(embeds),
                       latents=nhwc_to_nchw(latents), **kw).images
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image_embeds=embeds, params=params,
               key=jax.random.key(0), latents=latents, image_embeds_noise=noise, **kw).images
    err = float(np.abs(out - expected).max())
    assert err <= TOL, f"max abs error {err:.3g}"


def test_errors_name_the_token_and_change_nothing(pipeline_pairs):
    _, pipe, params = pipeline_pairs("unclip_img2img", "a")
    with _with_own_tokenizer(pipe):
        params = TextualInversionLoaderMixin.load_textual_inversion(pipe, params, {"<own>": np.ones((2, 32))})
        n, module = len(pipe.tokenizer), pipe.text_encoder
        load = lambda *a, **k: TextualInversionLoaderMixin.load_textual_inversion(pipe, params, *a, **k)  # noqa: E731
        with pytest.raises(ValueError, match="token '<own>' is already in the tokenizer's vocabulary"):
            load({"<own>": np.ones((2, 32))})
        with pytest.raises(ValueError, match="token '<\\|endoftext\\|>' is already"):
            load(np.zeros(32, np.float32), token="<|endoftext|>")
        with pytest.raises(ValueError, match="token '<mv>_1' is already"):  # a multi-vector token's second name
            load(np.zeros((2, 32), np.float32), token="<mv>", tokenizer=_with_token(pipe.tokenizer, "<mv>_1"))
        with pytest.raises(ValueError, match="embedding for '<wide>' has width 7; .* width 32"):
            load({"<wide>": np.zeros(7, np.float32)})
        with pytest.raises(ValueError, match="unknown textual inversion format"):
            load({"a": np.zeros(32), "b": np.zeros(32)})
        with pytest.raises(ValueError, match="names no token .*: give `token=`"):
            load(np.zeros(32, np.float32))
        with pytest.raises(ValueError, match="tokens given twice"):
            load([{"<p>": np.zeros(32)}, {"<q>": np.zeros(32)}], token=["<p>", "<p>"])
        assert len(pipe.tokenizer) == n and pipe.text_encoder is module
        # One array with a token per row.
        rows = np.arange(64, dtype=np.float32).reshape(2, 32)
        out = load(rows, token=["<r0>", "<r1>"])
        table = out["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
        np.testing.assert_array_equal(table[pipe.tokenizer.convert_tokens_to_ids(["<r0>", "<r1>"])], rows)


def _with_token(tokenizer, token):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(token)
    return tok


def test_saved_pipeline_keeps_the_added_tokens(loaded, tmp_path):
    """save_pretrained after textual inversion writes the grown tokenizer and vocab_size, so the folder
    reloads with the same token ids and embedding table."""
    _, pipe, params = loaded
    with _with_own_tokenizer(pipe):
        pipe.save_pretrained(str(tmp_path / "saved"), params)
        again, params2 = type(pipe).from_pretrained(str(tmp_path / "saved"))
    assert len(again.tokenizer) == len(pipe.tokenizer) == again.text_encoder.config.vocab_size
    prompt = maybe_convert_prompt(PROMPT, pipe.tokenizer)
    np.testing.assert_array_equal(tokenize(again.tokenizer, prompt)[0], tokenize(pipe.tokenizer, prompt)[0])
    np.testing.assert_array_equal(params2["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"],
                                  params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
