"""Textual inversion (Gal et al. 2022): learned token embeddings added to the tokenizer and to the text
encoder's embedding table, as diffusers' `TextualInversionLoaderMixin` loads them.

Files: diffusers' (`{token: [D] or [n, D]}` in `learned_embeds.safetensors` / `.bin`) and A1111's
(`{"string_to_param": {"*": [n, D]}, "name": ...}` pickles, `{"emb_params": [n, D]}` safetensors). A
token with n > 1 vectors is added as n tokens `tok`, `tok_1`, ..., `tok_{n-1}`, and prompts must be
spelled out with `maybe_convert_prompt` before tokenizing (diffusers' pipelines do it in `encode_prompt`).

As in diffusers, the tokenizer lives on the pipeline and grows in place; so does the text encoder
module, rebuilt with the larger `vocab_size` (flax checks param shapes). The params are returned new:
`load_textual_inversion` returns params whose embedding table has the new rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from unclip_jax.tokenizer import add_tokens, maybe_convert_prompt
from unclip_jax.weights.checkpoint import StateDict, read_pickle
from unclip_jax.weights.errors import CheckpointError

TEXT_INVERSION_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")

__all__ = ["TextualInversionLoaderMixin", "maybe_convert_prompt", "read_embeddings", "add_embeddings"]


def _read_file(path: str, weight_name: str | None) -> dict:
    if os.path.isdir(path):
        names = (weight_name,) if weight_name else TEXT_INVERSION_NAMES
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise CheckpointError(f"{path}: no textual inversion file ({' or '.join(names)})")
        path = found[0]
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such textual inversion file")
    return dict(StateDict([path])) if path.endswith(".safetensors") else read_pickle(path, "embedding")


def _token_and_embedding(source, token: str | None) -> tuple[str, np.ndarray]:
    """One embedding source -> (token, [n, D] or [D]), as diffusers reads the two formats."""
    if isinstance(source, Mapping):
        if len(source) == 1:
            loaded, embedding = next(iter(source.items()))
        elif "string_to_param" in source:  # A1111
            loaded, embedding = source.get("name"), source["string_to_param"]["*"]
        else:
            raise ValueError(f"unknown textual inversion format: keys {sorted(map(str, source))[:10]}; expected one "
                             "{token: embedding} entry or A1111's `string_to_param`")
        token = token or loaded
    else:
        embedding = source
    if token is None:
        raise ValueError("this embedding names no token (an array, or an A1111 file without `name`): give `token=`")
    return str(token), np.asarray(embedding, np.float32)


def read_embeddings(path_or_embedding, token=None, *, weight_name: str | None = None) -> list[tuple[str, np.ndarray]]:
    """Textual inversion source(s) -> [(token, [D])], multi-vector tokens spelled out (`tok`, `tok_1`, ...).

    path_or_embedding: a file or folder path, a state dict, an array, or a list of these (then `token`,
    if given, is a list of the same length). One array with a list of n tokens gives one token per row.
    """
    sources = list(path_or_embedding) if isinstance(path_or_embedding, list) else [path_or_embedding]
    tokens = list(token) if isinstance(token, list) else [token] * len(sources)
    if len(sources) == 1 and len(tokens) > 1 and not isinstance(sources[0], (Mapping, str, os.PathLike)):
        rows = np.asarray(sources[0])
        if rows.shape[0] != len(tokens):
            raise ValueError(f"{rows.shape[0]} embeddings for {len(tokens)} tokens {tokens}")
        sources = list(rows)
    if len(sources) != len(tokens):
        raise ValueError(f"{len(sources)} embeddings for {len(tokens)} tokens {tokens}")
    named = [t for t in tokens if t is not None]
    if len(set(named)) < len(named):
        raise ValueError(f"tokens given twice: {tokens}")
    out = []
    for source, tok in zip(sources, tokens):
        if isinstance(source, (str, os.PathLike)):
            source = _read_file(os.fspath(source), weight_name)
        tok, embedding = _token_and_embedding(source, tok)
        if embedding.ndim > 1 and embedding.shape[0] > 1:
            out += [(tok if i == 0 else f"{tok}_{i}", row) for i, row in enumerate(embedding)]
        else:
            out.append((tok, embedding.reshape(-1)))
    return out


def add_embeddings(text_encoder, params, tokenizer, embeddings: Sequence[tuple[str, np.ndarray]]):
    """Adds (token, [D]) pairs: checks them all, then grows the tokenizer in place and returns
    (text encoder module with the new vocab_size, its params with the new rows).

    Errors (before anything changes): a token already in the vocabulary, or a width other than the
    table's, each naming the token.
    """
    vocab = tokenizer.get_vocab()
    table = params
    for key in _TABLE:
        table = table[key]
    rows, width = table.shape
    for tok, embedding in embeddings:
        if tok in vocab:
            raise ValueError(f"token {tok!r} is already in the tokenizer's vocabulary; choose another token "
                             "(or load into a fresh tokenizer)")
        if embedding.shape != (width,):
            raise ValueError(f"textual inversion embedding for {tok!r} has width {embedding.shape[-1]}; the "
                             f"text encoder's token embeddings have width {width}")
    ids = add_tokens(tokenizer, [tok for tok, _ in embeddings])
    size = max(rows, len(tokenizer))
    table = np.asarray(table)
    # Rows no token uses yet (a tokenizer larger than the table) get the mean embedding, a neutral value.
    grown = np.concatenate([table, np.broadcast_to(table.mean(0, keepdims=True), (size - rows, width))])
    grown[ids] = np.stack([e for _, e in embeddings]).astype(table.dtype)
    module = text_encoder
    if size != text_encoder.config.vocab_size:
        module = text_encoder.clone(config=dataclasses.replace(text_encoder.config, vocab_size=size))
    new_params = _replace(params, _TABLE, grown.astype(table.dtype))
    return module, new_params


def _replace(tree, path, value):
    """A copy of nested dicts with tree[path] = value (other subtrees shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace(tree[path[0]], path[1:], value)
    return out


class TextualInversionLoaderMixin:
    """diffusers' TextualInversionLoaderMixin for our pipelines (which hold `tokenizer` and
    `text_encoder`); params go in and come out, the tokenizer and module on the pipeline grow in place."""

    def maybe_convert_prompt(self, prompt, tokenizer=None):
        return maybe_convert_prompt(prompt, tokenizer if tokenizer is not None else self.tokenizer)

    def load_textual_inversion(self, params, path_or_embedding, token=None, *, tokenizer=None,
                               component: str = "text_encoder", tokenizer_name: str = "tokenizer",
                               weight_name: str | None = None):
        """Returns params with the embeddings added to `params[component]`'s token table; the
        pipeline's tokenizer (`tokenizer_name`, or the one given) gains the tokens and its `component`
        module is rebuilt for the larger table. See `read_embeddings` for what may be given."""
        tokenizer = tokenizer if tokenizer is not None else getattr(self, tokenizer_name)
        embeddings = read_embeddings(path_or_embedding, token, weight_name=weight_name)
        module, component_params = add_embeddings(getattr(self, component), params[component], tokenizer, embeddings)
        setattr(self, component, module)
        return {**params, component: component_params}
