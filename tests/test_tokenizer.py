"""The shipped CLIP BPE and prompt validation."""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.tokenizer import VOCAB_SIZE, check_prompt, clip_vocab_and_merges, load_tokenizer, tokenize


def test_vocabulary_is_openai_clip():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE == 49408 and len(merges) == 48894
    # Ids published with OpenAI's CLIP (its vocab.json): byte symbols first, specials last.
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407


@pytest.mark.parametrize("flavour, pad_id", [("openai", 49407), ("sd2", 0)])
def test_tokenize_pads_and_truncates(clip_tokenizer_dirs, flavour, pad_id):
    tok = load_tokenizer(str(clip_tokenizer_dirs[flavour]))
    ids, mask = tokenize(tok, ["a photo of a cat", "word " * 100])
    assert ids.shape == mask.shape == (2, 77) and ids.dtype == np.int32
    # "a photo of a cat" in OpenAI CLIP's BPE.
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[0, 7:] == pad_id).all() and mask[0].sum() == 7
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and mask[1].all()  # truncated, EOS kept


def test_prompt_type_errors(clip_tokenizer_dirs):
    tok = load_tokenizer(str(clip_tokenizer_dirs["openai"]))
    assert check_prompt("x") == ["x"] and check_prompt(["x", "y"]) == ["x", "y"]
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings; got int"):
        tokenize(tok, 3)
    with pytest.raises(TypeError, match="negative_prompt must be a string or a list of strings; got NoneType"):
        tokenize(tok, ["ok", None], what="negative_prompt")
    with pytest.raises(TypeError, match="got bytes"):
        check_prompt(b"bytes")
    with pytest.raises(ValueError, match="empty list"):
        check_prompt([])


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json: missing"):
        load_tokenizer(str(tmp_path))


def test_long_prompt_warns_as_diffusers(clip_tokenizer_dirs, capfd):
    """An over-long prompt: diffusers' warning naming the part cut off (what diffusers' encode_prompt
    decodes), and not transformers' misleading "indexing errors" one."""
    from unclip_jax.tokenizer import maybe_convert_prompt

    tok = load_tokenizer(str(clip_tokenizer_dirs["sd2"]))
    prompts = ["a photo of a cat", " ".join(f"word{i}" for i in range(60))]
    untruncated = tok(prompts, padding="longest", return_tensors="np").input_ids
    cut = tok.batch_decode(untruncated[1:, tok.model_max_length - 1:-1])
    with pytest.warns(UserWarning, match="truncated because CLIP can only handle sequences up to 77 tokens") as w:
        tokenize(tok, maybe_convert_prompt(prompts, tok))
    assert str(cut) in str(w[0].message) and len(cut[0]) > 20
    assert "Token indices sequence length" not in capfd.readouterr().err
