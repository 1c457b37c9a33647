"""Depth-conditioned image-to-image (stabilityai/stable-diffusion-2-depth), as diffusers'
StableDiffusionDepth2ImgPipeline computes it, channels-last.

image -> DPT relative depth -> bicubic resize to the latent grid (PyTorch's kernel) -> [-1, 1] per image;
image -> VAE posterior sample * scaling_factor -> noised to the first timestep that `strength` keeps ->
a UNet reading [latents, depth] (C + 1 channels) over the remaining steps -> VAE decode.

A call is `prepare` (checks, prompt encoding, depth estimation, VAE encoding, the initial random draws)
then `sample` (pure: inputs -> images, differentiable with respect to latents, prompt embeddings, the depth
map and params) then post-processing. The denoising loop (noising at the start step included) is one
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

from unclip_jax.image_processing import image_list, to_rgb_float
from unclip_jax.pipelines.common import (
    ImagePipelineOutput,
    batch_size_of,
    cfg_batch,
    cfg_halves,
    cfg_pairs,
    check_output_type,
    check_random_input,
    encode_prompt,
    guide,
    postprocess,
    sampling_loop,
    step_kwargs,
    want_progress,
    with_lora,
)
from unclip_jax.lora import LoraLoaderMixin
from unclip_jax.pipelines.checks import check_count, check_eta, check_finite_real, check_strength
from unclip_jax.pipelines.loading import PipelineBase
from unclip_jax.sharding import constrain, replicate, shard_call
from unclip_jax.textual_inversion import TextualInversionLoaderMixin

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")
_DEPTH_MODES = ("L", "I", "I;16", "F")
# The dim holding the batch rows of each batch-sized input (the rest are replicated on a mesh).
BATCH_AXIS = {"prompt_embeds": 0, "negative_prompt_embeds": 0, "image_rows": 0, "depth_rows": 0, "noise": 0,
              "step_noise": 1}


# ---------------------------------------------------------------------------------------------------
# PyTorch's bicubic resampling


def _cubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`
    along one axis: Keys' cubic with a = -0.75 (jax.image.resize uses a = -0.5), half-pixel centres
    without clamping the source coordinate, taps clamped to the border, arithmetic in float32."""
    a = np.float32(-0.75)
    scale = np.float32(size_in) / np.float32(size_out)
    dst = np.arange(size_out, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    t = np.clip(src - base.astype(np.float32), 0, 1).astype(np.float32)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    m = np.zeros((size_out, size_in), np.float32)
    for k in range(4):
        np.add.at(m, (np.arange(size_out), np.clip(base - 1 + k, 0, size_in - 1)), weights[:, k])
    return m


def resize_bicubic(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W] -> [B, *size], as PyTorch's bicubic interpolate with align_corners=False."""
    mh = jnp.asarray(_cubic_matrix(x.shape[1], size[0]))
    mw = jnp.asarray(_cubic_matrix(x.shape[2], size[1]))
    return jnp.einsum("oh,bhw,pw->bop", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------------------
# Inputs


def _nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C], PyTorch's default (nearest) interpolate."""
    def idx(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    return x[idx(x.shape[0], height)][:, idx(x.shape[1], width)]


def vae_pixels(images: list, factor: int) -> np.ndarray:
    """Images (PIL or [H, W, C] arrays, one size) -> float32 [N, H', W', 3] in [-1, 1], H' and W' cut down
    to multiples of `factor` as diffusers' VaeImageProcessor does (Lanczos for PIL, nearest for arrays)."""
    out = []
    for im in images:
        h, w = (im.height, im.width) if isinstance(im, PIL.Image.Image) else np.shape(im)[:2]
        if h < factor or w < factor:
            raise ValueError(f"an image of size {(h, w)} is smaller than the VAE factor {factor}")
        if isinstance(im, PIL.Image.Image):
            if h % factor or w % factor:
                im = im.resize((w - w % factor, h - h % factor), resample=PIL.Image.LANCZOS)
            x = to_rgb_float(im)
        else:
            x = to_rgb_float(im)
            if h % factor or w % factor:
                x = _nearest(x, h - h % factor, w - w % factor)
        out.append(x)
    if len({x.shape for x in out}) > 1:
        raise ValueError(f"images differ in size {sorted({x.shape[:2] for x in out})}; give images of one size")
    return np.stack(out) * 2 - 1


def _dpt_input(image):
    """What the DPT processor reads: PIL images and uint8 arrays as they are (diffusers' path); float
    arrays in [0, 1] as uint8 by rounding (transformers would truncate them and divide by 255 twice)."""
    if isinstance(image, PIL.Image.Image) or np.asarray(image).dtype == np.uint8:
        return image
    return np.round(to_rgb_float(image) * 255).astype(np.uint8)


def depth_array(depth_map) -> np.ndarray:
    """A depth map argument -> float32 [D, H, W]: an array [D, H, W] (or [H, W]), or single-channel PIL
    images (mode L, I or F; any scale: depth is normalised per image)."""
    if isinstance(depth_map, PIL.Image.Image) or (
            isinstance(depth_map, (list, tuple)) and depth_map and isinstance(depth_map[0], PIL.Image.Image)):
        ims = [depth_map] if isinstance(depth_map, PIL.Image.Image) else list(depth_map)
        for im in ims:
            if not isinstance(im, PIL.Image.Image) or im.mode not in _DEPTH_MODES:
                got = im.mode if isinstance(im, PIL.Image.Image) else type(im).__name__
                raise ValueError(f"a depth_map image must be single-channel PIL (mode {'/'.join(_DEPTH_MODES)}); "
                                 f"got {got}")
        d = [np.asarray(im, dtype=np.float32) for im in ims]
        if len({x.shape for x in d}) > 1:
            raise ValueError("depth_map images differ in size")
        return np.stack(d)
    if not (hasattr(depth_map, "shape") and hasattr(depth_map, "dtype")):
        raise TypeError(f"depth_map: expected an array [B, H, W] or a PIL depth image; got {type(depth_map).__name__}")
    d = np.asarray(depth_map, dtype=np.float32)
    if d.ndim == 2:
        d = d[None]
    if d.ndim != 3:
        raise ValueError(f"depth_map must be [B, H, W]; got shape {d.shape}")
    return d


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


class StableDiffusionDepth2ImgPipeline(LoraLoaderMixin, TextualInversionLoaderMixin, PipelineBase):
    """Text-guided, depth-preserving image-to-image with Stable Diffusion 2 depth."""

    COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler", "vae", "depth_estimator", "feature_extractor")
    SAMPLE_MODELS = ("unet", "vae")

    def __init__(self, **components):
        super().__init__(**components)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

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

    def _scheduler_state(self, config: Depth2ImgConfig, shape):
        """The scheduler state started at the step `strength` keeps, and that step's index."""
        start = (config.num_inference_steps - config.init_timestep) * self.scheduler.order
        # Multistep schedulers size their history buffers by the sample shape.
        state = self.scheduler.set_timesteps(self.scheduler.create_state(), config.num_inference_steps, shape=shape)
        return self.scheduler.set_begin_index(state, start), start

    @functools.partial(jax.jit, static_argnums=(0,),
                       static_argnames=("start", "do_cfg", "callback", "tensor_inputs", "eta", "progress", "layout",
                                        "remat"))
    def _denoise(self, params, state, image_latents, rows, noise, text, negative, depth_mask, guidance_scale, key,
                 step_noise, *, start, do_cfg, callback, tensor_inputs, eta, progress, layout=None, remat=False):
        init_latents = constrain(layout, image_latents[rows] * self.vae.config.scaling_factor)
        t0 = jnp.full((init_latents.shape[0],), state.timesteps[start])
        latents = self.scheduler.add_noise(state, init_latents, noise, t0)
        unet_params = params["unet"]

        def model_fn(x, t, cond):
            x_in = cfg_batch(x, x) if do_cfg else x
            x_in = jnp.concatenate([x_in, cond["depth_mask"].astype(x_in.dtype)], axis=-1)
            out = self.unet.apply({"params": unet_params}, x_in, t, cond["prompt_embeds"])
            return guide(out, guidance_scale) if do_cfg else out

        on_step_end = None
        if callback is not None:
            # The host sees diffusers' [negative; prompt] layout of the guidance batch.
            doubled = ("prompt_embeds", "depth_mask") if do_cfg else ()

            def host_round_trip(i, t, x, cond):
                args = {"latents": x, **{k: cfg_halves(v) if k in doubled else v for k, v in cond.items()}}
                shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
                host = functools.partial(self._run_callback, callback, tensor_inputs)
                new = io_callback(host, shapes, i, t, args, ordered=True)
                return new["latents"], {k: cfg_pairs(new[k]) if k in doubled else new[k] for k in cond}

            on_step_end = host_round_trip

        cond = {"prompt_embeds": cfg_batch(negative, text) if do_cfg else text, "negative_prompt_embeds": negative,
                "depth_mask": cfg_batch(depth_mask, depth_mask) if do_cfg else depth_mask}
        options = step_kwargs(self.scheduler, eta)
        return sampling_loop(model_fn, self.scheduler, state, latents, key, step_noise, options, start=start, cond=cond,
                             on_step_end=on_step_end, progress="denoising" if progress else None, layout=layout,
                             remat=remat)

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

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("layout",))
    def _decode(self, params, latents, *, layout=None):
        scale = self.vae.config.scaling_factor
        return constrain(layout, self.vae.apply({"params": params["vae"]}, latents / scale, method="decode"))

    # ------------------------------------------------------------------ public pieces

    def estimate_depth(self, params, image) -> jax.Array:
        """Images (PIL, list, or [B, H, W, 3] uint8 / float in [0, 1]) -> DPT relative depth [B, H', W']."""
        images = image_list(image)
        return self._depth(params, jnp.asarray(self.feature_extractor([_dpt_input(im) for im in images])))

    def encode_image(self, params, image, key=None, noise=None) -> jax.Array:
        """Images -> the VAE posterior sample mean + std * noise [B, h, w, C] (unscaled: diffusers multiplies
        it by `scaling_factor` afterwards). `noise` [B, h, w, C] or `key` gives the draw."""
        mean, std = self._posterior(params, jnp.asarray(vae_pixels(image_list(image), self.vae_scale_factor)))
        noise = check_random_input(noise, mean.shape, "noise")
        if noise is None:
            noise = jax.random.normal(key, mean.shape, jnp.float32)
        return mean + std * noise

    def _sample(self, params, inputs, key, config, mesh, callback=None, tensor_inputs=("latents",), progress=False):
        batch = int(np.shape(inputs["noise"])[0])
        layout, params, inputs = shard_call(mesh, params, self.SAMPLE_MODELS, inputs, BATCH_AXIS, batch)
        noise = inputs["noise"]
        state, start = self._scheduler_state(config, noise.shape)
        mask = self._depth_mask(inputs["depth_map"], inputs["depth_rows"], size=noise.shape[1:3], layout=layout)
        latents = self._denoise(params, replicate(layout, state), inputs["image_latents"], inputs["image_rows"], noise,
                                inputs["prompt_embeds"], inputs["negative_prompt_embeds"] if config.guidance else None,
                                mask, inputs["guidance_scale"], replicate(layout, key), inputs["step_noise"],
                                start=start, do_cfg=config.guidance, callback=callback, tensor_inputs=tensor_inputs,
                                eta=float(config.eta), progress=progress, layout=layout,
                                remat=callback is None and not progress)
        out = latents if config.output_type == "latent" else self._decode(params, latents, layout=layout)
        return out if out.shape[0] == batch else out[:batch]

    def sample(self, params, inputs: dict[str, Any], key: jax.Array, *, config: Depth2ImgConfig, mesh=None):
        """inputs (see `prepare`) -> the VAE output [B, H, W, 3] (about [-1, 1], unclipped), or the final
        latents [B, h, w, C] for `config.output_type == "latent"`. Pure and differentiable (with respect to
        image latents, noise, prompt embeddings, the depth map and params); `key` draws only the scheduler's
        per-step noise. On a `mesh` the batch is split over it (see `sharding`); any batch size works
        (padded, then trimmed)."""
        return self._sample(params, inputs, key, config, mesh)

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
    ) -> tuple[dict[str, Any], Depth2ImgConfig]:
        """Checks the arguments (see diffusers' StableDiffusionDepth2ImgPipeline), encodes the prompts,
        estimates depth and encodes the image where not given, and draws every random input not given:
        (inputs, config) for `sample`.

        image: a PIL image, a list of them, or an array [B, H, W, C] (uint8, or float in [0, 1]); may be
          None when both `image_latents` and `depth_map` are given.
        depth_map: an array [B, H, W] (any scale) or single-channel PIL image(s) (mode L, I or F); None
          estimates depth with the DPT model.
        Random inputs (beyond diffusers): `key` (a `jax.random.key`, the source of every draw not given);
          `image_latents` [N, h, w, C]: the VAE posterior sample of the N images (as
          `vae.encode(x).latent_dist.sample()`, before `scaling_factor`, which is applied here as in
          diffusers' `prepare_latents`); `noise` [B, h, w, C]: the noise added at the start step;
          `step_noise` [steps, B, h, w, C]: the scheduler's per-step noise (DDIM with eta > 0), steps being
          the steps run, int(num_inference_steps * strength) times the scheduler order.

        inputs: prompt_embeds / negative_prompt_embeds [B, T, E]; image_latents [N, h, w, C] and image_rows
        [B] (the image each batch row starts from); depth_map [M, H', W'] (raw depth, any scale) and
        depth_rows [B]; noise [B, h, w, C]; guidance_scale; step_noise.

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
        check_eta(eta)
        check_count(num_inference_steps, "num_inference_steps")
        check_count(num_images_per_prompt, "num_images_per_prompt")
        check_finite_real(guidance_scale, "guidance_scale")
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
        depth = None if depth_map is None else depth_array(depth_map)
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
        state, start = self._scheduler_state(config, shape)
        n_run = int(state.timesteps.shape[0]) - start
        if n_run <= 0:
            raise ValueError(f"strength {strength} x num_inference_steps {num_inference_steps} leaves no denoising "
                             "step: raise one of them")
        noise = check_random_input(noise, shape, "noise")
        step_noise = check_random_input(step_noise, (n_run, *shape), "step_noise")
        if key is None:
            if image_latents is None or noise is None or (eta > 0 and step_noise is None):
                raise ValueError("give `key`, or every random input (image_latents, noise, and step_noise if eta > 0)")
            key = jax.random.key(0)
        k_posterior, k_noise = jax.random.split(jax.random.fold_in(key, 1))

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
        inputs = {"prompt_embeds": pe, "negative_prompt_embeds": npe, "image_latents": image_latents,
                  "image_rows": jnp.asarray(rows), "depth_map": jnp.asarray(depth, jnp.float32),
                  "depth_rows": jnp.asarray(depth_rows), "noise": noise, "step_noise": step_noise,
                  "guidance_scale": jnp.float32(guidance_scale)}
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
        check_output_type(output_type)
        params = with_lora(params, cross_attention_kwargs)
        tensor_inputs = tuple(callback_on_step_end_tensor_inputs or ())
        bad = [k for k in tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not among {list(CALLBACK_TENSOR_INPUTS)}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable")
        inputs, config = self.prepare(*args, params=params, key=key, **kwargs)
        if output_type == "latent":
            config = dataclasses.replace(config, output_type="latent")
        images = self._sample(params, inputs, jax.random.key(0) if key is None else key, config, mesh,
                              callback_on_step_end, tensor_inputs, want_progress(progress_bar))
        images = postprocess(images, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)
