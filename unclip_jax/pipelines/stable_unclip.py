"""Stable unCLIP: text -> Karlo prior -> CLIP image embedding -> noise augmentation -> SD 2.1 unCLIP
UNet -> VAE (StableUnCLIPPipeline), and image -> CLIP vision embedding -> the same decoder
(StableUnCLIPImg2ImgPipeline), as diffusers computes them, channels-last.

A call is `prepare` (checks, prompt and image encoding, the initial random draws: host-side work) then
`sample` (pure: inputs -> images, differentiable) then post-processing (see `pipelines.base`). Each
sampling loop (the prior's and the decoder's) is one jit-compiled `lax.fori_loop`, cached per static
configuration (guidance on/off, host hooks, step counts, shapes, mesh): a second call with the same
configuration compiles nothing. Every random draw can be passed in (`prior_latents`, `image_embeds_noise`,
`latents`, and the schedulers' per-step noise `prior_step_noise` / `step_noise`); otherwise all
randomness comes from `key`.

Differentiating a sample, e.g. with respect to the image embedding:

    inputs, config = pipe.prepare(image, params=params, key=key, num_inference_steps=20)
    def loss(e):
        return jnp.mean(pipe.sample(params, inputs.replace(image_embeds=e), key, config=config) ** 2)
    g = jax.grad(loss)(inputs.image_embeds)

Each denoising step is rematerialised in the backward pass, so memory grows by one latent per step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from unclip_jax.image_processing import image_list
from unclip_jax.models.layers import timestep_embedding
from unclip_jax.pipelines.base import DiffusionPipeline, Inputs, host_hooks, typed_inputs
from unclip_jax.pipelines.checks import check_count, check_eta, check_finite_real, check_noise_level, check_size
from unclip_jax.pipelines.common import (
    NO_HOOKS,
    HostHooks,
    batch_size_of,
    chain_hooks,
    check_finite,
    check_key,
    check_random_input,
    encode_prompt,
    guidance_batch,
    guided_model,
    prepare_keys,
    progress_hook,
    report_hook,
    repeat_per_image,
    sampling_loop,
    step_kwargs,
    warn_if_nonfinite,
)
from unclip_jax.pipelines.loading import load_pipeline
from unclip_jax.sharding import constrain, replicate, shard_call
from unclip_jax.tokenizer import tokenize
from unclip_jax.weights.folder import PRIOR_COMPONENTS, PRIOR_LAYOUTS, prior_layout, read_model_index
from unclip_jax.weights.hub import resolve

DECODER_COMPONENTS = ("image_normalizer", "image_noising_scheduler", "tokenizer", "text_encoder", "unet",
                      "scheduler", "vae")

# The dim holding the batch rows of each batch-sized input (the rest are replicated on a mesh).
DECODER_BATCH_AXIS = {"image_embeds": 0, "image_embeds_noise": 0, "latents": 0, "prompt_embeds": 0,
                      "negative_prompt_embeds": 0, "step_noise": 1}
PRIOR_BATCH_AXIS = {"prior_latents": 0, "prior_text_embeds": 0, "prior_text_hidden": 0, "prior_text_mask": 0,
                    "prior_negative_text_embeds": 0, "prior_negative_text_hidden": 0,
                    "prior_negative_text_mask": 0, "prior_step_noise": 1}
PRIOR_TEXT = ("text_embeds", "text_hidden", "text_mask")


@typed_inputs
class UnCLIPInputs(Inputs):
    """What `prepare` gives `sample` (a frozen pytree: change a field with `.replace(name=value)`).

    The decoder's: latents [B, h, w, C]; prompt_embeds / negative_prompt_embeds [B, T, E] (the latter
    None without guidance); image_embeds [B, D] (the clean CLIP image embeddings; None for text-to-image,
    where the prior makes them); image_embeds_noise [B, D] (the noise `noise_level` mixes into them);
    noise_level; guidance_scale; step_noise [steps, B, h, w, C] or None (drawn from the key).
    The prior's (StableUnCLIPPipeline only): prior_latents [B, D]; prior_text_embeds [B, D],
    prior_text_hidden [B, T, D], prior_text_mask [B, T] of the prompt, and prior_negative_* of the empty
    prompt under prior guidance; prior_guidance_scale; prior_step_noise [prior_steps, B, D] or None.
    """

    BATCH_AXIS = {**PRIOR_BATCH_AXIS, **DECODER_BATCH_AXIS}

    latents: jax.Array
    prompt_embeds: jax.Array
    negative_prompt_embeds: jax.Array | None
    image_embeds: jax.Array | None
    image_embeds_noise: jax.Array
    noise_level: jax.Array
    guidance_scale: jax.Array
    step_noise: jax.Array | None = None
    prior_latents: jax.Array | None = None
    prior_text_embeds: jax.Array | None = None
    prior_text_hidden: jax.Array | None = None
    prior_text_mask: jax.Array | None = None
    prior_negative_text_embeds: jax.Array | None = None
    prior_negative_text_hidden: jax.Array | None = None
    prior_negative_text_mask: jax.Array | None = None
    prior_guidance_scale: jax.Array | None = None
    prior_step_noise: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.latents)[0])

    def prior_text(self, negative: bool = False) -> tuple:
        prefix = "prior_negative_" if negative else "prior_"
        return tuple(getattr(self, prefix + k) for k in PRIOR_TEXT)

    def prior_part(self) -> UnCLIPInputs:
        """The prior's fields alone (the rest None): what the prior's loop reads."""
        return self.replace(**{f.name: None for f in dataclasses.fields(self) if not f.name.startswith("prior_")})

    def decoder_part(self) -> UnCLIPInputs:
        """The decoder's fields alone (the prior's None): what the decoder's loop reads."""
        return self.replace(**{f.name: None for f in dataclasses.fields(self) if f.name.startswith("prior_")})


