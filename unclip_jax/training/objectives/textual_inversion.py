"""The textual-inversion objective (Gal et al. 2022), as diffusers' textual_inversion script trains it:
new placeholder token(s) whose embedding rows, initialised from an initializer token's, are the only thing
trained, through the pipeline's own denoising objective (decoder for StableUnCLIPImg2ImgPipeline, depth
for StableDiffusionDepth2ImgPipeline) with everything else frozen.

The placeholder with `num_vectors` > 1 becomes the tokens `tok`, `tok_1`, ..., as
`unclip_jax.textual_inversion` loads multi-vector embeddings; captions name `tok` and are spelled out
before tokenizing. diffusers' script trains the whole embedding table and copies the old rows back after
every step; here the trained half is the new rows alone (`{"embeds": [n, D]}`), written into the table by
`merge`, so no other row gets a gradient or a weight-decay update. `save` writes the pipeline folder (its
tokenizer grown) and diffusers' `learned_embeds.safetensors` ({placeholder: [n, D]}), which diffusers'
`load_textual_inversion` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from unclip_jax.textual_inversion import TEXT_INVERSION_NAMES, _TABLE, _replace, add_embeddings
from unclip_jax.training.objectives.lora import LoraLoss, base_objective
from unclip_jax.weights.safetensors_io import save_file


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def _table(params) -> jnp.ndarray:
    for key in _TABLE:
        params = params[key]
    return params


def build(pipe, params, options: dict):
    """Textual inversion on a StableUnCLIPImg2ImgPipeline or StableDiffusionDepth2ImgPipeline (see the module
    docstring). options: placeholder_token, initializer_token (both needed), num_vectors (1), and the base
    objective's."""
    base_module = base_objective(pipe, "textual inversion trains the tokens")
    placeholder, initializer = options.get("placeholder_token"), options.get("initializer_token")
    if not placeholder or not initializer:
        raise ValueError("textual inversion needs options placeholder_token and initializer_token")
    n = int(options.get("num_vectors", 1))
    if n < 1:
        raise ValueError(f"num_vectors must be a positive integer; got {options.get('num_vectors')!r}")
    init_ids = pipe.tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"initializer_token {initializer!r} must be a single token; it is {len(init_ids)}")
    tokens = placeholder_tokens(placeholder, n)
    # A copy of the pipeline grows (its tokenizer and text encoder module); the one given stays as it was.
    pipe = copy.copy(pipe)
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    row = np.asarray(_table(params["text_encoder"]))[init_ids[0]]
    module, text_params = add_embeddings(pipe.text_encoder, params["text_encoder"], pipe.tokenizer,
                                         [(tok, row) for tok in tokens])
    pipe.text_encoder = module
    params = {**params, "text_encoder": text_params}
    ids = np.asarray(pipe.tokenizer.convert_tokens_to_ids(tokens), np.int32)
    base, pipe, params = base_module.build(pipe, params, options)

    def split(params_):
        return {"embeds": _table(params_["text_encoder"])[ids]}, params_

    def merge(trainable, frozen):
        table = jnp.asarray(_table(frozen["text_encoder"])).at[ids].set(trainable["embeds"].astype(jnp.float32))
        return {**frozen, "text_encoder": _replace(frozen["text_encoder"], _TABLE, table)}

    def save(out_dir: str, pipe_, params_) -> None:
        """The pipeline folder, and learned_embeds.safetensors beside it."""
        pipe_.save_pretrained(out_dir, params_)
        embeds = np.asarray(_table(params_["text_encoder"]))[ids].astype(np.float32)
        save_file({placeholder: embeds}, os.path.join(out_dir, TEXT_INVERSION_NAMES[0]), metadata={"format": "pt"})

    objective = dataclasses.replace(base, name="textual-inversion", split=split, merge=merge,
                                    loss=TextualInversionLoss(base.loss, merge), save=save)
    return objective, pipe, params


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a jit closure's constant
class TextualInversionLoss(LoraLoss):
    """The base objective's loss with the trained rows written into the embedding table."""

    merge: object = None

    def given(self, trainable, frozen, batch, draws):
        return self.base.given(self.merge(trainable, frozen), {}, batch, draws)


__all__ = ["TextualInversionLoss", "build", "placeholder_tokens"]
