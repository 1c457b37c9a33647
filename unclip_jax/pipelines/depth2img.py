"""Depth-conditioned image-to-image (stabilityai/stable-diffusion-2-depth), as diffusers'
StableDiffusionDepth2ImgPipeline computes it, channels-last.

image -> DPT relative depth -> bicubic resize to the latent grid (PyTorch's kernel) -> [-1, 1] per image;
image -> VAE posterior sample * scaling_factor -> noised to the first timestep that `strength` keeps ->
a UNet reading [latents, depth] (C + 1 channels) over the remaining steps -> VAE decode.

A call is `prepare` (checks, prompt encoding, depth estimation, VAE encoding, the initial random draws)
then `sample` (pure: inputs -> images, differentiable with respect to latents, prompt embeddings, the depth
map and params) then post-processing (see `pipelines.base`). The denoising loop (noising at the start step included) is one
jit-compiled `lax.fori_loop`, cached per static configuration (guidance on/off, start step, callback,
shapes, mesh): a second call with the same configuration compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.experimental import io_callback

from unclip_jax.image_processing import image_list, vae_pixels
from unclip_jax.image_processing_dpt import depth_array, dpt_input
from unclip_jax.models.resize import resize_bicubic
from unclip_jax.pipelines.base import DiffusionPipeline, Inputs, host_hooks, typed_inputs
from unclip_jax.pipelines.checks import (
    MAX_PIXELS,
    check_count,
    check_eta,
    check_finite_real,
    check_max_pixels,
    check_pixels,
    check_strength,
)
from unclip_jax.pipelines.common import (
    HostHooks,
    batch_size_of,
    cfg_halves,
    cfg_pairs,
    chain_hooks,
    check_key,
    check_random_input,
    encode_prompt,
    guidance_batch,
    guided_model,
    prepare_keys,
    progress_hook,
    sampling_loop,
    step_kwargs,
    warn_if_nonfinite,
)
from unclip_jax.sharding import constrain, replicate

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")
# The dim holding the batch rows of each batch-sized input (the rest are replicated on a mesh).
BATCH_AXIS = {"prompt_embeds": 0, "negative_prompt_embeds": 0, "image_rows": 0, "depth_rows": 0, "noise": 0,
              "step_noise": 1}


def _rows(n: int, n_prompts: int, per_prompt: int, what: str) -> np.ndarray:
    """Which of `n` inputs each batch row (prompts x per_prompt, prompt-major) reads."""
    batch = n_prompts * per_prompt
    if n == 1:
        return np.zeros(batch, np.int32)
    if n == batch:
        return np.arange(batch, dtype=np.int32)
    if n == n_prompts:
        return np.repeat(np.arange(n, dtype=np.int32), per_prompt)
    raise ValueError(f"{n} {what} for {n_prompts} prompt(s) x {per_prompt} image(s) per prompt: give 1, "
                     f"{n_prompts} or {batch}")


def _image_size(image) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, PIL.Image.Image) else tuple(np.shape(image)[:2])


@typed_inputs
class Depth2ImgInputs(Inputs):
    """What `prepare` gives `sample` (a frozen pytree: change a field with `.replace(name=value)`).

    prompt_embeds / negative_prompt_embeds [B, T, E] (the latter None without guidance); image_latents
    [N, h, w, C] (the VAE posterior sample of the N images, before `scaling_factor`) and image_rows [B]
    (the image each batch row starts from); depth_map [M, H', W'] (raw depth, any scale) and depth_rows
    [B]; noise [B, h, w, C] (added at the start step); guidance_scale; step_noise [steps, B, h, w, C] or
    None (drawn from the key).
    """

    BATCH_AXIS = BATCH_AXIS

    prompt_embeds: jax.Array
    negative_prompt_embeds: jax.Array | None
    image_latents: jax.Array
    image_rows: jax.Array
    depth_map: jax.Array
    depth_rows: jax.Array
    noise: jax.Array
    guidance_scale: jax.Array
    step_noise: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.noise)[0])


@dataclasses.dataclass(frozen=True)
class Depth2ImgConfig:
    """The static part of a depth2img sample (changing it compiles anew); the rest are `inputs`.

    guidance: classifier-free guidance on (its scale is the input `guidance_scale`; diffusers turns it on
      for a scale above 1). strength: how much of the schedule runs (from int(steps * strength) steps
      before the end). output_type: "image" (VAE output [B, H, W, 3] in about [-1, 1]) or "latent".
    """

    num_inference_steps: int = 50
    strength: float = 0.8
    guidance: bool = True
    eta: float = 0.0
    output_type: str = "image"

    @property
    def init_timestep(self) -> int:
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)


class StableDiffusionDepth2ImgPipeline(DiffusionPipeline):
    """Text-guided, depth-preserving image-to-image with Stable Diffusion 2 depth."""

    COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler", "vae", "depth_estimator", "feature_extractor")
    SAMPLE_MODELS = ("unet", "vae")
    INPUTS = Depth2ImgInputs
    COMPILED = ("_posterior", "_depth", "_depth_mask", "_denoise_loop", "_decode")
    BATCH_AXIS = BATCH_AXIS

    # ------------------------------------------------------------------ jitted pieces

    @functools.partial(jax.jit, static_argnums=(0,))
    def _posterior(self, params, pixels):
        post = self.vae.apply({"params": params["vae"]}, pixels, method="encode")
        return post.mean, post.std

    @functools.partial(jax.jit, static_argnums=(0,))
    def _depth(self, params, pixel_values):
        return self.depth_estimator.apply({"params": params["depth_estimator"]}, pixel_values).predicted_depth

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("size", "layout"))
    def _depth_mask(self, depth, rows, *, size, layout=None):
        d = resize_bicubic(depth, size)
        lo = d.min(axis=(1, 2), keepdims=True)
        hi = d.max(axis=(1, 2), keepdims=True)
        # A flat map (hi == lo) would be 0 / 0 = NaN in diffusers; it becomes the middle depth, 0.
        d = jnp.where(hi > lo, 2.0 * (d - lo) / jnp.where(hi > lo, hi - lo, 1.0) - 1.0, 0.0)
        return constrain(layout, d[rows][..., None])

    def _start_state(self, config: Depth2ImgConfig, shape):
        """The scheduler state started at the step `strength` keeps, and that step's index."""
        start = (config.num_inference_steps - config.init_timestep) * self.scheduler.order
        # Multistep schedulers size their history buffers by the sample shape.
        state = self.scheduler_state(self.scheduler, config.num_inference_steps, shape)
        return self.scheduler.set_begin_index(state, start), start

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("start", "do_cfg", "eta", "hooks", "layout"))
    def _denoise_loop(self, params, state, inputs: Depth2ImgInputs, depth_mask, key, *, start, do_cfg, eta, hooks,
                      layout=None):
        """Image latents noised to the start step -> denoised latents (one fori_loop over the steps
        `strength` keeps), the UNet reading [latents, depth mask]."""
        init_latents = constrain(layout, inputs.image_latents[inputs.image_rows] * self.vae.config.scaling_factor)
        t0 = jnp.full((init_latents.shape[0],), state.timesteps[start])
        latents = self.scheduler.add_noise(state, init_latents, inputs.noise, t0)
        unet_params = params["unet"]

        def apply(x, t, cond):
            x = jnp.concatenate([x, cond["depth_mask"].astype(x.dtype)], axis=-1)
            return self.unet.apply({"params": unet_params}, x, t, cond["prompt_embeds"])

        model_fn = guided_model(apply, inputs.guidance_scale, do_cfg)
        negative = inputs.negative_prompt_embeds if do_cfg else None
        cond = {"prompt_embeds": guidance_batch(negative, inputs.prompt_embeds, do_cfg),
                "negative_prompt_embeds": negative,
                "depth_mask": guidance_batch(depth_mask, depth_mask, do_cfg)}
        on_step_end = chain_hooks(
            self._round_trip_hook(hooks, do_cfg) if hooks.on_step_end is not None else None,
            progress_hook("denoising", state.timesteps.shape[0] - start) if hooks.progress else None)
        return sampling_loop(model_fn, self.scheduler, state, latents, key=key, step_noise=inputs.step_noise,
                             step_options=step_kwargs(self.scheduler, eta), start=start, cond=cond,
                             on_step_end=on_step_end, layout=layout, remat=not hooks.any)

    def _round_trip_hook(self, hooks: HostHooks, do_cfg: bool):
        """diffusers' callback_on_step_end as a loop hook: a host round trip whose returned tensors
        replace the loop's. The host sees diffusers' [negative; prompt] layout of the guidance batch."""
        doubled = ("prompt_embeds", "depth_mask") if do_cfg else ()

        def hook(i, t, x, cond):
            args = {"latents": x, **{k: cfg_halves(v) if k in doubled else v for k, v in cond.items()}}
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
            host = functools.partial(self._run_callback, hooks.on_step_end, hooks.tensor_inputs)
            new = io_callback(host, shapes, i, t, args, ordered=True)
            return new["latents"], {k: cfg_pairs(new[k]) if k in doubled else new[k] for k in cond}

        return hook

    def _run_callback(self, callback, names, i, t, args):
        """On the host, once per step: diffusers' callback_on_step_end(pipe, i, t, kwargs) -> dict, whose
        returned tensors replace the loop's."""
        args = {k: None if v is None else np.asarray(v) for k, v in args.items()}
        out = callback(self, int(i), int(t), {k: args[k] for k in names}) or {}
        for k, v in out.items():
            if k in args and args[k] is not None and v is not None:
                v = np.asarray(v, dtype=args[k].dtype)
                if v.shape != args[k].shape:
                    raise ValueError(f"callback_on_step_end returned {k} of shape {v.shape}; expected {args[k].shape}")
                args[k] = v
        return args

    def _sample_placed(self, params, inputs: Depth2ImgInputs, key, config, layout, hooks):
        noise = inputs.noise
        state, start = self._start_state(config, noise.shape)
        mask = self._depth_mask(inputs.depth_map, inputs.depth_rows, size=noise.shape[1:3], layout=layout)
        latents = self._denoise_loop(params, replicate(layout, state), inputs, mask, replicate(layout, key),
                                     start=start, do_cfg=config.guidance, eta=float(config.eta), hooks=hooks,
                                     layout=layout)
        warn_if_nonfinite(latents, "decoder (UNet loop)", given=inputs.noise)
        return self._decode_checked(params, latents, config, layout)

    # ------------------------------------------------------------------ public pieces

    def estimate_depth(self, params, image) -> jax.Array:
        """Images (PIL of any mode, a list, or [B, H, W, C] arrays with 1, 3 or 4 channels, uint8 or float
        in [0, 1]) -> DPT relative depth [B, H', W']."""
        self.require("depth_estimator", "feature_extractor")
        images = image_list(image)
        return self._depth(params, jnp.asarray(self.feature_extractor([dpt_input(im) for im in images])))

    def encode_image(self, params, image, key=None, noise=None) -> jax.Array:
        """Images -> the VAE posterior sample mean + std * noise [B, h, w, C] (unscaled: diffusers multiplies
        it by `scaling_factor` afterwards). `noise` [B, h, w, C] or `key` gives the draw."""
        mean, std = self._posterior(params, jnp.asarray(vae_pixels(image_list(image), self.vae_scale_factor)))
        noise = check_random_input(noise, mean.shape, "noise")
        if noise is None:
            noise = jax.random.normal(key, mean.shape, jnp.float32)
        return mean + std * noise

    def prepare(
        self,
        prompt=None,
        image=None,
        *,
        params: dict[str, Any],
        key: jax.Array | None = None,
        depth_map=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        clip_skip: int | None = None,
        image_latents=None,
        noise=None,
        step_noise=None,
        max_pixels: int | None = MAX_PIXELS,
    ) -> tuple[Depth2ImgInputs, Depth2ImgConfig]:
        """Checks the arguments (see diffusers' StableDiffusionDepth2ImgPipeline), encodes the prompts,
        estimates depth and encodes the image where not given, and draws every random input not given:
        (inputs, config) for `sample`.

        image: a PIL image (any mode), a list of them, or an array [B, H, W, C] with 1, 3 or 4 channels
          (uint8, or float in [0, 1]); made RGB as transformers' convert_rgb does (transparency onto
          white). May be None when both `image_latents` and `depth_map` are given.
        max_pixels: images larger than this many pixels (default `checks.MAX_PIXELS`, 1024 x 1024) are
          refused before any work (depth estimation and the VAE encoder run at the input's size); None
          allows any size.
        depth_map: an array [B, H, W] (any scale) or single-channel PIL image(s) (mode L, I or F); None
          estimates depth with the DPT model.
        Random inputs (beyond diffusers): `key` (a `jax.random.key`, the source of every draw not given);
          `image_latents` [N, h, w, C]: the VAE posterior sample of the N images (as
          `vae.encode(x).latent_dist.sample()`, before `scaling_factor`, which is applied here as in
          diffusers' `prepare_latents`); `noise` [B, h, w, C]: the noise added at the start step;
          `step_noise` [steps, B, h, w, C]: the scheduler's per-step noise (DDIM with eta > 0), steps being
          the steps run, int(num_inference_steps * strength) times the scheduler order.

        See `Depth2ImgInputs` for what the inputs hold.

        Where this differs from diffusers on purpose:
        - The depth map is always resized to the latent grid (h, w). diffusers swaps height and width for
          numpy images and, for latents passed as `image`, takes the latent size for the image size.
          Latents come in through `image_latents`, not `image` (a channels-last [B, h, w, 4] array could
          be an RGBA image).
        - A float array image in [0, 1] is an image: the depth estimator sees it rounded to uint8 (as
          the PIL image it equals), not transformers' truncated, twice-rescaled pixels.
        - Batches: N images (and depth maps) for P prompts x n images per prompt must be 1, P (image i
          goes with prompt i, repeated n times; diffusers tiles them, pairing image i with other prompts
          when n > 1) or P * n. Images of another size than a multiple of the VAE factor are cut down
          as diffusers does; RGBA / gray images are made RGB.
        - A flat depth map normalises to 0 (diffusers: NaN).
        """
        # ---- checks before work
        check_strength(strength)
        check_count(num_inference_steps, "num_inference_steps")
        check_count(num_images_per_prompt, "num_images_per_prompt")
        check_finite_real(guidance_scale, "guidance_scale")
        check_eta(eta)
        check_max_pixels(max_pixels)
        if key is not None:
            check_key(key)
        self.require("tokenizer", "text_encoder", "unet", "scheduler", "vae")
        n_prompts = batch_size_of(prompt, prompt_embeds)
        batch = n_prompts * num_images_per_prompt
        config = Depth2ImgConfig(num_inference_steps=num_inference_steps, strength=float(strength),
                                 guidance=guidance_scale > 1.0, eta=float(eta))

        f = self.vae_scale_factor
        images = None
        if image is None:
            if image_latents is None or depth_map is None:
                raise ValueError("give `image` (or both `image_latents` and `depth_map`)")
        else:
            images = image_list(image)
            for i, im in enumerate(images):
                check_pixels(*_image_size(im), max_pixels, "image" if len(images) == 1 else f"image[{i}]")
        depth = None if depth_map is None else depth_array(depth_map)
        if depth is None:
            self.require("depth_estimator", "feature_extractor")
        pixels = None if images is None else vae_pixels(images, f)
        c = self.vae.config.latent_channels
        if pixels is not None:
            n_images, lat = len(images), (pixels.shape[1] // f, pixels.shape[2] // f)
        else:
            il = np.shape(image_latents)
            if len(il) != 4:
                raise ValueError(f"`image_latents` must be [N, h, w, {c}]; got shape {il}")
            n_images, lat = il[0], tuple(il[1:3])
        image_latents = check_random_input(image_latents, (n_images, *lat, c), "image_latents")
        rows = _rows(n_images, n_prompts, num_images_per_prompt, "image(s)")
        depth_rows = rows
        if depth is not None and depth.shape[0] != n_images:
            depth_rows = _rows(depth.shape[0], n_prompts, num_images_per_prompt, "depth map(s)")
        shape = (batch, *lat, c)
        state, start = self._start_state(config, shape)
        n_run = int(state.timesteps.shape[0]) - start
        if n_run <= 0:
            raise ValueError(f"strength {strength} x num_inference_steps {num_inference_steps} leaves no denoising "
                             "step: raise one of them")
        noise = check_random_input(noise, shape, "noise")
        step_noise = check_random_input(step_noise, (n_run, *shape), "step_noise")
        if key is None:
            if image_latents is None or noise is None or (eta > 0 and step_noise is None):
                raise ValueError("give `key`, or every random input (image_latents, noise, and step_noise if eta > 0)")
        needed = ("text_encoder",) + self.SAMPLE_MODELS
        self.check_params(params, needed + (("depth_estimator",) if depth is None else ()))
        k_posterior, k_noise = prepare_keys(key, 2)

        # ---- work
        pe, npe = encode_prompt(
            self.text_encoder, params["text_encoder"], self.tokenizer, prompt,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=config.guidance,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        if depth is None:
            depth = self.estimate_depth(params, images)
        if image_latents is None:
            mean, std = self._posterior(params, jnp.asarray(pixels))
            image_latents = mean + std * jax.random.normal(k_posterior, mean.shape, jnp.float32)
        if noise is None:
            noise = jax.random.normal(k_noise, shape, jnp.float32)
        inputs = Depth2ImgInputs(prompt_embeds=pe, negative_prompt_embeds=npe, image_latents=image_latents,
                                 image_rows=jnp.asarray(rows), depth_map=jnp.asarray(depth, jnp.float32),
                                 depth_rows=jnp.asarray(depth_rows), noise=noise, step_noise=step_noise,
                                 guidance_scale=jnp.float32(guidance_scale))
        return inputs, config

    def __call__(self, *args, params: dict[str, Any], key: jax.Array | None = None, mesh=None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), progress_bar: bool | None = None,
                 cross_attention_kwargs=None, **kwargs):
        """Re-renders `image` guided by `prompt`, keeping its depth: `prepare(*args, params=params, key=key,
        **kwargs)` (see it for the arguments), then `sample`, then post-processing.

        mesh: a `jax.sharding.Mesh` with a `data` axis (and optionally `fsdp`): the batch is split over it
          (see `unclip_jax.sharding`); None runs on one device.
        output_type: "pil", "np" (float32 [B, H, W, 3] in [0, 1]) or "latent".
        callback_on_step_end(pipe, i, t, kwargs) -> dict: as diffusers, run on the host after every step
          through `io_callback` (one host round trip per step, only when given); kwargs holds numpy arrays,
          channels-last: latents [B, h, w, C], prompt_embeds (under guidance the batch [negative; prompt]),
          negative_prompt_embeds (None without guidance), depth_mask [B or 2B, h, w, 1]. Returned arrays
          (same shapes) replace the loop's. The callback is part of the compiled program: a new function
          object compiles anew.
        progress_bar (default: when stderr is a terminal): shows the steps of the compiled loop.
        cross_attention_kwargs: as in diffusers, only its `scale`: the weight of the active unfused LoRA
          adapters (`load_lora_weights`), on the UNet and the text encoder (default 1.0).
        """
        tensor_inputs = tuple(callback_on_step_end_tensor_inputs or ())
        bad = [k for k in tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not among {list(CALLBACK_TENSOR_INPUTS)}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable")
        return self._call(args, kwargs, params=params, key=key, mesh=mesh, output_type=output_type,
                          return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
                          hooks=host_hooks(on_step_end=callback_on_step_end, tensor_inputs=tensor_inputs,
                                           progress_bar=progress_bar))