@dataclasses.dataclass(frozen=True)
class UnCLIPConfig:
    """The static part of a Stable unCLIP sample (changing it compiles anew); the rest are `inputs`.

    guidance: classifier-free guidance on (its scale is the input `guidance_scale`; diffusers turns it on
      for a scale above 1). output_type: "image" (VAE output [B, H, W, 3] in about [-1, 1]) or "latent".
    prior_*: the text-to-image prior's loop (StableUnCLIPPipeline only).
    """

    num_inference_steps: int = 20
    guidance: bool = True
    eta: float = 0.0
    output_type: str = "image"
    prior_num_inference_steps: int = 25
    prior_guidance: bool = True


class _UnCLIPDecoder(DiffusionPipeline):
    """What both Stable unCLIP pipelines share: prompt encoding, noise augmentation of the image
    embedding, the denoising loop and the VAE decode."""

    COMPONENTS: tuple[str, ...] = DECODER_COMPONENTS
    SAMPLE_MODELS: tuple[str, ...] = ("image_normalizer", "unet", "vae")
    INPUTS = UnCLIPInputs
    COMPILED = ("_decoder_loop", "_decode")
    BATCH_AXIS: dict[str, int] = DECODER_BATCH_AXIS

    def noise_image_embeddings(self, params, image_embeds, noise_level, noise=None, key=None):
        """Normalise, noise to `noise_level` with the image-noising scheduler, un-normalise, and append
        the sinusoidal embedding of `noise_level` (diffusers' `noise_image_embeddings`): [B, D] -> [B, 2D],
        the UNet's class labels. `noise` [B, D], or drawn from `key`. Pure (the decoder loop calls it)."""
        image_embeds = jnp.asarray(image_embeds, jnp.float32)
        if noise is None:
            if key is None:
                raise ValueError("give `noise` or `key`")
            noise = jax.random.normal(key, image_embeds.shape, jnp.float32)
        noise = check_random_input(noise, image_embeds.shape, "image_embeds_noise")
        b, d = image_embeds.shape
        levels = jnp.full((b,), noise_level, jnp.int32)
        norm = {"params": params["image_normalizer"]}
        x = self.image_normalizer.apply(norm, image_embeds, method="scale")
        x = self.image_noising_scheduler.add_noise(self.image_noising_scheduler.create_state(), x, noise, levels)
        x = self.image_normalizer.apply(norm, x, method="unscale")
        emb = timestep_embedding(levels, d, flip_sin_to_cos=True, freq_shift=0).astype(x.dtype)
        return jnp.concatenate([x, emb], axis=-1)

    # ------------------------------------------------------------------ the decoder's loop

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("do_cfg", "eta", "hooks", "layout"))
    def _decoder_loop(self, params, state, inputs: UnCLIPInputs, key, *, do_cfg, eta, hooks, layout=None):
        """Noised image embedding -> class labels; latents -> denoised latents (one fori_loop)."""
        labels = constrain(layout, self.noise_image_embeddings(params, inputs.image_embeds, inputs.noise_level,
                                                               noise=inputs.image_embeds_noise))
        embeds = guidance_batch((inputs.negative_prompt_embeds, jnp.zeros_like(labels)),
                                (inputs.prompt_embeds, labels), do_cfg)
        unet_params = params["unet"]
        # Conditioning closed over, not carried: a carry would be saved per step for the backward pass.
        model_fn = guided_model(lambda x, t: self.unet.apply({"params": unet_params}, x, t, *embeds),
                                inputs.guidance_scale, do_cfg)
        n = state.timesteps.shape[0]
        on_step_end = chain_hooks(
            report_hook(hooks.callback, hooks.callback_steps, self.scheduler.order) if hooks.callback else None,
            progress_hook("denoising", n) if hooks.progress else None)
        return sampling_loop(model_fn, self.scheduler, state, inputs.latents * state.init_noise_sigma, key=key,
                             step_noise=inputs.step_noise, step_options=step_kwargs(self.scheduler, eta),
                             on_step_end=on_step_end, layout=layout, remat=not hooks.any)

    def _sample_decoder(self, params, inputs: UnCLIPInputs, key, config, layout, hooks: HostHooks):
        """The decoder stage on placed inputs: latents, or the VAE output."""
        state = self.scheduler_state(self.scheduler, config.num_inference_steps, np.shape(inputs.latents))
        latents = self._decoder_loop(params, replicate(layout, state), inputs.decoder_part(), replicate(layout, key),
                                     do_cfg=config.guidance, eta=float(config.eta), hooks=hooks, layout=layout)
        warn_if_nonfinite(latents, "decoder (UNet loop)", given=inputs.image_embeds)
        return self._decode_checked(params, latents, config, layout)

    def _sample_placed(self, params, inputs, key, config, layout, hooks):
        return self._sample_decoder(params, inputs, key, config, layout, hooks)

    # ------------------------------------------------------------------ host-side preparation

    def _check_decoder_args(self, height, width, guidance_scale, num_inference_steps, noise_level, eta, key,
                            num_images_per_prompt):
        """(height, width), defaults filled in; errors before any work."""
        check_finite_real(guidance_scale, "guidance_scale")
        check_count(num_inference_steps, "num_inference_steps")
        check_count(num_images_per_prompt, "num_images_per_prompt")
        check_eta(eta)
        if key is not None:
            check_key(key)
        self.require(*DECODER_COMPONENTS)
        f = self.vae_scale_factor
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        check_size(height, width, f)
        check_noise_level(noise_level, self.image_noising_scheduler.config.num_train_timesteps)
        return height, width

    def _decoder_inputs(self, params, key, *, batch, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                        num_images_per_prompt, clip_skip, height, width, num_inference_steps, guidance_scale,
                        noise_level, latents, step_noise, image_embeds_noise, embed_dim) -> dict[str, Any]:
        """Encodes the prompts and draws what is not given: the decoder's inputs but `image_embeds`, for
        arguments that `_check_decoder_args` passed."""
        f = self.vae_scale_factor
        shape = (batch, height // f, width // f, self.unet.config.in_channels)
        latents = check_random_input(latents, shape, "latents")
        n = int(self.scheduler_state(self.scheduler, num_inference_steps, shape).timesteps.shape[0])
        step_noise = check_random_input(step_noise, (n,) + shape, "step_noise")
        image_embeds_noise = check_random_input(image_embeds_noise, (batch, embed_dim), "image_embeds_noise")
        k_latents, k_embed_noise = jax.random.split(key)
        if latents is None:
            latents = jax.random.normal(k_latents, shape, jnp.float32)
        if image_embeds_noise is None:
            image_embeds_noise = jax.random.normal(k_embed_noise, (batch, embed_dim), jnp.float32)
        pe, npe = encode_prompt(
            self.text_encoder, params["text_encoder"], self.tokenizer, prompt,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        return dict(latents=latents, prompt_embeds=pe, negative_prompt_embeds=npe,
                    image_embeds_noise=image_embeds_noise, step_noise=step_noise,
                    guidance_scale=jnp.float32(guidance_scale), noise_level=jnp.int32(noise_level))

    def __call__(self, *args, params: dict[str, Any], key: jax.Array | None = None, mesh=None,
                 output_type: str = "pil", return_dict: bool = True, callback=None, callback_steps: int = 1,
                 progress_bar: bool | None = None, cross_attention_kwargs=None, **kwargs):
        """Generates images: `prepare(*args, params=params, key=key, **kwargs)` (see it for the arguments),
        then `sample`, then post-processing.

        mesh: a `jax.sharding.Mesh` with a `data` axis (and optionally `fsdp`): the batch is split over it
          (see `unclip_jax.sharding`); None runs on one device.
        output_type: "pil", "np" (float32 [B, H, W, 3] in [0, 1]) or "latent".
        callback(i, t, latents): a host function called every `callback_steps` steps of each loop (the
          prior's, then the decoder's). progress_bar (default: when stderr is a terminal): shows the steps
          of each compiled loop.
        cross_attention_kwargs: as in diffusers, only its `scale`: the weight of the active unfused LoRA
          adapters (`load_lora_weights`), on the UNet and the text encoder (default 1.0).
        """
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        return self._call(args, kwargs, params=params, key=key, mesh=mesh, output_type=output_type,
                          return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
                          hooks=host_hooks(callback, callback_steps, progress_bar=progress_bar))


def load_prior(path_or_repo_id: str, *, dtype=jnp.float32, local_files_only: bool = False,
               cache_dir: str | None = None, sharding=None, revision: str | None = None):
    """The prior components of a Karlo (UnCLIPPipeline) or Stable unCLIP checkpoint, as
    `StableUnCLIPPipeline.from_pretrained` overrides: (overrides, {name: (component folder, model_index
    entry)}). Karlo's UnCLIPScheduler becomes a DDPMScheduler with its config, as in diffusers' recipe."""
    from unclip_jax.schedulers import scheduler_from_config  # noqa: PLC0415

    every = tuple(sorted({n for layout in PRIOR_LAYOUTS.values() for n in layout.values()}))
    folder = resolve(path_or_repo_id, every, revision=revision, local_files_only=local_files_only,
                     cache_dir=cache_dir)
    layout = prior_layout(folder)
    index = read_model_index(folder)
    comps, params = load_pipeline(folder, tuple(layout.values()), dtype=dtype, sharding=sharding)
    overrides = {ours: (comps[theirs], params[theirs]) if theirs in params else comps[theirs]
                 for ours, theirs in layout.items()}
    scheduler = overrides["prior_scheduler"]
    if type(scheduler).__name__ == "UnCLIPScheduler":
        config = {"_class_name": "UnCLIPScheduler", **dataclasses.asdict(scheduler.config)}
        overrides["prior_scheduler"] = scheduler_from_config(config, class_name="DDPMScheduler")
    return overrides, {ours: (os.path.join(folder, theirs), index[theirs]) for ours, theirs in layout.items()}


class StableUnCLIPPipeline(_UnCLIPDecoder):
    """Text-to-image Stable unCLIP: a Stable unCLIP decoder with a prior, e.g.
    `from_pretrained("stabilityai/stable-diffusion-2-1-unclip-small", prior="kakaobrain/karlo-v1-alpha")`."""

    COMPONENTS = PRIOR_COMPONENTS + DECODER_COMPONENTS
    SAMPLE_MODELS = ("prior",) + _UnCLIPDecoder.SAMPLE_MODELS
    COMPILED = ("_prior_loop", "_encode_prior_prompt") + _UnCLIPDecoder.COMPILED
    BATCH_AXIS = {**PRIOR_BATCH_AXIS, **DECODER_BATCH_AXIS}

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, prior: str | None = None, **kwargs):
        """As `PipelineBase.from_pretrained`; `prior`: a folder or repo id to take the prior from (its
        tokenizer, text encoder, prior and scheduler), as diffusers' Stable unCLIP recipe assembles
        Karlo's prior with a decoder-only checkpoint such as stable-diffusion-2-1-unclip-small.
        `dtype`, `local_files_only`, `cache_dir` and `sharding` apply to both checkpoints."""
        if prior is None:
            return super().from_pretrained(path_or_repo_id, **kwargs)
        where = {k: kwargs[k] for k in ("dtype", "local_files_only", "cache_dir", "sharding") if k in kwargs}
        overrides, foreign = load_prior(prior, **where)
        pipe, params = super().from_pretrained(path_or_repo_id, **kwargs, **overrides)
        pipe._foreign.update(foreign)
        return pipe, params

    @classmethod
    def from_single_file(cls, path: str, *, prior: str | None = None, **kwargs):
        """As `PipelineBase.from_single_file` (a decoder-only sd21-unclip-h/-l file); `prior`: a folder or
        repo id to take the prior from, as in `from_pretrained`."""
        if prior is None:
            return super().from_single_file(path, **kwargs)
        where = {k: kwargs[k] for k in ("dtype", "local_files_only", "cache_dir") if k in kwargs}
        overrides, foreign = load_prior(prior, **where)
        pipe, params = super().from_single_file(path, **kwargs, **overrides)
        pipe._foreign.update(foreign)
        return pipe, params

    # ------------------------------------------------------------------ the prior's loop

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_prior_prompt(self, params, ids):
        out = self.prior_text_encoder.apply({"params": params["prior_text_encoder"]}, ids)
        return out.embeds, out.last_hidden_state

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("do_cfg", "hooks", "layout"))
    def _prior_loop(self, params, state, inputs: UnCLIPInputs, key, *, do_cfg, hooks, layout=None):
        """Prior latents -> CLIP image embeddings [B, D] (one fori_loop, then the prior's post-processing)."""
        prior_params = params["prior"]
        text = guidance_batch(inputs.prior_text(negative=True) if do_cfg else None, inputs.prior_text(), do_cfg)
        model_fn = guided_model(lambda x, t: self.prior.apply({"params": prior_params}, x, t, *text),
                                inputs.prior_guidance_scale, do_cfg)
        on_step_end = chain_hooks(
            report_hook(hooks.callback, hooks.callback_steps) if hooks.callback else None,
            progress_hook("prior", state.timesteps.shape[0]) if hooks.progress else None)
        latents = sampling_loop(model_fn, self.prior_scheduler, state, inputs.prior_latents * state.init_noise_sigma,
                                key=key, step_noise=inputs.prior_step_noise, on_step_end=on_step_end,
                                layout=layout, remat=not hooks.any)
        return constrain(layout, self.prior.apply({"params": prior_params}, latents, method="post_process_latents"))

    def _sample_prior(self, params, inputs: UnCLIPInputs, key, config, layout, hooks: HostHooks):
        """The prior stage on placed inputs: CLIP image embeddings [B, D]."""
        state = self.scheduler_state(self.prior_scheduler, config.prior_num_inference_steps,
                                     np.shape(inputs.prior_latents))
        embeds = self._prior_loop(params, replicate(layout, state), inputs.prior_part(), replicate(layout, key),
                                  do_cfg=config.prior_guidance, hooks=hooks, layout=layout)
        warn_if_nonfinite(embeds, "prior", given=inputs.prior_latents)
        return embeds

    def _sample_placed(self, params, inputs, key, config, layout, hooks):
        k_prior, k_decoder = jax.random.split(key)
        embeds = self._sample_prior(params, inputs, k_prior, config, layout, hooks)
        return self._sample_decoder(params, inputs.replace(image_embeds=embeds), k_decoder, config, layout, hooks)

    def sample_prior(self, params, inputs: UnCLIPInputs, key: jax.Array, *, config: UnCLIPConfig, mesh=None):
        """The prior alone: inputs (see `prepare`) -> CLIP image embeddings [B, D] (what `sample` feeds
        the decoder; `key` as there). Pure and differentiable."""
        batch = int(np.shape(inputs.prior_latents)[0])
        layout, params, placed = shard_call(mesh, params, ("prior",), inputs.prior_part().as_dict(), PRIOR_BATCH_AXIS,
                                            batch)
        out = self._sample_prior(params, UnCLIPInputs.from_dict(placed), jax.random.split(key)[0], config, layout,
                                 NO_HOOKS)
        return out if out.shape[0] == batch else out[:batch]

    def prepare(
        self,
        prompt=None,
        *,
        params: dict[str, Any],
        key: jax.Array | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 10.0,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        noise_level: int = 0,
        prior_num_inference_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        prior_latents=None,
        clip_skip: int | None = None,
        image_embeds_noise=None,
        prior_step_noise=None,
        step_noise=None,
    ) -> tuple[UnCLIPInputs, UnCLIPConfig]:
        """Checks the arguments (those of diffusers' StableUnCLIPPipeline), encodes the prompts with both
        text encoders and draws every random input not given: (inputs, config) for `sample`.

        Beyond diffusers: `key` (a `jax.random.key`, the only source of randomness), `image_embeds_noise`
        [B, D] (the noise `noise_level` mixes into the image embedding), `prior_step_noise`
        [prior_steps, B, D] and `step_noise` [steps, B, h, w, C] (the schedulers' per-step noise).
        `prompt` is needed: the prior reads it (as in diffusers, where `prompt_embeds` only feeds the decoder).
        See `UnCLIPInputs` for what the inputs hold.
        """
        height, width = self._check_decoder_args(height, width, guidance_scale, num_inference_steps, noise_level, eta,
                                                 key, num_images_per_prompt)
        check_finite_real(prior_guidance_scale, "prior_guidance_scale")
        check_count(prior_num_inference_steps, "prior_num_inference_steps")
        self.require(*PRIOR_COMPONENTS)
        batch = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        if prompt is None:
            raise ValueError("prompt is needed: the prior is conditioned on it (prompt_embeds only feed the decoder)")
        if key is None:
            if prior_latents is None or latents is None or image_embeds_noise is None:
                raise ValueError("give `key`, or every random input (prior_latents, image_embeds_noise, latents)")
        dim = self.prior.config.embedding_dim
        prior_latents = check_random_input(prior_latents, (batch, dim), "prior_latents")
        n_prior = int(self.scheduler_state(self.prior_scheduler, prior_num_inference_steps,
                                           (batch, dim)).timesteps.shape[0])
        prior_step_noise = check_random_input(prior_step_noise, (n_prior, batch, dim), "prior_step_noise")
        self.check_params(params, ("prior_text_encoder", "text_encoder") + self.SAMPLE_MODELS)
        k_prior, k_decoder = prepare_keys(key, 2)
        inputs = self._decoder_inputs(
            params, k_decoder, batch=batch, prompt=prompt, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, noise_level=noise_level,
            latents=latents, step_noise=step_noise, image_embeds_noise=image_embeds_noise, embed_dim=dim)

        # The prior, on the prior tokenizer's prompt, with guidance against the empty prompt.
        prior_cfg = prior_guidance_scale > 1.0
        ids, mask = tokenize(self.prior_tokenizer, prompt)
        n_prompts = ids.shape[0]
        if prior_cfg:
            uids, umask = tokenize(self.prior_tokenizer, [""] * n_prompts)
            ids, mask = np.concatenate([ids, uids]), np.concatenate([mask, umask])
        proj, hidden = self._encode_prior_prompt(params, ids)
        for k, x in zip(PRIOR_TEXT, (proj, hidden, jnp.asarray(mask.astype(bool)))):
            inputs["prior_" + k] = repeat_per_image(x[:n_prompts], num_images_per_prompt)
            inputs["prior_negative_" + k] = repeat_per_image(x[n_prompts:], num_images_per_prompt) if prior_cfg else None
        if prior_latents is None:
            prior_latents = jax.random.normal(k_prior, (batch, dim), jnp.float32)
        inputs = UnCLIPInputs(**inputs, image_embeds=None, prior_latents=prior_latents,
                              prior_guidance_scale=jnp.float32(prior_guidance_scale), prior_step_noise=prior_step_noise)
        config = UnCLIPConfig(num_inference_steps=num_inference_steps, guidance=guidance_scale > 1.0, eta=float(eta),
                              prior_num_inference_steps=prior_num_inference_steps, prior_guidance=prior_cfg)
        return inputs, config


