"""Stable unCLIP: text -> Karlo prior -> CLIP image embedding -> noise augmentation -> SD 2.1 unCLIP
UNet -> VAE (StableUnCLIPPipeline), and image -> CLIP vision embedding -> the same decoder
(StableUnCLIPImg2ImgPipeline), as diffusers computes them, channels-last.

Each sampling loop (the prior's and the decoder's) is one jit-compiled `lax.fori_loop`, cached per
static configuration (guidance on/off, callback, step counts and shapes): a second call with the same
configuration compiles nothing. Every random draw can be passed in (`prior_latents`, `image_embeds_noise`,
`latents`, and the schedulers' per-step noise `prior_step_noise` / `step_noise`); otherwise all
randomness comes from `key`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.image_processing import image_list
from unclip_jax.models.layers import timestep_embedding
from unclip_jax.pipelines.common import (
    ImagePipelineOutput,
    batch_size_of,
    check_count,
    check_output_type,
    check_random_input,
    check_real,
    encode_prompt,
    guide,
    postprocess,
    repeat_per_image,
    sampling_loop,
    step_kwargs,
    want_progress,
)
from unclip_jax.pipelines.loading import PipelineBase
from unclip_jax.tokenizer import tokenize

DECODER_COMPONENTS = ("image_normalizer", "image_noising_scheduler", "tokenizer", "text_encoder", "unet",
                      "scheduler", "vae")


class _UnCLIPDecoder(PipelineBase):
    """What both Stable unCLIP pipelines share: prompt encoding, noise augmentation of the image
    embedding, the denoising loop and the VAE decode."""

    COMPONENTS: tuple[str, ...] = DECODER_COMPONENTS

    def __init__(self, **components):
        super().__init__(**components)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ the decoder

    def _check_decoder_args(self, height, width, callback_steps, noise_level, output_type, guidance_scale,
                            num_inference_steps):
        check_real(guidance_scale, "guidance_scale")
        check_count(num_inference_steps, "num_inference_steps")
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}; got {height} and {width}")
        check_count(callback_steps, "callback_steps")
        n_train = self.image_noising_scheduler.config.num_train_timesteps
        if not 0 <= int(noise_level) < n_train:
            raise ValueError(f"noise_level must be in [0, {n_train - 1}]; got {noise_level}")
        check_output_type(output_type)

    @functools.cached_property
    def _jit_noise_image_embeddings(self):
        @jax.jit
        def fn(params, image_embeds, noise, noise_level):
            b, d = image_embeds.shape
            levels = jnp.full((b,), noise_level, jnp.int32)
            norm = params["image_normalizer"]
            x = self.image_normalizer.apply({"params": norm}, image_embeds, method="scale")
            state = self.image_noising_scheduler.create_state()
            x = self.image_noising_scheduler.add_noise(state, x, noise, levels)
            x = self.image_normalizer.apply({"params": norm}, x, method="unscale")
            emb = timestep_embedding(levels, d, flip_sin_to_cos=True, freq_shift=0).astype(x.dtype)
            return jnp.concatenate([x, emb], axis=-1)
        return fn

    def noise_image_embeddings(self, params, image_embeds, noise_level: int, noise=None, key=None):
        """Normalise, noise to `noise_level` with the image-noising scheduler, un-normalise, and append
        the sinusoidal embedding of `noise_level` (diffusers' `noise_image_embeddings`). [B, D] -> [B, 2D]."""
        image_embeds = jnp.asarray(image_embeds, jnp.float32)
        if noise is None:
            noise = jax.random.normal(key, image_embeds.shape, jnp.float32)
        noise = check_random_input(noise, image_embeds.shape, "image_embeds_noise")
        return self._jit_noise_image_embeddings(params, image_embeds, noise, int(noise_level))

    @functools.partial(jax.jit, static_argnums=(0,),
                       static_argnames=("do_cfg", "callback", "callback_steps", "eta", "progress"))
    def _denoise(self, params, state, latents, prompt_embeds, class_labels, guidance_scale, key, step_noise, *,
                 do_cfg, callback, callback_steps, eta, progress):
        unet_params = params["unet"]

        def model_fn(x, t):
            x_in = jnp.concatenate([x, x]) if do_cfg else x
            out = self.unet.apply({"params": unet_params}, x_in, t, prompt_embeds, class_labels)
            return guide(out, guidance_scale) if do_cfg else out

        latents = sampling_loop(model_fn, self.scheduler, state, latents, key, step_noise,
                                 step_kwargs(self.scheduler, eta), callback, callback_steps, self.scheduler.order,
                                 progress="denoising" if progress else None)
        return latents

    @functools.partial(jax.jit, static_argnums=(0,))
    def _decode(self, params, latents):
        scale = self.vae.config.scaling_factor
        return self.vae.apply({"params": params["vae"]}, latents / scale, method="decode")

    def _run_decoder(self, params, key, *, batch, prompt_embeds, image_embeds, height, width, num_inference_steps,
                     guidance_scale, eta, latents, step_noise, output_type, return_dict, callback, callback_steps,
                     progress_bar):
        do_cfg = guidance_scale > 1.0
        k_latents, k_steps = jax.random.split(key)
        if do_cfg:
            image_embeds = jnp.concatenate([jnp.zeros_like(image_embeds), image_embeds])
        shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor, self.unet.config.in_channels)
        # The shape sizes multistep schedulers' histories before the compiled loop starts.
        state = self.scheduler.set_timesteps(self.scheduler.create_state(), num_inference_steps, shape=shape)
        latents = check_random_input(latents, shape, "latents")
        if latents is None:
            latents = jax.random.normal(k_latents, shape, jnp.float32)
        latents = latents * state.init_noise_sigma
        n = int(state.timesteps.shape[0])
        step_noise = check_random_input(step_noise, (n,) + shape, "step_noise")
        latents = self._denoise(params, state, latents, prompt_embeds, image_embeds, jnp.float32(guidance_scale),
                                k_steps, step_noise, do_cfg=do_cfg, callback=callback,
                                callback_steps=callback_steps, eta=float(eta), progress=want_progress(progress_bar))
        images = latents if output_type == "latent" else self._decode(params, latents)
        images = postprocess(images, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _prompt_embeds(self, params, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                       num_images_per_prompt, do_cfg, clip_skip):
        pe, npe = encode_prompt(
            self.text_encoder, params["text_encoder"], self.tokenizer, prompt,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        return jnp.concatenate([npe, pe]) if do_cfg else pe


class StableUnCLIPPipeline(_UnCLIPDecoder):
    """Text-to-image Stable unCLIP (stabilityai/stable-diffusion-2-1-unclip-small with the Karlo prior)."""

    COMPONENTS = ("prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler") + DECODER_COMPONENTS

    @functools.partial(jax.jit, static_argnums=(0,),
                       static_argnames=("do_cfg", "callback", "callback_steps", "progress"))
    def _prior_sample(self, params, state, latents, proj, hidden, mask, guidance_scale, key, step_noise, *,
                      do_cfg, callback, callback_steps, progress):
        prior_params = params["prior"]

        def model_fn(x, t):
            x_in = jnp.concatenate([x, x]) if do_cfg else x
            out = self.prior.apply({"params": prior_params}, x_in, t, proj, hidden, mask)
            return guide(out, guidance_scale) if do_cfg else out

        latents = sampling_loop(model_fn, self.prior_scheduler, state, latents, key, step_noise, {}, callback,
                                callback_steps, 1, progress="prior" if progress else None)
        return self.prior.apply({"params": prior_params}, latents, method="post_process_latents")

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_prior_prompt(self, params, ids):
        out = self.prior_text_encoder.apply({"params": params["prior_text_encoder"]}, ids)
        return out.embeds, out.last_hidden_state

    def __call__(
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
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        noise_level: int = 0,
        prior_num_inference_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        prior_latents=None,
        clip_skip: int | None = None,
        image_embeds_noise=None,
        prior_step_noise=None,
        step_noise=None,
        progress_bar: bool | None = None,
        mesh=None,
    ):
        """Generates images from `prompt` (see diffusers' StableUnCLIPPipeline for the arguments).

        Beyond diffusers: `key` (a `jax.random.key`, the only source of randomness), `image_embeds_noise`
        [B, D] (the noise `noise_level` mixes into the image embedding), `prior_step_noise`
        [prior_steps, B, D] and `step_noise` [steps, B, h, w, C] (the schedulers' per-step noise);
        `progress_bar` (default: when stderr is a terminal) shows the steps of each compiled loop.
        `prompt` is needed: the prior reads it (as in diffusers, where `prompt_embeds` only feeds the decoder).
        """
        if mesh is not None:
            raise NotImplementedError("mesh: sharded sampling is not implemented yet")
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        self._check_decoder_args(height, width, callback_steps, noise_level, output_type, guidance_scale,
                                 num_inference_steps)
        check_real(prior_guidance_scale, "prior_guidance_scale")
        check_count(prior_num_inference_steps, "prior_num_inference_steps")
        check_count(num_images_per_prompt, "num_images_per_prompt")
        batch = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        if prompt is None:
            raise ValueError("prompt is needed: the prior is conditioned on it (prompt_embeds only feed the decoder)")
        if key is None:
            if prior_latents is None or latents is None or image_embeds_noise is None:
                raise ValueError("give `key`, or every random input (prior_latents, image_embeds_noise, latents)")
            key = jax.random.key(0)
        k_prior_latents, k_prior_steps, k_embed_noise, k_decoder = jax.random.split(key, 4)

        # The prior, on the prior tokenizer's prompt, with guidance against the empty prompt.
        prior_cfg = prior_guidance_scale > 1.0
        ids, mask = tokenize(self.prior_tokenizer, prompt)
        if prior_cfg:
            uids, umask = tokenize(self.prior_tokenizer, [""] * ids.shape[0])
            ids, mask = np.concatenate([uids, ids]), np.concatenate([umask, mask])
        proj, hidden = self._encode_prior_prompt(params, ids)
        halves = 2 if prior_cfg else 1
        proj, hidden, mask = (
            jnp.concatenate([repeat_per_image(a, num_images_per_prompt) for a in jnp.split(jnp.asarray(x), halves)])
            for x in (proj, hidden, mask.astype(bool))
        )
        dim = self.prior.config.embedding_dim
        pstate = self.prior_scheduler.set_timesteps(self.prior_scheduler.create_state(), prior_num_inference_steps,
                                                    shape=(batch, dim))
        prior_latents = check_random_input(prior_latents, (batch, dim), "prior_latents")
        if prior_latents is None:
            prior_latents = jax.random.normal(k_prior_latents, (batch, dim), jnp.float32)
        prior_latents = prior_latents * pstate.init_noise_sigma
        n_prior = int(pstate.timesteps.shape[0])
        prior_step_noise = check_random_input(prior_step_noise, (n_prior, batch, dim), "prior_step_noise")
        image_embeds = self._prior_sample(params, pstate, prior_latents, proj, hidden, mask,
                                          jnp.float32(prior_guidance_scale), k_prior_steps, prior_step_noise,
                                          do_cfg=prior_cfg, callback=callback, callback_steps=callback_steps,
                                          progress=want_progress(progress_bar))

        do_cfg = guidance_scale > 1.0
        text = self._prompt_embeds(params, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, do_cfg, clip_skip)
        image_embeds = self.noise_image_embeddings(params, image_embeds, noise_level, image_embeds_noise,
                                                   k_embed_noise)
        return self._run_decoder(
            params, k_decoder, batch=batch, prompt_embeds=text, image_embeds=image_embeds, height=height,
            width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
            latents=latents, step_noise=step_noise, output_type=output_type, return_dict=return_dict,
            callback=callback, callback_steps=callback_steps, progress_bar=progress_bar,
        )


class StableUnCLIPImg2ImgPipeline(_UnCLIPDecoder):
    """Image variations with Stable unCLIP (stabilityai/stable-diffusion-2-1-unclip)."""

    COMPONENTS = ("feature_extractor", "image_encoder") + DECODER_COMPONENTS

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode_pixels(self, params, pixels):
        return self.image_encoder.apply({"params": params["image_encoder"]}, pixels).embeds

    def encode_image(self, params, image) -> jax.Array:
        """Images (PIL, list, or [B, H, W, 3] in [0, 1] / uint8) -> CLIP image embeddings [B, D]."""
        return self._encode_pixels(params, jnp.asarray(self.feature_extractor(image)))

    def __call__(
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
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        noise_level: int = 0,
        image_embeds=None,
        clip_skip: int | None = None,
        image_embeds_noise=None,
        step_noise=None,
        progress_bar: bool | None = None,
        mesh=None,
    ):
        """Variations of `image` (or of given CLIP `image_embeds` [B, D]), guided by `prompt`.

        As diffusers: the embedding of a single PIL image is repeated to the whole batch (prompts x
        num_images_per_prompt); the embeddings of a list or array of images are repeated
        num_images_per_prompt times each. Unlike diffusers, `clip_skip` is applied (diffusers accepts
        and ignores it here).
        """
        if mesh is not None:
            raise NotImplementedError("mesh: sharded sampling is not implemented yet")
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        self._check_decoder_args(height, width, callback_steps, noise_level, output_type, guidance_scale,
                                 num_inference_steps)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        if prompt_embeds is not None and prompt == "":
            prompt = None  # the default prompt yields to given embeddings
        batch = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        if (image is None) == (image_embeds is None):
            raise ValueError("give exactly one of `image` and `image_embeds`")
        if key is None:
            if latents is None or image_embeds_noise is None:
                raise ValueError("give `key`, or every random input (image_embeds_noise, latents)")
            key = jax.random.key(0)
        k_embed_noise, k_decoder = jax.random.split(key)
        import PIL.Image  # noqa: PLC0415

        repeat = batch if isinstance(image, PIL.Image.Image) else num_images_per_prompt
        if image_embeds is None:
            image_list(image)  # type and shape errors before any work
            image_embeds = self.encode_image(params, image)
        image_embeds = jnp.asarray(image_embeds, jnp.float32)
        if image_embeds.ndim != 2:
            raise ValueError(f"image_embeds must be [B, D]; got shape {tuple(image_embeds.shape)}")

        do_cfg = guidance_scale > 1.0
        text = self._prompt_embeds(params, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, do_cfg, clip_skip)
        image_embeds = self.noise_image_embeddings(params, image_embeds, noise_level, image_embeds_noise,
                                                   k_embed_noise)
        image_embeds = repeat_per_image(image_embeds, repeat)
        if image_embeds.shape[0] != batch:
            raise ValueError(f"{image_embeds.shape[0] // repeat} image(s) for {batch // num_images_per_prompt} "
                             "prompt(s): give one image, or one per prompt")
        return self._run_decoder(
            params, k_decoder, batch=batch, prompt_embeds=text, image_embeds=image_embeds, height=height,
            width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
            latents=latents, step_noise=step_noise, output_type=output_type, return_dict=return_dict,
            callback=callback, callback_steps=callback_steps, progress_bar=progress_bar,
        )
