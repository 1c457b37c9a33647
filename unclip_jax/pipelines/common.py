"""What the pipelines share: prompt encoding, classifier-free guidance (the guidance batch and the guided
model function), checks of supplied arrays and keys, key derivation, the one loop driver and its host
hooks, image post-processing, outputs."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.experimental import io_callback
from tqdm.auto import tqdm

from unclip_jax.lora import lora_params
from unclip_jax.pipelines.checks import check_real
from unclip_jax.sharding import constrain, to_host
from unclip_jax.tokenizer import check_prompt, maybe_convert_prompt, tokenize

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclasses.dataclass
class ImagePipelineOutput:
    """images: a list of PIL images, a float32 array [B, H, W, 3] in [0, 1], or latents [B, h, w, C]."""

    images: Any


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")


def postprocess(images: jax.Array, output_type: str):
    """VAE output in [-1, 1], [B, H, W, 3] -> what `output_type` asks for (as diffusers' VaeImageProcessor)."""
    if output_type == "latent":
        return images
    x = np.clip(to_host(images).astype(np.float32) * 0.5 + 0.5, 0.0, 1.0)
    if output_type == "np":
        return x
    return [PIL.Image.fromarray(im) for im in (x * 255).round().astype(np.uint8)]


def repeat_per_image(x: jax.Array | np.ndarray, n: int):
    """Each row repeated n times in place ([a, b] -> [a, a, b, b]), as diffusers duplicates per prompt."""
    return x if n == 1 else jnp.repeat(x, n, axis=0)


def batch_size_of(prompt, prompt_embeds, what: str = "prompt") -> int:
    if prompt is not None and prompt_embeds is not None:
        raise ValueError(f"give either `{what}` or `{what}_embeds`, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError(f"give `{what}` or `{what}_embeds`")
    if prompt is not None:
        return len(check_prompt(prompt, what))
    return int(np.shape(prompt_embeds)[0])


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("clip_skip",))
def _encode(text_encoder, params, ids, clip_skip=None):
    return text_encoder.apply({"params": params}, ids, clip_skip=clip_skip).last_hidden_state


def encode_prompt(
    text_encoder,
    params,
    tokenizer,
    prompt,
    *,
    num_images_per_prompt: int,
    do_classifier_free_guidance: bool,
    negative_prompt=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    clip_skip: int | None = None,
):
    """diffusers' StableDiffusion `encode_prompt`: (prompt_embeds, negative_prompt_embeds or None),
    each [B * num_images_per_prompt, T, D].

    As in diffusers, `clip_skip` applies to the prompt only; the negative prompt is always encoded
    through the last layer.
    """
    batch = batch_size_of(prompt, prompt_embeds)
    check_finite(prompt_embeds, "prompt_embeds")
    check_finite(negative_prompt_embeds, "negative_prompt_embeds")
    if prompt_embeds is None:
        # Multi-vector textual-inversion tokens are spelled out first, as diffusers does.
        ids, _ = tokenize(tokenizer, maybe_convert_prompt(prompt, tokenizer))
        prompt_embeds = _encode(text_encoder, params, ids, clip_skip=clip_skip)
    prompt_embeds = repeat_per_image(jnp.asarray(prompt_embeds), num_images_per_prompt)
    if not do_classifier_free_guidance:
        return prompt_embeds, None
    if negative_prompt_embeds is None:
        if negative_prompt is None:
            negative = [""] * batch
        else:
            if prompt is not None and type(prompt) is not type(negative_prompt):
                raise TypeError(
                    f"negative_prompt must be of the same type as prompt; got {type(negative_prompt).__name__} "
                    f"and {type(prompt).__name__}"
                )
            negative = check_prompt(negative_prompt, "negative_prompt")
            if len(negative) != batch:
                raise ValueError(f"negative_prompt has {len(negative)} prompts; prompt has {batch}")
        ids, _ = tokenize(tokenizer, maybe_convert_prompt(negative, tokenizer), "negative_prompt")
        negative_prompt_embeds = _encode(text_encoder, params, ids)
    negative_prompt_embeds = repeat_per_image(jnp.asarray(negative_prompt_embeds), num_images_per_prompt)
    if negative_prompt_embeds.shape != prompt_embeds.shape:
        raise ValueError(
            f"negative_prompt_embeds {negative_prompt_embeds.shape} and prompt_embeds {prompt_embeds.shape} "
            "must have the same shape"
        )
    return prompt_embeds, negative_prompt_embeds


def cfg_batch(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """The classifier-free guidance batch [uncond_0, cond_0, uncond_1, cond_1, ...] [2B, ...] of two
    [B, ...] arrays. Interleaved rather than concatenated so that, with the batch split over devices, each
    device holds both halves of its own rows: forming it and `guide` move nothing between devices."""
    return jnp.stack([uncond, cond], axis=1).reshape((-1,) + cond.shape[1:])


def guide(pred: jax.Array, guidance_scale) -> jax.Array:
    """Classifier-free guidance (Ho & Salimans 2022) on a model output over a `cfg_batch` [2B, ...]."""
    pairs = pred.reshape((-1, 2) + pred.shape[1:])
    uncond, cond = pairs[:, 0], pairs[:, 1]
    return uncond + guidance_scale * (cond - uncond)


def guidance_batch(uncond, cond, do_cfg: bool):
    """The conditioning a guided model reads: `cfg_batch` of each leaf of two pytrees, or `cond` alone
    without guidance."""
    return jax.tree.map(cfg_batch, uncond, cond) if do_cfg else cond


def guided_model(apply, guidance_scale, do_cfg: bool):
    """model_fn(x, t, *cond) for `sampling_loop`: the model `apply(x_in, t, *cond)` run once on the
    guidance batch of x (with `cond` already a `guidance_batch`) and guided, or run on x alone."""
    def model_fn(x, t, *cond):
        if not do_cfg:
            return apply(x, t, *cond)
        return guide(apply(cfg_batch(x, x), t, *cond), guidance_scale)

    return model_fn


def cfg_halves(x: jax.Array) -> jax.Array:
    """A `cfg_batch` as diffusers lays it out, [uncond; cond] (what callbacks see)."""
    return x.reshape((-1, 2) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def cfg_pairs(x: jax.Array) -> jax.Array:
    """The inverse of `cfg_halves`: [uncond; cond] -> a `cfg_batch`."""
    return x.reshape((2, -1) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def with_lora(params, cross_attention_kwargs):
    """The params a call samples with: active unfused LoRA adapters merged at diffusers' per-call
    `cross_attention_kwargs["scale"]` (default 1.0; it scales the text encoder's adapters too, as
    diffusers' `lora_scale` does). Params without adapters come back as they are."""
    if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
        raise TypeError(f"cross_attention_kwargs must be a dict; got {type(cross_attention_kwargs).__name__}")
    scale = (cross_attention_kwargs or {}).get("scale", 1.0)
    check_real(scale, "cross_attention_kwargs['scale']")
    return lora_params(params, scale)


# ---------------------------------------------------------------------------------------------------
# Inputs: keys, supplied arrays, finiteness


def check_key(key, name: str = "key") -> None:
    """A new-style typed PRNG key (`jax.random.key(0)`), or a TypeError saying how to make one."""
    how = "make one with jax.random.key(0)"
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim:
            raise TypeError(f"{name} must be a single key; got an array of keys of shape {key.shape}")
        return
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,):
        raise TypeError(f"{name} is an old-style uint32 key (jax.random.PRNGKey); {how}, or wrap it with "
                        "jax.random.wrap_key_data(key)")
    raise TypeError(f"{name} must be a jax.random.key; got {type(key).__name__} {key!r:.40}; {how}")


def is_concrete(x) -> bool:
    """Whether `x` has values now (not a tracer inside jit / grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_finite(x, name: str) -> None:
    """A ValueError naming `name` when a given array (or number) holds NaN or Inf. Traced values pass:
    they are checked where they are made."""
    if x is None or not is_concrete(x):
        return
    if not bool(np.isfinite(to_host(x) if isinstance(x, jax.Array) else np.asarray(x)).all()):
        raise ValueError(f"`{name}` has non-finite values (NaN or Inf)")


def check_random_input(x, shape: tuple, name: str):
    """A supplied array as float32 of exactly `shape` with finite values, or a ValueError naming it."""
    if x is None:
        return None
    x = jnp.asarray(x, dtype=jnp.float32)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}; expected {tuple(shape)}")
    check_finite(x, name)
    return x


def _bad_rows(x) -> int:
    return int((~jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)).sum())


def warn_if_nonfinite(x, stage: str, given=None) -> None:
    """After a compiled stage, on the host: a warning naming the stage when its output holds NaN or
    Inf (e.g. an fp16 overflow), rather than a black image without a word. Not when the stage's input
    `given` was already non-finite (the stage before it has warned). Traced values pass."""
    if x is None or not is_concrete(x) or not is_concrete(given):
        return
    n = _bad_rows(x)
    if n and (given is None or not _bad_rows(given)):
        warnings.warn(f"the {stage} produced non-finite values (NaN or Inf) in {n} of {x.shape[0]} batch rows; "
                      "their images will be wrong (in reduced precision, try dtype=jnp.float32)",
                      RuntimeWarning, stacklevel=3)


def prepare_keys(key, n: int):
    """The `n` keys of `prepare`'s draws. They are kept apart from `sample`'s per-step draws, which use
    `sample_key(key)` itself; key None (every draw was given) stands for key 0."""
    return jax.random.split(jax.random.fold_in(sample_key(key), 1), n)


def sample_key(key):
    """The key `__call__` passes to `sample` (None: every draw was given; per-step draws, if any, use key 0)."""
    return jax.random.key(0) if key is None else key


def step_kwargs(scheduler, eta: float) -> dict:
    """eta goes only to schedulers whose step takes it (DDIM), as diffusers does."""
    return {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}


# ---------------------------------------------------------------------------------------------------
# The loop driver and its host hooks


@dataclasses.dataclass(frozen=True)
class HostHooks:
    """What a call asks of its sampling loops on the host (a static argument of the compiled loops: a
    new callback function compiles anew).

    callback(i, t, latents): Stable unCLIP's (diffusers' legacy) callback, every `callback_steps` steps.
    on_step_end: depth2img's `callback_on_step_end(pipe, i, t, kwargs) -> dict`, with the names of the
      tensors it sees (`tensor_inputs`).
    progress: progress bars on stderr, one per loop.
    """

    callback: Callable | None = None
    callback_steps: int = 1
    on_step_end: Callable | None = None
    tensor_inputs: tuple[str, ...] = ("latents",)
    progress: bool = False

    @property
    def any(self) -> bool:
        return self.callback is not None or self.on_step_end is not None or self.progress


NO_HOOKS = HostHooks()


def sampling_loop(model_fn, scheduler, state, sample, *, key, step_noise=None, step_options=None, start: int = 0,
                  cond=None, on_step_end=None, layout=None, remat: bool = False):
    """x_t -> x_0 over `state.timesteps[start:]` in one `lax.fori_loop` (a scan: the trip count is static).

    model_fn(x_in, t) -> the guided model output, or model_fn(x_in, t, cond) when `cond` (a pytree of
      conditioning carried through the loop) is given; `step_options` go to every `scheduler.step`.
    key: the per-step draws (folded with the step index); step_noise [steps, ...]: given ones instead.
    start: the first timestep index (img2img starts part-way; a static int keeps the trip count static).
      Step indices passed to hooks, and rows of `step_noise`, count from it.
    on_step_end(i, t, x, cond) -> (x, cond): the one host hook, traced after each step (see
      `report_hook`, `progress_hook`, `chain_hooks`; an `io_callback` may run in a program split over
      devices, unlike `jax.debug.callback`).
    layout: a `sharding.Layout`: the latents stay split over its batch axes from step to step.
    remat: recompute each step's activations in the backward pass (`jax.checkpoint` on the step), so a
      gradient through n steps keeps n latents and states, not n steps of activations. Host hooks cannot
      be differentiated: leave them off with it.
    """
    n = state.timesteps.shape[0]
    if remat and on_step_end is not None:
        raise ValueError("host hooks (callbacks, progress bars) cannot run in a differentiated (remat) loop")
    options = step_options or {}

    def body(i, carry):
        x, st, c = carry
        t = st.timesteps[i]
        x_in = scheduler.scale_model_input(st, x, t)
        out = model_fn(x_in, t) if cond is None else model_fn(x_in, t, c)
        noise = None if step_noise is None else step_noise[i - start]
        res = scheduler.step(st, out, t, x, key=jax.random.fold_in(key, i), noise=noise, **options)
        x = constrain(layout, res.prev_sample)
        if on_step_end is not None:
            x, c = on_step_end(i - start, t, x, c)
        return x, res.state, c

    if remat:
        # No CSE barrier needed: inside a scan the recomputation cannot be merged with the forward pass.
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.fori_loop(start, n, body, (sample, state, cond))[0]


def report_hook(callback, every: int = 1, stride: int = 1):
    """A hook calling callback(i // stride, t, x) on the host every `every` steps (x as numpy); `stride`
    is the scheduler order, by which diffusers divides the step index it reports."""
    def report(i, t, x):
        if int(i) % every == 0:
            callback(int(i) // stride, int(t), np.asarray(x))

    def hook(i, t, x, cond):
        io_callback(report, None, i, t, x, ordered=True)
        return x, cond

    return hook


def progress_hook(label: str, total: int):
    """A hook advancing a progress bar (tqdm, on stderr) that opens at step 0 and closes after step
    `total` - 1 (a compiled loop calls the same host function on every run: the bar lives in a closure)."""
    bar = []

    def tick(i):
        if int(i) == 0:
            bar[:] = [tqdm(total=total, desc=label, leave=False)]
        bar[0].update(1)
        if int(i) == total - 1:
            bar[0].close()

    def hook(i, t, x, cond):
        io_callback(tick, None, i, ordered=True)
        return x, cond

    return hook


def chain_hooks(*hooks):
    """One hook running the given ones (None skipped) in order; None when there are none."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def hook(i, t, x, cond):
        for h in hooks:
            x, cond = h(i, t, x, cond)
        return x, cond

    return hook


def want_progress(progress_bar: bool | None) -> bool:
    """None (the default) shows progress bars when stderr is a terminal."""
    return sys.stderr.isatty() if progress_bar is None else bool(progress_bar)
