"""Stable unCLIP: text -> Karlo prior -> CLIP image embedding -> noise augmentation -> SD 2.1 unCLIP
UNet -> VAE (StableUnCLIPPipeline), and image -> CLIP vision embedding -> the same decoder
(StableUnCLIPImg2ImgPipeline), as diffusers computes them, channels-last.

A call is `prepare` (checks, prompt and image encoding, the initial random draws: host-side work) then
`sample` (pure: inputs -> images, differentiable) then post-processing. Each sampling loop (the prior's and
the decoder's) is one jit-compiled `lax.fori_loop`, cached per static configuration (guidance on/off,
callback, step counts, shapes, mesh): a second call with the same configuration compiles nothing. Every
random draw can be passed in (`prior_latents`, `image_embeds_noise`, `latents`, and the schedulers'
per-step noise `prior_step_noise` / `step_noise`); otherwise all randomness comes from `key`.

Differentiating a sample, e.g. with respect to the image embedding:

    inputs, config = pipe.prepare(image, params=params, key=key, num_inference_steps=20)
    def loss(e):
        return jnp.mean(pipe.sample(params, {**inputs, "image_embeds": e}, key, config=config) ** 2)
    g = jax.grad(loss)(inputs["image_embeds"])

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

from unclip_jax.image_processing import image_list
from unclip_jax.models.layers import timestep_embedding
from unclip_jax.pipelines.common import (
    ImagePipelineOutput,
    batch_size_of,
    cfg_batch,
    check_output_type,
    check_random_input,
    encode_prompt,
    guide,
    postprocess,
    repeat_per_image,
    sampling_loop,
    step_kwargs,
    want_progress,
    with_lora,
)
from unclip_jax.lora import LoraLoaderMixin
from unclip_jax.pipelines.checks import check_count, check_eta, check_finite_real, check_noise_level, check_size
from unclip_jax.pipelines.loading import PipelineBase, load_pipeline
from unclip_jax.sharding import constrain, replicate, shard_call
from unclip_jax.textual_inversion import TextualInversionLoaderMixin
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


class _UnCLIPDecoder(LoraLoaderMixin, TextualInversionLoaderMixin, PipelineBase):
    """What both Stable unCLIP pipelines share: prompt encoding, noise augmentation of the image
    embedding, the denoising loop and the VAE decode."""

    COMPONENTS: tuple[str, ...] = DECODER_COMPONENTS
    SAMPLE_MODELS: tuple[str, ...] = ("image_normalizer", "unet", "vae")
    BATCH_AXIS: dict[str, int] = DECODER_BATCH_AXIS

    def __init__(self, **components):
        super().__init__(**components)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ compiled pieces

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("layout",))
    def _noise_embeds(self, params, image_embeds, noise, noise_level, *, layout=None):
        b, d = image_embeds.shape
        levels = jnp.full((b,), noise_level, jnp.int32)
        norm = params["image_normalizer"]
        x = self.image_normalizer.apply({"params": norm}, image_embeds, method="scale")
        state = self.image_noising_scheduler.create_state()
        x = self.image_noising_scheduler.add_noise(state, x, noise, levels)
        x = self.image_normalizer.apply({"params": norm}, x, method="unscale")
        emb = timestep_embedding(levels, d, flip_sin_to_cos=True, freq_shift=0).astype(x.dtype)
        return constrain(layout, jnp.concatenate([x, emb], axis=-1))

    def noise_image_embeddings(self, params, image_embeds, noise_level: int, noise=None, key=None):
        """Normalise, noise to `noise_level` with the image-noising scheduler, un-normalise, and append
        the sinusoidal embedding of `noise_level` (diffusers' `noise_image_embeddings`). [B, D] -> [B, 2D]."""
        image_embeds = jnp.asarray(image_embeds, jnp.float32)
        if noise is None:
            noise = jax.random.normal(key, image_embeds.shape, jnp.float32)
        noise = check_random_input(noise, image_embeds.shape, "image_embeds_noise")
        return self._noise_embeds(params, image_embeds, noise, int(noise_level))

    @functools.partial(jax.jit, static_argnums=(0,),
                       static_argnames=("do_cfg", "callback", "callback_steps", "eta", "progress", "layout", "remat"))
    def _denoise(self, params, state, latents, prompt_embeds, negative_prompt_embeds, class_labels, guidance_scale,
                 key, step_noise, *, do_cfg, callback, callback_steps, eta, progress, layout=None, remat=False):
        unet_params = params["unet"]
        if do_cfg:
            prompt_embeds = cfg_batch(negative_prompt_embeds, prompt_embeds)
            class_labels = cfg_batch(jnp.zeros_like(class_labels), class_labels)

        def model_fn(x, t):
            x_in = cfg_batch(x, x) if do_cfg else x
            out = self.unet.apply({"params": unet_params}, x_in, t, prompt_embeds, class_labels)
            return guide(out, guidance_scale) if do_cfg else out

        return sampling_loop(model_fn, self.scheduler, state, latents * state.init_noise_sigma, key, step_noise,
                             step_kwargs(self.scheduler, eta), callback, callback_steps, self.scheduler.order,
                             progress="denoising" if progress else None, layout=layout, remat=remat)

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("layout",))
    def _decode(self, params, latents, *, layout=None):
        scale = self.vae.config.scaling_factor
        return constrain(layout, self.vae.apply({"params": params["vae"]}, latents / scale, method="decode"))

    def _sample_decoder(self, params, inputs, key, config, layout, callback, callback_steps, progress):
        """The decoder on prepared (on a mesh: padded and placed) inputs."""
        latents = inputs["latents"]
        state = self.scheduler.set_timesteps(self.scheduler.create_state(), config.num_inference_steps,
                                             shape=latents.shape)
        labels = self._noise_embeds(params, inputs["image_embeds"], inputs["image_embeds_noise"],
                                    inputs["noise_level"], layout=layout)
        latents = self._denoise(params, replicate(layout, state), latents, inputs["prompt_embeds"],
                                inputs["negative_prompt_embeds"] if config.guidance else None, labels,
                                inputs["guidance_scale"], replicate(layout, key), inputs["step_noise"],
                                do_cfg=config.guidance, callback=callback, callback_steps=callback_steps,
                                eta=float(config.eta), progress=progress, layout=layout,
                                remat=callback is None and not progress)
        return latents if config.output_type == "latent" else self._decode(params, latents, layout=layout)

    def _sample(self, params, inputs, key, config, mesh, callback=None, callback_steps=1, progress=False):
        batch = int(np.shape(inputs["latents"])[0])
        layout, params, inputs = shard_call(mesh, params, self.SAMPLE_MODELS, inputs, self.BATCH_AXIS, batch)
        out = self._sample_prepared(params, inputs, key, config, layout, callback, callback_steps, progress)
        return out if out.shape[0] == batch else out[:batch]

    def sample(self, params, inputs: dict[str, Any], key: jax.Array, *, config: UnCLIPConfig, mesh=None):
        """inputs (see `prepare`) -> the VAE output [B, H, W, 3] (about [-1, 1], unclipped), or the final
        latents [B, h, w, C] for `config.output_type == "latent"`. Pure and differentiable (with respect to
        latents, embeddings, noise and params); `key` draws only the schedulers' per-step noise. On a
        `mesh` the batch is split over it (see `sharding`); any batch size works (padded, then trimmed)."""
        return self._sample(params, inputs, key, config, mesh)

    # ------------------------------------------------------------------ host-side preparation

    def _check_decoder_args(self, height, width, guidance_scale, num_inference_steps, noise_level, eta):
        """(height, width), defaults filled in; errors before any work."""
        check_finite_real(guidance_scale, "guidance_scale")
        check_count(num_inference_steps, "num_inference_steps")
        check_eta(eta)
        f = self.vae_scale_factor
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        check_size(height, width, f)
        check_noise_level(noise_level, self.image_noising_scheduler.config.num_train_timesteps)
        return height, width

    def _decoder_inputs(self, params, key, *, batch, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                        num_images_per_prompt, clip_skip, height, width, num_inference_steps, guidance_scale,
                        noise_level, latents, step_noise, image_embeds_noise, embed_dim):
        """Encodes the prompts and draws what is not given: the decoder's inputs (all but `image_embeds`),
        for arguments that `_check_decoder_args` passed."""
        f = self.vae_scale_factor
        shape = (batch, height // f, width // f, self.unet.config.in_channels)
        latents = check_random_input(latents, shape, "latents")
        n = int(self.scheduler.set_timesteps(self.scheduler.create_state(), num_inference_steps,
                                             shape=shape).timesteps.shape[0])
        step_noise = check_random_input(step_noise, (n,) + shape, "step_noise")
        image_embeds_noise = check_random_input(image_embeds_noise, (batch, embed_dim), "image_embeds_noise")
        k_latents, k_embed_noise = jax.random.split(key)
        if latents is None:
            latents = jax.random.normal(k_latents, shape, jnp.float32)
        if image_embeds_noise is None:
            image_embeds_noise = jax.random.normal(k_embed_noise, (batch, embed_dim), jnp.float32)
        do_cfg = guidance_scale > 1.0
        pe, npe = encode_prompt(
            self.text_encoder, params["text_encoder"], self.tokenizer, prompt,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        return {"latents": latents, "prompt_embeds": pe, "negative_prompt_embeds": npe,
                "image_embeds_noise": image_embeds_noise, "step_noise": step_noise,
                "guidance_scale": jnp.float32(guidance_scale), "noise_level": jnp.int32(noise_level)}

    def _run(self, args, kwargs, *, params, key, mesh, output_type, return_dict, callback, callback_steps,
             progress_bar, cross_attention_kwargs):
        """What `__call__` does: prepare, sample (with the host hooks), post-process."""
        check_output_type(output_type)
        check_count(callback_steps, "callback_steps")
        params = with_lora(params, cross_attention_kwargs)
        inputs, config = self.prepare(*args, params=params, key=key, **kwargs)
        if output_type == "latent":
            config = dataclasses.replace(config, output_type="latent")
        images = self._sample(params, inputs, _step_key(key), config, mesh, callback, callback_steps,
                              want_progress(progress_bar))
        images = postprocess(images, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

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
        return self._run(args, kwargs, params=params, key=key, mesh=mesh, output_type=output_type,
                         return_dict=return_dict, callback=callback, callback_steps=callback_steps,
                         progress_bar=progress_bar, cross_attention_kwargs=cross_attention_kwargs)


def _draw_key(key):
    """The key of `prepare`'s draws: kept apart from the per-step draws of `sample`, which get `key` itself."""
    return jax.random.fold_in(key, 1)


def _step_key(key):
    """`sample`'s key in `__call__` (key None: every draw was given; the per-step ones, if any, use key 0)."""
    return jax.random.key(0) if key is None else key


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
    SAMPLE_MODELS = ("prior",) + _UnCLIPDecoder.SAMPLE_MODELS
    BATCH_AXIS = {**PRIOR_BATCH_AXIS, **DECODER_BATCH_AXIS}

    @functools.partial(jax.jit, static_argnums=(0,),
                       static_argnames=("do_cfg", "callback", "callback_steps", "progress", "layout", "remat"))
    def _prior_sample(self, params, state, latents, text, negative, guidance_scale, key, step_noise, *,
                      do_cfg, callback, callback_steps, progress, layout=None, remat=False):
        prior_params = params["prior"]
        proj, hidden, mask = (cfg_batch(u, c) for u, c in zip(negative, text)) if do_cfg else text

        def model_fn(x, t):
            x_in = cfg_batch(x, x) if do_cfg else x
            out = self.prior.apply({"params": prior_params}, x_in, t, proj, hidden, mask)
            return guide(out, guidance_scale) if do_cfg else out

        latents = sampling_loop(model_fn, self.prior_scheduler, state, latents * state.init_noise_sigma, key,
                                step_noise, {}, callback, callback_steps, 1, progress="prior" if progress else None,
                                layout=layout, remat=remat)
        return constrain(layout, self.prior.apply({"params": prior_params}, latents, method="post_process_latents"))

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_prior_prompt(self, params, ids):
        out = self.prior_text_encoder.apply({"params": params["prior_text_encoder"]}, ids)
        return out.embeds, out.last_hidden_state

    def _sample_prior(self, params, inputs, key, config, layout, callback, callback_steps, progress):
        latents = inputs["prior_latents"]
        state = self.prior_scheduler.set_timesteps(self.prior_scheduler.create_state(),
                                                   config.prior_num_inference_steps, shape=latents.shape)
        text = tuple(inputs["prior_" + k] for k in PRIOR_TEXT)
        negative = tuple(inputs["prior_negative_" + k] for k in PRIOR_TEXT) if config.prior_guidance else None
        return self._prior_sample(params, replicate(layout, state), latents, text, negative,
                                  inputs["prior_guidance_scale"], replicate(layout, key), inputs["prior_step_noise"],
                                  do_cfg=config.prior_guidance, callback=callback, callback_steps=callback_steps,
                                  progress=progress, layout=layout, remat=callback is None and not progress)

    def _sample_prepared(self, params, inputs, key, config, layout, callback, callback_steps, progress):
        k_prior, k_decoder = jax.random.split(key)
        embeds = self._sample_prior(params, inputs, k_prior, config, layout, callback, callback_steps, progress)
        return self._sample_decoder(params, {**inputs, "image_embeds": embeds}, k_decoder, config, layout,
                                    callback, callback_steps, progress)

    def sample_prior(self, params, inputs: dict[str, Any], key: jax.Array, *, config: UnCLIPConfig, mesh=None):
        """The prior alone: inputs (see `prepare`) -> CLIP image embeddings [B, D] (what `sample` feeds
        the decoder; `key` as there). Pure and differentiable."""
        batch = int(np.shape(inputs["prior_latents"])[0])
        layout, params, inputs = shard_call(mesh, params, ("prior",), inputs, PRIOR_BATCH_AXIS, batch)
        out = self._sample_prior(params, inputs, jax.random.split(key)[0], config, layout, None, 1, False)
        return out if out.shape[0] == batch else out[:batch]

    def sample_decoder(self, params, inputs: dict[str, Any], key: jax.Array, *, config: UnCLIPConfig, mesh=None):
        """The decoder alone, from given CLIP image embeddings `inputs["image_embeds"]` [B, D] (the prior
        inputs are ignored): differentiable with respect to them."""
        decoder = {k: v for k, v in inputs.items() if not k.startswith("prior_")}
        batch = int(np.shape(inputs["latents"])[0])
        layout, params, decoder = shard_call(mesh, params, _UnCLIPDecoder.SAMPLE_MODELS, decoder, DECODER_BATCH_AXIS,
                                             batch)
        out = self._sample_decoder(params, decoder, jax.random.split(key)[1], config, layout, None, 1, False)
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
    ) -> tuple[dict[str, Any], UnCLIPConfig]:
        """Checks the arguments (those of diffusers' StableUnCLIPPipeline), encodes the prompts with both
        text encoders and draws every random input not given: (inputs, config) for `sample`.

        Beyond diffusers: `key` (a `jax.random.key`, the only source of randomness), `image_embeds_noise`
        [B, D] (the noise `noise_level` mixes into the image embedding), `prior_step_noise`
        [prior_steps, B, D] and `step_noise` [steps, B, h, w, C] (the schedulers' per-step noise).
        `prompt` is needed: the prior reads it (as in diffusers, where `prompt_embeds` only feeds the decoder).

        inputs: prior_latents [B, D]; prior_text_embeds [B, D], prior_text_hidden [B, T, D], prior_text_mask
        [B, T] (and prior_negative_* of the empty prompt under prior guidance); prior_guidance_scale;
        prior_step_noise; then the decoder's: latents [B, h, w, C], prompt_embeds / negative_prompt_embeds
        [B, T, E], image_embeds_noise [B, D], noise_level, guidance_scale, step_noise.
        """
        height, width = self._check_decoder_args(height, width, guidance_scale, num_inference_steps, noise_level, eta)
        check_finite_real(prior_guidance_scale, "prior_guidance_scale")
        check_count(prior_num_inference_steps, "prior_num_inference_steps")
        check_count(num_images_per_prompt, "num_images_per_prompt")
        batch = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        if prompt is None:
            raise ValueError("prompt is needed: the prior is conditioned on it (prompt_embeds only feed the decoder)")
        if key is None:
            if prior_latents is None or latents is None or image_embeds_noise is None:
                raise ValueError("give `key`, or every random input (prior_latents, image_embeds_noise, latents)")
        k_prior, k_decoder = jax.random.split(_draw_key(_step_key(key)))
        dim = self.prior.config.embedding_dim
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
        pstate = self.prior_scheduler.set_timesteps(self.prior_scheduler.create_state(), prior_num_inference_steps,
                                                    shape=(batch, dim))
        prior_latents = check_random_input(prior_latents, (batch, dim), "prior_latents")
        if prior_latents is None:
            prior_latents = jax.random.normal(k_prior, (batch, dim), jnp.float32)
        n_prior = int(pstate.timesteps.shape[0])
        inputs.update(prior_latents=prior_latents, prior_guidance_scale=jnp.float32(prior_guidance_scale),
                      prior_step_noise=check_random_input(prior_step_noise, (n_prior, batch, dim), "prior_step_noise"))
        config = UnCLIPConfig(num_inference_steps=num_inference_steps, guidance=guidance_scale > 1.0, eta=float(eta),
                              prior_num_inference_steps=prior_num_inference_steps, prior_guidance=prior_cfg)
        return inputs, config


class StableUnCLIPImg2ImgPipeline(_UnCLIPDecoder):
    """Image variations with Stable unCLIP (stabilityai/stable-diffusion-2-1-unclip)."""

    COMPONENTS = ("feature_extractor", "image_encoder") + DECODER_COMPONENTS

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_pixels(self, params, pixels):
        return self.image_encoder.apply({"params": params["image_encoder"]}, pixels).embeds

    def encode_image(self, params, image) -> jax.Array:
        """Images (PIL, list, or [B, H, W, 3] in [0, 1] / uint8) -> CLIP image embeddings [B, D]."""
        return self._encode_pixels(params, jnp.asarray(self.feature_extractor(image)))

    def _sample_prepared(self, params, inputs, key, config, layout, callback, callback_steps, progress):
        return self._sample_decoder(params, inputs, key, config, layout, callback, callback_steps, progress)

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
    ) -> tuple[dict[str, Any], UnCLIPConfig]:
        """Checks the arguments (variations of `image`, or of given CLIP `image_embeds` [B, D], guided by
        `prompt`: those of diffusers' StableUnCLIPImg2ImgPipeline), encodes prompt and image and draws
        every random input not given: (inputs, config) for `sample`.

        inputs: image_embeds [B, D] (the clean CLIP image embeddings, one per batch row), image_embeds_noise
        [B, D], noise_level, latents [B, h, w, C], prompt_embeds / negative_prompt_embeds [B, T, E],
        guidance_scale, step_noise.

        As diffusers: the embedding of a single PIL image is repeated to the whole batch (prompts x
        num_images_per_prompt); the embeddings of a list or array of images are repeated
        num_images_per_prompt times each. Unlike diffusers, `clip_skip` is applied (diffusers accepts
        and ignores it here).
        """
        height, width = self._check_decoder_args(height, width, guidance_scale, num_inference_steps, noise_level, eta)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        if prompt_embeds is not None and prompt == "":
            prompt = None  # the default prompt yields to given embeddings
        batch = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        if (image is None) == (image_embeds is None):
            raise ValueError("give exactly one of `image` and `image_embeds`")
        if key is None:
            if latents is None or image_embeds_noise is None:
                raise ValueError("give `key`, or every random input (image_embeds_noise, latents)")
        import PIL.Image  # noqa: PLC0415

        repeat = batch if isinstance(image, PIL.Image.Image) else num_images_per_prompt
        if image_embeds is None:
            image_list(image)  # type and shape errors before any work
        if image_embeds is None:
            image_embeds = self.encode_image(params, image)
        image_embeds = jnp.asarray(image_embeds, jnp.float32)
        if image_embeds.ndim != 2:
            raise ValueError(f"image_embeds must be [B, D]; got shape {tuple(image_embeds.shape)}")
        if image_embeds.shape[0] * repeat != batch:
            raise ValueError(f"{image_embeds.shape[0]} image(s) for {batch // num_images_per_prompt} "
                             "prompt(s): give one image, or one per prompt")
        k_draw, k_embed_noise = jax.random.split(_draw_key(_step_key(key)))
        # As diffusers, one noise draw per image, shared by the rows that repeat it.
        image_embeds_noise = check_random_input(image_embeds_noise, image_embeds.shape, "image_embeds_noise")
        if image_embeds_noise is None:
            image_embeds_noise = jax.random.normal(k_embed_noise, image_embeds.shape, jnp.float32)
        inputs = self._decoder_inputs(
            params, k_draw, batch=batch, prompt=prompt, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, noise_level=noise_level,
            latents=latents, step_noise=step_noise, image_embeds_noise=repeat_per_image(image_embeds_noise, repeat),
            embed_dim=image_embeds.shape[1])
        inputs["image_embeds"] = repeat_per_image(image_embeds, repeat)
        return inputs, UnCLIPConfig(num_inference_steps=num_inference_steps, guidance=guidance_scale > 1.0,
                                    eta=float(eta))