class StableUnCLIPImg2ImgPipeline(_UnCLIPDecoder):
    """Image variations with Stable unCLIP (stabilityai/stable-diffusion-2-1-unclip)."""

    COMPONENTS = ("feature_extractor", "image_encoder") + DECODER_COMPONENTS
    COMPILED = ("_encode_pixels",) + _UnCLIPDecoder.COMPILED

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_pixels(self, params, pixels):
        return self.image_encoder.apply({"params": params["image_encoder"]}, pixels).embeds

    def encode_image(self, params, image) -> jax.Array:
        """Images (PIL of any mode, a list, or [B, H, W, C] arrays with 1, 3 or 4 channels, uint8 or float
        in [0, 1]) -> CLIP image embeddings [B, D]."""
        self.require("feature_extractor", "image_encoder")
        return self._encode_pixels(params, jnp.asarray(self.feature_extractor(image)))

    def prepare(
        self,
        image=None,
        prompt="",
        *,
        params: dict[str, Any],
        key: jax.Array | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 10.0,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        noise_level: int = 0,
        image_embeds=None,
        clip_skip: int | None = None,
        image_embeds_noise=None,
        step_noise=None,
    ) -> tuple[UnCLIPInputs, UnCLIPConfig]:
        """Checks the arguments (variations of `image`, or of given CLIP `image_embeds` [B, D], guided by
        `prompt`: those of diffusers' StableUnCLIPImg2ImgPipeline), encodes prompt and image and draws
        every random input not given: (inputs, config) for `sample` (see `UnCLIPInputs`).

        As diffusers: the embedding of a single PIL image is repeated to the whole batch (prompts x
        num_images_per_prompt); the embeddings of a list or array of images are repeated
        num_images_per_prompt times each. Unlike diffusers, `clip_skip` is applied (diffusers accepts
        and ignores it here).
        """
        height, width = self._check_decoder_args(height, width, guidance_scale, num_inference_steps, noise_level, eta,
                                                 key, num_images_per_prompt)
        if prompt_embeds is not None and prompt == "":
            prompt = None  # the default prompt yields to given embeddings
        batch = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        if (image is None) == (image_embeds is None):
            raise ValueError("give exactly one of `image` and `image_embeds`")
        if key is None:
            if latents is None or image_embeds_noise is None:
                raise ValueError("give `key`, or every random input (image_embeds_noise, latents)")
        dim = self.image_normalizer.config.embedding_dim
        repeat = batch if isinstance(image, PIL.Image.Image) else num_images_per_prompt
        if image_embeds is None:
            n_images = len(image_list(image))  # type and shape errors before any work
        else:
            image_embeds = jnp.asarray(image_embeds, jnp.float32)
            if image_embeds.ndim != 2 or image_embeds.shape[1] != dim:
                raise ValueError(f"`image_embeds` must be [B, {dim}] (the CLIP image embedding width of this "
                                 f"model); got shape {tuple(image_embeds.shape)}")
            check_finite(image_embeds, "image_embeds")
            n_images = image_embeds.shape[0]
        if n_images * repeat != batch:
            raise ValueError(f"{n_images} image(s) for {batch // num_images_per_prompt} "
                             "prompt(s): give one image, or one per prompt")
        image_embeds_noise = check_random_input(image_embeds_noise, (n_images, dim), "image_embeds_noise")
        needed = ("text_encoder",) + self.SAMPLE_MODELS
        self.check_params(params, needed + (("image_encoder",) if image_embeds is None else ()))
        if image_embeds is None:
            image_embeds = self.encode_image(params, image)
        k_draw, k_embed_noise = prepare_keys(key, 2)
        # As diffusers, one noise draw per image, shared by the rows that repeat it.
        if image_embeds_noise is None:
            image_embeds_noise = jax.random.normal(k_embed_noise, image_embeds.shape, jnp.float32)
        inputs = self._decoder_inputs(
            params, k_draw, batch=batch, prompt=prompt, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, noise_level=noise_level,
            latents=latents, step_noise=step_noise, image_embeds_noise=repeat_per_image(image_embeds_noise, repeat),
            embed_dim=dim)
        inputs = UnCLIPInputs(**inputs, image_embeds=repeat_per_image(image_embeds, repeat))
        return inputs, UnCLIPConfig(num_inference_steps=num_inference_steps, guidance=guidance_scale > 1.0,
                                    eta=float(eta))
