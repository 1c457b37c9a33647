"""What the pipelines share: prompt encoding, classifier-free guidance, image post-processing, outputs."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.experimental import io_callback

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
    from unclip_jax.lora import lora_params  # noqa: PLC0415

    if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
        raise TypeError(f"cross_attention_kwargs must be a dict; got {type(cross_attention_kwargs).__name__}")
    scale = (cross_attention_kwargs or {}).get("scale", 1.0)
    check_real(scale, "cross_attention_kwargs['scale']")
    return lora_params(params, scale)


def check_random_input(x, shape: tuple, name: str):
    """A supplied random draw as a float32 array of exactly `shape`, or a ValueError naming it."""
    if x is None:
        return None
    x = jnp.asarray(x, dtype=jnp.float32)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}; expected {tuple(shape)}")
    return x


def step_kwargs(scheduler, eta: float) -> dict:
    """eta goes only to schedulers whose step takes it (DDIM), as diffusers does."""
    return {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}


def sampling_loop(model_fn, scheduler, state, sample, key, step_noise, options, callback=None, callback_steps=1,
                  timestep_stride=1, *, start=0, cond=None, on_step_end=None, progress: str | None = None,
                  layout=None, remat: bool = False):
    """x_t -> x_0 over `state.timesteps[start:]` in one `lax.fori_loop` (a scan: the trip count is static).

    model_fn(x_in, t) -> the guided model output, or model_fn(x_in, t, cond) when `cond` (a pytree of
    conditioning carried through the loop) is given; `options` go to every `scheduler.step`.
    start: the first timestep index (img2img starts part-way; a static int keeps the trip count static).
      Step indices reported to callbacks, and rows of `step_noise` [steps, ...], count from it.
    callback: a host function callback(i, t, x), run every `callback_steps` steps through an ordered
      `io_callback` (which, unlike `jax.debug.callback`, may run in a program split over devices);
      `timestep_stride` is the scheduler order, by which diffusers divides the step index it reports.
    on_step_end(i, t, x, cond) -> (x, cond): traced after each step (e.g. a host round trip through
      `io_callback` that may replace the latents or the conditioning).
    progress: a label: show a progress bar (tqdm, on stderr) advanced from the host after each step.
    layout: a `sharding.Layout`: the latents stay split over its batch axes from step to step.
    remat: recompute each step's activations in the backward pass (`jax.checkpoint` on the step), so a
      gradient through n steps keeps n latents and states, not n steps of activations. Host hooks
      (callback, on_step_end, progress) cannot be differentiated: leave them off with it.
    """
    n = state.timesteps.shape[0]
    tick = _progress_ticker(progress, n - start) if progress else None
    if remat and (callback is not None or on_step_end is not None or tick is not None):
        raise ValueError("host callbacks and progress bars cannot run in a differentiated (remat) loop")

    def body(i, carry):
        x, st, c = carry
        t = st.timesteps[i]
        x_in = scheduler.scale_model_input(st, x, t)
        out = model_fn(x_in, t) if cond is None else model_fn(x_in, t, c)
        noise = None if step_noise is None else step_noise[i - start]
        res = scheduler.step(st, out, t, x, key=jax.random.fold_in(key, i), noise=noise, **options)
        x = constrain(layout, res.prev_sample)
        if callback is not None:
            def report(i, t, x):
                if int(i) % callback_steps == 0:
                    callback(int(i) // timestep_stride, int(t), np.asarray(x))
            io_callback(report, None, i - start, t, x, ordered=True)
        if on_step_end is not None:
            x, c = on_step_end(i - start, t, x, c)
        if tick is not None:
            io_callback(tick, None, i - start, ordered=True)
        return x, res.state, c

    if remat:
        # No CSE barrier needed: inside a scan the recomputation cannot be merged with the forward pass.
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.fori_loop(start, n, body, (sample, state, cond))[0]


def _progress_ticker(label: str, total: int):
    """A host function advancing a progress bar that opens at step 0 and closes after the last step
    (a compiled loop calls the same function on every run, so the bar lives in this closure)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = []

    def tick(i):
        if int(i) == 0:
            bar[:] = [tqdm(total=total, desc=label, leave=False)]
        bar[0].update(1)
        if int(i) == total - 1:
            bar[0].close()

    return tick


def want_progress(progress_bar: bool | None) -> bool:
    """None (the default) shows progress bars when stderr is a terminal."""
    return sys.stderr.isatty() if progress_bar is None else bool(progress_bar)
