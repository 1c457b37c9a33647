"""How well a model of the toy family draws what it is asked: issue 18's criteria as numbers.

Pure functions of loaded pipelines (`(pipe, params)` from `from_pretrained`) -> plain dicts of numbers.
Each runs one pipeline call per batch of `batch_size` prompts (the last batch is padded by repeating
its first rows, so every call has one shape and compiles once); batch b draws from
`jax.random.fold_in(jax.random.key(seed), b)`.

  txt2img(pipe, params, combos)            StableUnCLIPPipeline on the canonical captions (prompt -> prior
                                           -> decoder): `measure.score` of the pictures, and per combination
  embedding_decode(pipe_i2i, params, combos)
                                           StableUnCLIPImg2ImgPipeline given the CLIP image embedding of a
                                           drawn picture of each combination (noise_level 0) with its caption
                                           as the prompt: the same score without the prior. The issue's "the
                                           prior matters": txt2img within 10 points of this
  variation(pipe_i2i, params, pictures)    variations (no prompt, noise_level 0): the fraction keeping the
                                           input's shape class and both colours, and the fraction whose
                                           shape's bounding box moved or changed size by > MOVE_PX pixels
  depth2img(pipe_depth, params, scenes)    depth scenes re-rendered with a prompt of other colours: the
                                           Pearson correlation of the output's depth (estimated by the
                                           pipeline's own DPT, as the pipeline estimates it) with the input's
                                           depth estimated the same way (the issue's ">= 0.8 with the
                                           input's"; also reported against the drawn depth map), and the
                                           fraction whose shapes and wall/ground take the prompt's colours
  denoise_probe(pipe_i2i, params, combos)  the decoder's one-step clean-latent prediction from drawn
                                           pictures' latents noised to several t: where shapes are lost
  clip_probe(pipes, combos)                what the CLIP towers themselves tell apart: zero-shot shape,
                                           colour and background of drawn pictures (image embedding
                                           against the prior text tower's embeddings of canonical captions
                                           differing in that attribute only), and how alike the text tower
                                           finds captions differing in shape only

Sampling settings are module constants (fast ones: a DDIM decoder of 20 steps as the `txt2img` and
`variation` commands use, a prior of 25 steps, the guidance the commands use with the default model
(toy.default.SAMPLING); depth2img 25 PNDM steps at strength 0.8, 20 of them run). `test_combos` is the
tests' stratified subset: every held-out combination and a fixed seeded sample of the others.

Command line: `python -m unclip_jax.toy.evaluate [--folder DIR] [--full] [--grid PNG] [--variation-grid PNG]
[--depth-grid PNG]` prints every number as JSON (DIR holds `unclip/` and `depth2img/`; default: the
shipped default model); `--full` scores all 270 combinations instead of the tests' subset; `--grid` writes
a PNG of txt2img samples (their prompts, row-major, are in the JSON), `--variation-grid` one of 16
variations (spread over them) beside their inputs, `--depth-grid` one of 8 depth2img scenes (input, depth
estimate, output); `--probe` adds `denoise_probe` and `clip_probe`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers.common import train_alphas_cumprod
from unclip_jax.toy import domain, measure
from unclip_jax.toy.default import SAMPLING

# Sampling settings of the evaluation (and of the tests on the shipped model).
SEED = 0
DECODER_STEPS = 20  # DDIM, as the txt2img / variation commands default to
PRIOR_STEPS = 25  # DDPM over a 25-step subsequence, the pipeline's default
# Guidance: the default model's settings, which the commands use with it (toy.default.SAMPLING).
GUIDANCE = SAMPLING["txt2img"]["guidance"]
PRIOR_GUIDANCE = SAMPLING["txt2img"]["prior_guidance"]
VARIATION_GUIDANCE = SAMPLING["variation"]["guidance"]
NOISE_LEVEL = 0
DEPTH_STEPS = 25  # PNDM; int(25 * 0.8) = 20 steps are run
DEPTH_STRENGTH = 0.8  # the pipeline's and the depth2img command's default
DEPTH_GUIDANCE = SAMPLING["depth2img"]["guidance"]
BATCH_SIZE = 64
# `denoise_probe`'s training timesteps: from lightly noised latents to pure noise.
PROBE_TIMESTEPS = (50, 200, 400, 600, 800, 999)

# A variation "moves or resizes" its shape when the shape's bounding box centre moves by more than this
# many pixels, or its height or width changes by more than this.
MOVE_PX = 3.0

# The tests' subset: every held-out combination plus a seeded sample of the training ones, this many in all.
TEST_COMBOS = 50
_PICTURE_STREAM = 1000  # draws of evaluation pictures: seeds apart from any training draw's stream
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}


# ------------------------------------------------------------------------------------------ inputs


def test_combos(n: int = TEST_COMBOS, seed: int = SEED) -> list[tuple[str, str, str]]:
    """The stratified subset the tests prompt with: all `domain.HELD_OUT` combinations and a fixed
    seeded sample of `n - len(HELD_OUT)` training combinations, in `domain.ALL_COMBOS` order."""
    k = n - len(domain.HELD_OUT)
    if not 0 <= k <= len(domain.TRAIN_COMBOS):
        raise ValueError(f"n must be in [{len(domain.HELD_OUT)}, {len(domain.ALL_COMBOS)}], got {n}")
    rng = np.random.default_rng([seed, _PICTURE_STREAM])
    picked = {domain.TRAIN_COMBOS[i] for i in rng.choice(len(domain.TRAIN_COMBOS), size=k, replace=False)}
    picked |= set(domain.HELD_OUT)
    return [c for c in domain.ALL_COMBOS if c in picked]


def drawn_picture(combo: tuple[str, str, str], index: int, seed: int = SEED) -> np.ndarray:
    """uint8 [64, 64, 3]: a picture of `combo` (shape, colour, background) drawn as the domain draws
    (size, place and texture from `domain.sample_attributes`' distribution), deterministic in
    (seed, index)."""
    shape, color, background = combo
    rng = np.random.default_rng([seed, index, _PICTURE_STREAM + 1])
    attrs = domain.sample_attributes(rng)
    return domain.render(shape, color, background, attrs["center"], attrs["half_size"], rng)


def depth_scenes(n: int, seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """n depth scenes (picture, drawn disparity, attributes): half training, half held-out combinations."""
    out = []
    for i in range(n):
        image, depth, _, attrs = domain.draw_depth(seed + _PICTURE_STREAM, i // 2, held_out=bool(i % 2))
        out.append((image, depth, attrs))
    return out


def recolor_prompt(attrs: dict[str, Any], color: str, background: str) -> str:
    """The prompt of a depth scene's shapes (same kind and count) in other colours, e.g.
    "two green squares on a blue background"."""
    count, shape = attrs["count"], attrs["shape"]
    obj = f"{domain.article(color)} {color} {shape}" if count == 1 else f"{_COUNT_WORDS[count]} {color} {shape}s"
    return f"{obj} on {domain.article(background)} {background} background"


def other_colors(attrs: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """A (colour, background) pair, different from each other, the colour not the scene's shape colour and
    the background not its background."""
    pairs = [(c, b) for c in domain.COLORS for b in domain.COLORS
             if c != b and c != attrs["color"] and b != attrs["background"]]
    return pairs[rng.integers(len(pairs))]


def _batches(n: int, batch_size: int):
    """(batch index, indices, how many are real) per call: every call has `min(batch_size, n)` rows, the
    last padded with copies of its first."""
    if n < 1:
        raise ValueError("nothing to evaluate: give at least one combination, picture or scene")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = min(batch_size, n)
    for b, start in enumerate(range(0, n, size)):
        idx = list(range(start, min(start + size, n)))
        yield b, idx + idx[:1] * (size - len(idx)), len(idx)


def _run(call, n: int, batch_size: int, seed: int) -> np.ndarray:
    """float32 [n, H, W, 3]: `call(indices, key)` per batch, padding dropped."""
    out = []
    for b, idx, real in _batches(n, batch_size):
        out.append(np.asarray(call(idx, jax.random.fold_in(jax.random.key(seed), b)))[:real])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ scores


def scored(images, combos) -> dict[str, Any]:
    """`measure.score` of the pictures, with "n" and "per_combo": per picture its prompt, what was asked
    and what was measured."""
    combos = [tuple(c) for c in combos]
    out: dict[str, Any] = dict(measure.score(images, combos), n=len(combos))
    per = []
    for image, (shape, color, background) in zip(images, combos):
        got = measure.measure(image)
        per.append(dict(prompt=domain.canonical_caption(shape, color, background), shape=shape, color=color,
                        background=background, held_out=(shape, color, background) in domain.HELD_OUT,
                        got_shape=got["shape"], got_color=got["color"], got_background=got["background"],
                        fill=round(got["fill"], 3)))
    out["per_combo"] = per
    held = [p for p in per if p["held_out"]]
    if held:
        out["held_out_colors"] = sum(p["got_color"] == p["color"] and p["got_background"] == p["background"]
                                     for p in held) / len(held)
        out["held_out_shape"] = sum(p["got_shape"] == p["shape"] for p in held) / len(held)
    return out


def txt2img_images(pipe, params, combos, *, seed: int = SEED, steps: int = DECODER_STEPS,
                   prior_steps: int = PRIOR_STEPS, guidance: float = GUIDANCE,
                   prior_guidance: float = PRIOR_GUIDANCE, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """float32 [N, H, W, 3] in [0, 1]: StableUnCLIPPipeline on each combination's canonical caption."""
    prompts = [domain.canonical_caption(*c) for c in combos]
    return _run(lambda idx, key: pipe([prompts[i] for i in idx], params=params, key=key, num_inference_steps=steps,
                                      prior_num_inference_steps=prior_steps, guidance_scale=guidance,
                                      prior_guidance_scale=prior_guidance, noise_level=NOISE_LEVEL,
                                      output_type="np").images,
                len(prompts), batch_size, seed)


def txt2img(pipe, params, combos, **kwargs) -> dict[str, Any]:
    """`scored` txt2img pictures (keyword arguments as `txt2img_images`): "colors" (shape colour and
    background both right), "shape", ... and "per_combo"."""
    return scored(txt2img_images(pipe, params, combos, **kwargs), combos)


def embedding_decode(pipe, params, combos, *, seed: int = SEED, steps: int = DECODER_STEPS,
                     guidance: float = GUIDANCE, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """`scored` pictures of StableUnCLIPImg2ImgPipeline (`pipe`) decoding the CLIP image embedding of
    `drawn_picture(combo, i)` at noise_level 0, prompted with the combination's canonical caption: what
    txt2img would score with a perfect prior."""
    prompts = [domain.canonical_caption(*c) for c in combos]
    pictures = np.stack([drawn_picture(c, i, seed) for i, c in enumerate(combos)])
    images = _run(lambda idx, key: pipe(pictures[idx], prompt=[prompts[i] for i in idx], params=params, key=key,
                                        num_inference_steps=steps, guidance_scale=guidance, noise_level=NOISE_LEVEL,
                                        output_type="np").images,
                  len(prompts), batch_size, seed)
    return scored(images, combos)


def denoise_probe(pipe, params, combos, timesteps=PROBE_TIMESTEPS, *, seed: int = SEED,
                  batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Where the decoder loses shapes: each combination's drawn picture is VAE-encoded (posterior mean),
    noised to each training timestep t in `timesteps`, and StableUnCLIPImg2ImgPipeline's UNet (`pipe`)
    predicts the clean latent in one step (its prediction type read through the scheduler's training
    schedule), conditioned on the picture's CLIP embedding (noise_level 0) and caption, without guidance.
    The decoded predictions are measured: {"timesteps", "shape", "colors": fractions right per t,
    "vae_shape": the shape kept by the VAE alone (the ceiling)}. A decoder that keeps shapes from lightly
    noised latents but not from heavy noise forms them too late; one that loses them even at small t
    cannot draw their edges at all."""
    combos = [tuple(c) for c in combos]
    pictures = np.stack([drawn_picture(c, i, seed) for i, c in enumerate(combos)])
    prompts = [domain.canonical_caption(*c) for c in combos]
    abar = np.asarray(train_alphas_cumprod(pipe.scheduler.config), np.float64)
    kind = pipe.scheduler.config.prediction_type
    if any(not 0 <= int(t) < len(abar) for t in timesteps):
        raise ValueError(f"timesteps must be in [0, {len(abar)}); got {list(timesteps)}")
    vae, unet, factor = pipe.vae, pipe.unet, pipe.vae.config.scaling_factor

    @jax.jit
    def predict(x0, noise, embeds, labels, t):
        a = jnp.asarray(abar, jnp.float32)[t]
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        out = unet.apply({"params": params["unet"]}, xt, jnp.full((x0.shape[0],), t), embeds, labels)
        if kind == "v_prediction":
            return jnp.sqrt(a) * xt - jnp.sqrt(1 - a) * out
        if kind == "epsilon":
            return (xt - jnp.sqrt(1 - a) * out) / jnp.sqrt(a)
        return out

    encode = jax.jit(lambda x: vae.apply({"params": params["vae"]}, x, method=vae.encode).mean * factor)
    decode = jax.jit(lambda z: jnp.clip((vae.apply({"params": params["vae"]}, z / factor, method=vae.decode) + 1) / 2,
                                        0, 1))
    images = {t: [] for t in timesteps}
    recon = []
    for b, idx, real in _batches(len(combos), batch_size):
        key = jax.random.fold_in(jax.random.key(seed), b)
        inputs, _ = pipe.prepare(pictures[idx], [prompts[i] for i in idx], params=params, key=key,
                                 guidance_scale=1.0)
        labels = pipe.noise_image_embeddings(params, inputs.image_embeds, 0,
                                             noise=jnp.zeros_like(inputs.image_embeds))
        x0 = encode(jnp.asarray(pictures[idx], jnp.float32) / 127.5 - 1)
        recon.append(np.asarray(decode(x0))[:real])
        noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, x0.dtype)
        for t in timesteps:
            images[t].append(np.asarray(decode(predict(x0, noise, inputs.prompt_embeds, labels, int(t))))[:real])
    vae_score = measure.score(np.concatenate(recon), combos)
    scores = [measure.score(np.concatenate(images[t]), combos) for t in timesteps]
    return dict(timesteps=[int(t) for t in timesteps], shape=[r["shape"] for r in scores],
                colors=[r["colors"] for r in scores], vae_shape=vae_score["shape"], n=len(combos))


def clip_probe(pipes, combos, *, seed: int = SEED, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """What the CLIP towers encode, without the prior or a decoder: for `drawn_picture(combo, i)` of each
    combination, the image embedding (StableUnCLIPImg2ImgPipeline's image encoder, `pipes["img2img"]`) is
    compared by cosine with the prior text tower's embeddings (StableUnCLIPPipeline's, `pipes["txt2img"]`)
    of canonical captions that differ from the right one in one attribute only (the other shapes; the
    other colours; the other backgrounds), and counted right when the right caption is nearest. Returns
    {"shape", "color", "background": fractions right (chance 1/3, 1/9, 1/9), "shape_caption_cosine": the
    mean cosine between the text embeddings of two captions differing only in shape (1.0: the text tower
    does not tell the shapes apart), "n"}. A decoder conditioned on embeddings that do not tell shapes
    apart cannot draw the shape asked for."""
    from unclip_jax.tokenizer import tokenize  # noqa: PLC0415

    pipe_t, params_t = pipes["txt2img"]
    pipe_i, params_i = pipes["img2img"]
    combos = [tuple(c) for c in combos]
    pictures = np.stack([drawn_picture(c, i, seed) for i, c in enumerate(combos)])
    image = np.concatenate([np.asarray(pipe_i.encode_image(params_i, pictures[idx]))[:real]
                            for _, idx, real in _batches(len(combos), batch_size)])
    # Every candidate caption is one of the palette's canonical captions: all of them in one call, as the
    # txt2img pipeline encodes its prompts for the prior.
    ids, _ = tokenize(pipe_t.prior_tokenizer, [domain.canonical_caption(*c) for c in domain.ALL_COMBOS])
    text = np.asarray(pipe_t._encode_prior_prompt(params_t, ids)[0], np.float64)
    text = dict(zip(domain.ALL_COMBOS, text / np.linalg.norm(text, axis=-1, keepdims=True)))
    image = np.asarray(image, np.float64)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    hits = {"shape": 0, "color": 0, "background": 0}
    cosines = []
    for e, (shape, color, background) in zip(image, combos):
        options = {"shape": [(s, color, background) for s in domain.SHAPES],
                   "color": [(shape, c, background) for c in domain.COLORS if c != background],
                   "background": [(shape, color, b) for b in domain.COLORS if b != color]}
        for name, candidates in options.items():
            embeds = np.stack([text[c] for c in candidates])
            hits[name] += candidates[int(np.argmax(embeds @ e))] == (shape, color, background)
            if name == "shape":
                cosines.append(float(np.mean([embeds[i] @ embeds[j] for i in range(3) for j in range(i + 1, 3)])))
    return {**{k: v / len(combos) for k, v in hits.items()}, "shape_caption_cosine": float(np.mean(cosines)),
            "n": len(combos)}


def _box_change(before, after) -> tuple[float, float]:
    """(centre shift, largest change of height or width) in pixels between two boxes."""
    (t0, l0, b0, r0), (t1, l1, b1, r1) = before, after
    shift = float(np.hypot((t1 + b1 - t0 - b0) / 2, (l1 + r1 - l0 - r0) / 2))
    return shift, float(max(abs((b1 - t1) - (b0 - t0)), abs((r1 - l1) - (r0 - l0))))


def variation_images(pipe, params, pictures, *, noise_level: int = NOISE_LEVEL, seed: int = SEED,
                     steps: int = DECODER_STEPS, guidance: float = VARIATION_GUIDANCE,
                     batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Variations [N, H, W, 3] in [0, 1] (StableUnCLIPImg2ImgPipeline `pipe`, no prompt, as
    `unclip-jax variation`) of pictures [N, H, W, 3] (uint8)."""
    pictures = np.asarray(pictures)
    return _run(lambda idx, key: pipe(pictures[idx], prompt=[""] * len(idx), params=params, key=key,
                                      num_inference_steps=steps, guidance_scale=guidance, noise_level=noise_level,
                                      output_type="np").images,
                len(pictures), batch_size, seed)


def variation(pipe, params, pictures, **kwargs) -> dict[str, Any]:
    """`score_variations` of `variation_images(pipe, params, pictures, **kwargs)`."""
    return score_variations(pictures, variation_images(pipe, params, pictures, **kwargs))


def score_variations(pictures, images) -> dict[str, Any]:
    """What variations `images` kept of `pictures` (both [N, H, W, 3]). What to keep is measured on each
    input (`measure.measure`; exact on drawn pictures' colours, >= 99% on their shapes).

    "kept": the fraction whose shape class and both colours equal the input's; "moved": the fraction
    whose shape's bounding box centre moved, or height or width changed, by more than MOVE_PX pixels;
    "kept_and_moved": both; "per_picture": the measures."""
    per = []
    for before, after in zip(pictures, images):
        a, b = measure.measure(before), measure.measure(after)
        box_a = measure.bounding_box(measure.shape_mask(before))
        box_b = measure.bounding_box(measure.shape_mask(after))
        kept = b["shape"] == a["shape"] and b["color"] == a["color"] and b["background"] == a["background"]
        shift, resize = _box_change(box_a, box_b) if box_a and box_b else (0.0, 0.0)
        moved = box_a is not None and box_b is not None and max(shift, resize) > MOVE_PX
        per.append(dict(kept=bool(kept), moved=bool(moved), shift=round(shift, 2), resize=resize,
                        want=[a["shape"], a["color"], a["background"]], got=[b["shape"], b["color"], b["background"]]))
    n = len(per)
    return dict(n=n, kept=sum(p["kept"] for p in per) / n, moved=sum(p["moved"] for p in per) / n,
                kept_and_moved=sum(p["kept"] and p["moved"] for p in per) / n, per_picture=per)


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels whose 8 neighbours are all in it (anti-aliased edges dropped)."""
    return mask & (measure._neighbours(mask) == 8)


def scene_regions(image, attrs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """bool [H, W] (shapes, wall and ground) of a drawn depth scene: the pixels whose nearest palette
    colour is the scene's shape colour / background colour (the ground's shading keeps its colour
    nearest), edges dropped."""
    x = measure.as_rgb255(image)
    names = np.asarray(list(domain.PALETTE))
    rgb = np.asarray(list(domain.PALETTE.values()), np.float64)
    nearest = names[np.argmin(((x[..., None, :] - rgb) ** 2).sum(-1), axis=-1)]
    return _core(nearest == attrs["color"]), _core(nearest == attrs["background"])


def depth2img_images(pipe, params, scenes, *, seed: int = SEED, steps: int = DEPTH_STEPS,
                     strength: float = DEPTH_STRENGTH, guidance: float = DEPTH_GUIDANCE,
                     batch_size: int = BATCH_SIZE) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """(prompts, wanted (shape colour, background) per scene, outputs [N, H, W, 3] in [0, 1]) of
    StableDiffusionDepth2ImgPipeline (`pipe`) on depth scenes [(picture, drawn disparity, attributes)]
    (`depth_scenes`), each prompted with its shapes in other colours (`other_colors`, `recolor_prompt`)."""
    rng = np.random.default_rng([seed, _PICTURE_STREAM + 2])
    pictures = np.stack([s[0] for s in scenes])
    wanted = [other_colors(s[2], rng) for s in scenes]
    prompts = [recolor_prompt(s[2], *w) for s, w in zip(scenes, wanted)]
    images = _run(lambda idx, key: pipe([prompts[i] for i in idx], image=pictures[idx], params=params, key=key,
                                        num_inference_steps=steps, strength=strength, guidance_scale=guidance,
                                        output_type="np").images,
                  len(prompts), batch_size, seed)
    return prompts, wanted, images


def depth2img(pipe, params, scenes, **kwargs) -> dict[str, Any]:
    """`score_depth2img` of `depth2img_images(pipe, params, scenes, **kwargs)`."""
    return score_depth2img(pipe, params, scenes, *depth2img_images(pipe, params, scenes, **kwargs))


def score_depth2img(pipe, params, scenes, prompts, wanted, images) -> dict[str, Any]:
    """What the depth pipeline `pipe`'s outputs `images` of `scenes` (`depth2img_images`) kept and took.

    Depth: `pipe.estimate_depth` (the pipeline's own DPT, on the picture as the pipeline feeds it) on the
    output and on the input; "depth_r_mean" / "depth_r_min": Pearson r of the two (the criterion);
    "depth_r_truth_mean": r of the output's estimate with the drawn disparity (resized to the estimate's
    size if they differ), and "dpt_r_truth_mean" of the input's estimate with it (how good the DPT is).
    Colours: the output's median colour over the input's shape pixels and over its wall-and-ground pixels
    (`scene_regions`), named by the nearest palette colour; "colors": the fraction where both are the
    prompt's."""
    pictures = np.stack([s[0] for s in scenes])
    est_in = np.asarray(pipe.estimate_depth(params, pictures))
    est_out = np.asarray(pipe.estimate_depth(params, images))
    per = []
    for i, (picture, truth, attrs) in enumerate(scenes):
        truth = _resized(truth, est_in.shape[1:])
        shapes, ground = scene_regions(picture, attrs)
        x = measure.as_rgb255(images[i])
        got = [measure.nearest_color(np.median(x[m], axis=0)) if m.any() else None for m in (shapes, ground)]
        per.append(dict(prompt=prompts[i], want=list(wanted[i]), got=got, colors=got == list(wanted[i]),
                        depth_r=_r(est_out[i], est_in[i]), depth_r_truth=_r(est_out[i], truth),
                        dpt_r_truth=_r(est_in[i], truth)))
    n = len(per)
    r = [p["depth_r"] for p in per]
    return dict(n=n, depth_r_mean=float(np.mean(r)), depth_r_min=float(np.min(r)),
                depth_r_truth_mean=float(np.mean([p["depth_r_truth"] for p in per])),
                dpt_r_truth_mean=float(np.mean([p["dpt_r_truth"] for p in per])),
                colors=sum(p["colors"] for p in per) / n, per_scene=per)


def _r(a, b) -> float:
    """Pearson r; 0 where a map is flat (no layout to correlate)."""
    try:
        return measure.depth_correlation(a, b)
    except ValueError:
        return 0.0


def _resized(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if tuple(depth.shape) == tuple(size):
        return depth
    from PIL import Image  # noqa: PLC0415

    return np.asarray(Image.fromarray(np.asarray(depth, np.float32)).resize(size[::-1], Image.BILINEAR))


# ------------------------------------------------------------------------------------------ all of it


def load(unclip: str, depth2img: str):
    """{"txt2img", "img2img", "depth2img": (pipe, params)}: both unCLIP pipelines from the `unclip`
    folder, the depth pipeline from the `depth2img` one."""
    import unclip_jax as uj  # noqa: PLC0415

    for name, path in (("unclip", unclip), ("depth2img", depth2img)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{name} pipeline folder {path} does not exist")
    return {"txt2img": uj.StableUnCLIPPipeline.from_pretrained(unclip),
            "img2img": uj.StableUnCLIPImg2ImgPipeline.from_pretrained(unclip),
            "depth2img": uj.StableDiffusionDepth2ImgPipeline.from_pretrained(depth2img)}


def evaluate(pipes, combos, *, n_variations: int = 48, n_scenes: int = 48, seed: int = SEED
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(every number: {"txt2img", "embedding_decode", "prior_gap", "variation", "depth2img"}, pictures:
    {"txt2img": [N, H, W, 3] in [0, 1], "variation_inputs": uint8 [V, H, W, 3], "variations": [V, H, W, 3]
    in [0, 1], "depth_inputs": uint8 [S, H, W, 3], "depth_outputs": [S, H, W, 3] in [0, 1]}) for `load`'s
    pipelines and the combinations to prompt."""
    images = txt2img_images(*pipes["txt2img"], combos, seed=seed)
    t2i = scored(images, combos)
    emb = embedding_decode(*pipes["img2img"], combos, seed=seed)
    var_combos = [combos[i] for i in np.linspace(0, len(combos) - 1, n_variations).astype(int)]
    pictures = np.stack([drawn_picture(c, i, seed) for i, c in enumerate(var_combos)])
    variations = variation_images(*pipes["img2img"], pictures, seed=seed)
    scenes = depth_scenes(n_scenes, seed)
    prompts, wanted, depth_outputs = depth2img_images(*pipes["depth2img"], scenes, seed=seed)
    out = {"txt2img": t2i, "embedding_decode": emb,
           "prior_gap": {k: t2i[k] - emb[k] for k in ("colors", "shape", "all")},
           "variation": score_variations(pictures, variations),
           "depth2img": score_depth2img(*pipes["depth2img"], scenes, prompts, wanted, depth_outputs)}
    return out, {"txt2img": images, "variation_inputs": pictures, "variations": variations,
                 "depth_inputs": np.stack([s[0] for s in scenes]), "depth_outputs": depth_outputs}


def write_sample_grid(images: np.ndarray, path: str, columns: int = 8) -> None:
    """Pictures [N, H, W, 3] in [0, 1] as a PNG grid of `columns` per row (the last row padded black)."""
    from unclip_jax.training.loop import write_grid  # noqa: PLC0415

    n, h, w, c = images.shape
    rows = -(-n // columns)
    pad = np.zeros((rows * columns - n, h, w, c), images.dtype)
    grid = np.concatenate([images, pad]).reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4)
    write_grid(grid.reshape(1, rows * h, columns * w, c), path)


def write_grids(numbers: dict[str, Any], pictures: dict[str, np.ndarray], combos, pipes, *,
                txt2img: str | None = None, variation: str | None = None, depth: str | None = None) -> dict:
    """Writes the PNGs asked for from `evaluate`'s (numbers, pictures) of `combos` with `pipes`: `txt2img`,
    24 txt2img samples (8 a row); `variation`, 16 variations each right of its input (8 pairs a row);
    `depth`, 8 depth2img scenes: inputs, the pipeline's depth estimate of each (white = near), outputs, a row
    each. Each picked evenly over its set. Returns {"grid" / "variation_grid" / "depth_grid": what each shows}."""
    out = {}
    if txt2img:
        pick = np.linspace(0, len(combos) - 1, min(24, len(combos))).astype(int)
        write_sample_grid(pictures["txt2img"][pick], txt2img)
        out["grid"] = dict(path=txt2img, columns=8, prompts=[domain.canonical_caption(*combos[i]) for i in pick])
    if variation:
        pick = np.linspace(0, len(pictures["variations"]) - 1, 16).astype(int)
        inputs, variations = pictures["variation_inputs"][pick] / 255.0, pictures["variations"][pick]
        write_sample_grid(np.stack([inputs, variations], 1).reshape(-1, *inputs.shape[1:]), variation, columns=16)
        out["variation_grid"] = dict(path=variation, columns=16, layout="input, variation; 8 pairs a row",
                                     kept=[numbers["variation"]["per_picture"][i]["kept"] for i in pick])
    if depth:
        pick = np.linspace(0, len(pictures["depth_inputs"]) - 1, 8).astype(int)
        inputs = pictures["depth_inputs"][pick]
        pipe, params = pipes["depth2img"]
        maps = []
        for d in np.asarray(pipe.estimate_depth(params, inputs)):
            d = _resized(d, inputs.shape[1:3])
            maps.append(np.repeat(((d - d.min()) / max(float(d.max() - d.min()), 1e-6))[..., None], 3, -1))
        write_sample_grid(np.concatenate([inputs / 255.0, np.stack(maps), pictures["depth_outputs"][pick]]), depth)
        out["depth_grid"] = dict(path=depth, columns=8, layout="inputs, depth estimates, outputs",
                                 prompts=[numbers["depth2img"]["per_scene"][i]["prompt"] for i in pick],
                                 colors=[numbers["depth2img"]["per_scene"][i]["colors"] for i in pick])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip_jax.toy.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--folder", default=None,
                   help="folder holding unclip/ and depth2img/ (default: the shipped default model)")
    p.add_argument("--full", action="store_true", help=f"all {len(domain.ALL_COMBOS)} combinations "
                   f"(default: the tests' {TEST_COMBOS})")
    p.add_argument("--grid", default=None, metavar="PNG", help="write a grid of txt2img samples here")
    p.add_argument("--depth-grid", default=None, metavar="PNG",
                   help="write 8 depth2img scenes here (spread over them): inputs, the pipeline's depth estimate "
                        "of each (white = near), outputs, a row each")
    p.add_argument("--variation-grid", default=None, metavar="PNG",
                   help="write 16 of the variations here (spread over them), each beside its input, 8 pairs a row")
    p.add_argument("--per-item", action="store_true", help="keep the per-picture measures in the JSON")
    p.add_argument("--probe", action="store_true",
                   help="also `denoise_probe`: shapes and colours of the decoder's one-step prediction from drawn "
                        f"pictures' latents noised to t = {', '.join(map(str, PROBE_TIMESTEPS))}; and "
                        "`clip_probe`: the shapes and colours the CLIP towers tell apart")
    args = p.parse_args(argv)
    if args.folder is None:
        from unclip_jax.toy.default import pipeline_folder  # noqa: PLC0415

        folders = pipeline_folder("unclip"), pipeline_folder("depth2img")
    else:
        folders = os.path.join(args.folder, "unclip"), os.path.join(args.folder, "depth2img")
    combos = list(domain.ALL_COMBOS) if args.full else test_combos()
    try:
        pipes = load(*folders)
    except FileNotFoundError as e:
        p.error(str(e))
    out, pictures = evaluate(pipes, combos)
    if args.probe:
        out["denoise_probe"] = denoise_probe(*pipes["img2img"], combos)
        out["clip_probe"] = clip_probe(pipes, combos)
    out["settings"] = dict(folders=list(folders), combos=len(combos), seed=SEED, decoder_steps=DECODER_STEPS,
                           prior_steps=PRIOR_STEPS, guidance=GUIDANCE, prior_guidance=PRIOR_GUIDANCE,
                           variation_guidance=VARIATION_GUIDANCE, depth_steps=DEPTH_STEPS,
                           depth_strength=DEPTH_STRENGTH, depth_guidance=DEPTH_GUIDANCE)
    out.update(write_grids(out, pictures, combos, pipes, txt2img=args.grid, variation=args.variation_grid,
                           depth=args.depth_grid))
    if not args.per_item:
        for part in out.values():
            for k in ("per_combo", "per_picture", "per_scene"):
                if isinstance(part, dict):
                    part.pop(k, None)
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
