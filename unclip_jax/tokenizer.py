"""CLIP tokenization: the real 49,408-token BPE, and prompt validation.

Tokenizing is transformers' CLIPTokenizer (tokenizers-backed; it does not import torch) loaded from a
checkpoint's `tokenizer/` folder. The package also ships OpenAI's BPE merges
(`assets/bpe_simple_vocab_16e6.txt.gz`, MIT, from open_clip) so that a tokenizer folder in the
layout of openai/clip-vit-large-patch14 (vocab.json, merges.txt, configs) can be written without a hub:
`write_clip_tokenizer`.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Sequence
from importlib import resources

import numpy as np

VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# 49408 = 256 bytes + 256 end-of-word bytes + 48894 merges + 2 specials.
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode table, in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token -> id) and merges of OpenAI CLIP's BPE."""
    raw = resources.files("unclip_jax").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1:1 + _NUM_MERGES]  # line 0 is a version header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    assert len(tokens) == VOCAB_SIZE
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str, pad_token: str = EOS, model_max_length: int = 77) -> None:
    """Writes a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json). OpenAI checkpoints pad with EOS; SD 2.x (OpenCLIP) pads with "!"."""
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = dict(special, add_prefix_space=False, do_lower_case=True, errors="replace",
                  model_max_length=model_max_length, tokenizer_class="CLIPTokenizer")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_tokenizer(folder: str):
    """transformers' CLIPTokenizer from a tokenizer folder."""
    from transformers import CLIPTokenizer  # noqa: PLC0415  (slow import, only when loading)

    for name in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(folder, name)) and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise FileNotFoundError(f"{os.path.join(folder, name)}: missing (tokenizer folder {folder})")
    return CLIPTokenizer.from_pretrained(folder)


def check_prompt(prompt, what: str = "prompt") -> list[str]:
    """A prompt argument as a list of strings; TypeError naming `what` otherwise."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and not isinstance(prompt, bytes) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise ValueError(f"{what}: empty list of prompts")
        return list(prompt)
    bad = prompt if not isinstance(prompt, Sequence) or isinstance(prompt, bytes) else next(
        p for p in prompt if not isinstance(p, str))
    raise TypeError(f"{what} must be a string or a list of strings; got {type(bad).__name__}")


# transformers warns, once per tokenizer, when a text tokenizes past model_max_length, that running it
# "will result in indexing errors": untrue here, since `tokenize` cuts every prompt (and says so itself).
_TOO_LONG_FLAG = "sequence-length-is-longer-than-the-specified-maximum"


def _quiet(tokenizer):
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags[_TOO_LONG_FLAG] = True
    return tokenizer


def tokenize(tokenizer, prompt, what: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
    """Pads to the tokenizer's max length and truncates, as diffusers' encode_prompt does, warning (as
    diffusers does) with the part of each prompt that was cut off.

    Returns (input_ids [B, T] int32, attention_mask [B, T] int32).
    """
    prompts = check_prompt(prompt, what)
    n = tokenizer.model_max_length
    enc = _quiet(tokenizer)(prompts, padding="max_length", max_length=n, truncation=True)
    removed = [tokenizer.decode(ids[n - 1:-1]) for ids in tokenizer(prompts)["input_ids"] if len(ids) > n]
    if removed:
        warnings.warn(f"The following part of your input was truncated because CLIP can only handle sequences up "
                      f"to {n} tokens: {removed}", UserWarning, stacklevel=2)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def maybe_convert_prompt(prompt, tokenizer):
    """Spells out multi-vector textual-inversion tokens, as diffusers' pipelines do before tokenizing:
    a token `tok` added with vectors `tok`, `tok_1`, ..., `tok_{n-1}` becomes "tok tok_1 ... tok_{n-1}".
    A string stays a string, a list a list; prompts without such tokens come back unchanged."""
    if not isinstance(prompt, str):
        return [maybe_convert_prompt(p, tokenizer) for p in prompt]
    added = tokenizer.added_tokens_encoder
    for token in set(_quiet(tokenizer).tokenize(prompt)):
        if token in added:
            extra, i = [], 1
            while f"{token}_{i}" in added:
                extra.append(f"{token}_{i}")
                i += 1
            # Plain substring replacement, as diffusers does it (its results are the reference).
            prompt = prompt.replace(token, " ".join([token, *extra]))
    return prompt


def add_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Adds new tokens to a tokenizer (in place) and returns their ids; a token already in the vocabulary
    (or given twice) is refused with a ValueError naming it, before anything is added."""
    vocab = tokenizer.get_vocab()
    seen: set[str] = set()
    for token in tokens:
        if token in vocab or token in seen:
            raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; choose another token")
        seen.add(token)
    tokenizer.add_tokens(list(tokens))
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]
