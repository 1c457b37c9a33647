"""The generator: planned batches of items through a pipeline on every local device, each item's random
inputs drawn from its own key, images and their index written so that a killed run resumes exactly.

Determinism: every random input of item i (the prior's initial latents and per-step noise, the noise mixed
into the image embedding, the decoder's latents and per-step noise, depth2img's VAE posterior noise and
start noise) is drawn from `jax.random.key(seed_i)` folded with a constant per input, with the item's own
shapes, and handed to the batched pipeline call as arrays. So an item's image depends only on the model,
its arguments and its seed: not on the batch it shares, the number of devices or hosts, or where a run was
resumed (up to float32 rounding of batched kernels: tests/test_generate.py measures it). Within one
machine, a resumed run makes bit-identical files, because batches are planned from the items alone.

Several hosts: call `jax.distributed.initialize()` in every process first and start every process with
the same arguments. Each process takes every `process_count`-th unit of work (`items.host_share`), runs
it on its own devices (a mesh over `jax.local_devices()`: no traffic between hosts) and writes its own
files and its own index part into the shared OUT; after a barrier, process 0 merges the index parts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import files
from unclip_jax.generation import output
from unclip_jax.generation.items import InputError, Item, group_key, host_share, number_width, plan_batches, plan_units

# The constant each random input's key is folded with (fixed forever: changing one changes images).
DRAW_IDS = {"prior_latents": 1, "prior_step_noise": 2, "image_embeds_noise": 3, "latents": 4, "step_noise": 5,
            "posterior_noise": 6, "noise": 7}


def item_keys(seeds: list[int]) -> jax.Array:
    """The items' keys: `jax.random.key(seed)` (threefry) for seeds below 2**32; above, the seed's high word
    is kept too (JAX without x64 would drop it, and seeds 0 and 2**32 would draw alike)."""
    data = np.array([[s >> 32, s & 0xFFFFFFFF] for s in seeds], np.uint32)
    return jax.random.wrap_key_data(data, impl="threefry2x32")


@functools.partial(jax.jit, static_argnums=(1,))
def _draw(keys, shapes: tuple) -> tuple:
    def one(key):
        return tuple(jax.random.normal(jax.random.fold_in(key, DRAW_IDS[name]), shape, jnp.float32)
                     for name, shape, _ in shapes)

    # vmap over keys computes each item's numbers exactly as a call on its key alone would (threefry is
    # elementwise in the key), in one program for the batch.
    return tuple(jnp.moveaxis(x, 0, axis) for x, (_, _, axis) in zip(jax.vmap(one)(keys), shapes))


def item_draws(seeds: list[int], shapes: tuple) -> dict[str, np.ndarray]:
    """The random inputs of a batch: for each item its own draws (`shapes`: (name, per-item shape, batch
    axis)) from its own key, stacked along each input's batch axis."""
    return {name: np.asarray(x) for (name, _, _), x in zip(shapes, _draw(item_keys(seeds), shapes))}


def _read_image(item: Item, read):
    """read(PIL image) of the item's image (a PIL image, or a file opened for the call); InputError naming
    the file if it cannot be read."""
    import PIL.Image  # noqa: PLC0415

    if isinstance(item.image, PIL.Image.Image):
        return read(item.image)
    try:
        with PIL.Image.open(item.image) as image:
            return read(image)
    except FileNotFoundError:
        raise InputError(f"{item.image}: no such image file ({item.where})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{item.image}: cannot read it as an image ({e}; {item.where})") from None


def load_image(item: Item):
    """The item's image as an RGB PIL image; InputError naming its file if it cannot be read."""
    return _read_image(item, lambda image: image.convert("RGB"))


def image_size(item: Item) -> tuple[int, int]:
    """(width, height) of the item's image, from its header; InputError naming the file otherwise."""
    return _read_image(item, lambda image: image.size)


class BatchRunner:
    """Runs batches of items of one pipeline on a mesh (default: every local device)."""

    def __init__(self, pipe, params, pipeline: str, mesh=None):
        from unclip_jax.sharding import make_mesh, shard_params  # noqa: PLC0415

        self.pipe, self.pipeline = pipe, pipeline
        self.mesh = make_mesh(devices=jax.local_devices()) if mesh is None else mesh
        self.params = shard_params(params, self.mesh)
        self.raw_params = params

    # ------------------------------------------------------------------ per item, before any work

    def resolve(self, item: Item) -> Item:
        """The item with every size filled in (the model's default; for depth2img its image's size cut to a
        multiple of 8, or the size it is resized to); InputError if its image cannot be opened."""
        args = dict(item.args)
        f = self.pipe.vae_scale_factor
        if self.pipeline == "variation":
            image_size(item)
        if self.pipeline == "depth2img":
            w, h = image_size(item)
            if args.get("height") is None or args.get("width") is None:
                args["height"], args["width"] = h // f * f, w // f * f
        else:
            default = self.pipe.unet.config.sample_size * f
            args["height"] = args.get("height") or default
            args["width"] = args.get("width") or default
        if args["height"] % f or args["width"] % f or args["height"] < f or args["width"] < f:
            raise InputError(f"{item.where}: size {args['height']}x{args['width']} is not a multiple of {f}")
        return dataclasses.replace(item, args=args)

    def shapes(self, args: dict) -> tuple:
        """(name, per-item shape, batch axis) of each random input for items with these arguments."""
        pipe = self.pipe
        f = pipe.vae_scale_factor
        h, w = args["height"] // f, args["width"] // f
        steps = args["num_inference_steps"]
        if self.pipeline == "depth2img":
            from unclip_jax.pipelines.depth2img import Depth2ImgConfig  # noqa: PLC0415

            c = pipe.vae.config.latent_channels
            config = Depth2ImgConfig(num_inference_steps=steps, strength=float(args["strength"]))
            state, start = pipe._start_state(config, (1, h, w, c))
            n_run = int(state.timesteps.shape[0]) - start
            if n_run <= 0:
                raise InputError(f"strength {args['strength']} x {steps} steps leaves no denoising step")
            return (("posterior_noise", (h, w, c), 0), ("noise", (h, w, c), 0), ("step_noise", (n_run, h, w, c), 1))
        c = pipe.unet.config.in_channels
        n = int(pipe.scheduler_state(pipe.scheduler, steps, (1, h, w, c)).timesteps.shape[0])
        dim = pipe.image_normalizer.config.embedding_dim
        decoder = (("image_embeds_noise", (dim,), 0), ("latents", (h, w, c), 0), ("step_noise", (n, h, w, c), 1))
        if self.pipeline == "variation":
            return decoder
        d = pipe.prior.config.embedding_dim
        n_prior = int(pipe.scheduler_state(pipe.prior_scheduler, args["prior_num_inference_steps"], (1, d))
                      .timesteps.shape[0])
        return (("prior_latents", (d,), 0), ("prior_step_noise", (n_prior, d), 1)) + decoder

    # ------------------------------------------------------------------ a batch

    def run(self, items: list[Item], images: list | None = None, pad_to: int | None = None) -> np.ndarray:
        """Images [B, H, W, 3] float32 in [0, 1] of `items` (one group), padded to `pad_to` rows with
        copies of the last item (so every batch of a group runs one compiled program) and trimmed."""
        n = len(items)
        rows = list(items) + [items[-1]] * max(0, (pad_to or n) - n)
        if images is not None:
            images = list(images) + [images[-1]] * (len(rows) - n)
        args = rows[0].args
        draws = item_draws([it.seed for it in rows], self.shapes(args))
        prompts = [it.args.get("prompt", "") for it in rows]
        negative = [it.args.get("negative_prompt") or "" for it in rows]
        common = dict(params=self.params, key=jax.random.key(0), mesh=self.mesh, output_type="np", progress_bar=False,
                      num_inference_steps=args["num_inference_steps"], guidance_scale=args["guidance_scale"],
                      negative_prompt=negative, eta=args.get("eta", 0.0))
        pipe = self.pipe
        if self.pipeline == "txt2img":
            out = pipe(prompts, height=args["height"], width=args["width"], noise_level=args["noise_level"],
                       prior_num_inference_steps=args["prior_num_inference_steps"],
                       prior_guidance_scale=args["prior_guidance_scale"], **common, **draws)
        elif self.pipeline == "variation":
            out = pipe(images, prompts, height=args["height"], width=args["width"], noise_level=args["noise_level"],
                       **common, **draws)
        else:
            images = [_fit(im, args["width"], args["height"]) for im in images]
            posterior = draws.pop("posterior_noise")
            latents = pipe.encode_image(self.raw_params, images, noise=posterior)
            out = pipe(prompts, images, strength=args["strength"], image_latents=latents, **common, **draws)
        return np.asarray(out.images)[:n]


def _fit(image, width: int, height: int):
    """depth2img's input at the item's size: resized (Lanczos, as `unclip-jax depth2img --size`) when
    that is not its own size cut to a multiple of 8."""
    import PIL.Image  # noqa: PLC0415

    w, h = image.size
    if (w // 8 * 8, h // 8 * 8) == (width, height):
        return image
    return image.resize((width, height), resample=PIL.Image.LANCZOS)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] in [0, 1] -> uint8, rounded as the pipelines' PIL output."""
    return (images * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# A run


@dataclasses.dataclass
class Summary:
    made: int = 0
    skipped: int = 0
    already_done: int = 0
    total: int = 0
    mean_clip_score: float | None = None
    scored: int = 0
    seconds: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        score = "no CLIP score" if self.mean_clip_score is None else \
            f"mean CLIP score {self.mean_clip_score:.2f} over {self.scored}"
        return (f"made {self.made} image(s), skipped {self.skipped} (bad input), {self.already_done} already done; "
                f"{score}; {self.seconds:.1f}s")


def _check_run_file(out: str, run_info: dict) -> None:
    """OUT/run.json records the arguments that decide what the run makes; resuming with others is refused."""
    path = os.path.join(out, "run.json")
    data = json.dumps(run_info, sort_keys=True, indent=1).encode()
    if os.path.exists(path):
        with open(path, "rb") as f:
            try:
                old = json.loads(f.read())
            except ValueError:
                old = None
        if old is not None and old != json.loads(data):
            differ = sorted(k for k in set(old) | set(run_info) if old.get(k) != run_info.get(k)) if isinstance(
                old, dict) else ["?"]
            raise ValueError(f"{out} holds a run made with other arguments (differing: {', '.join(differ)}); "
                             "resume with the same command, or choose a new --out")
        if old is not None:
            return
    files.atomic_write(path, data)


def generate(runner: BatchRunner, items: list[Item], *, out: str, batch_size: int, fmt: str = "png",
             shard_size: int = 1000, scorer=None, strict: bool = False, progress: bool | None = None,
             run_info: dict | None = None, fingerprint: dict | None = None, errors: list[str] | None = None,
             log=None) -> Summary:
    """Makes every item not yet in OUT's index; see the module doc and `output` for the guarantees.

    items: checked items (`items.read_prompts` / `read_dataset`); errors: what reading them refused (each
      counted as skipped and reported). scorer: a `clip_score.CLIPScorer` (captions when it has a text
      tower, else image-to-image against the item's source image), or None. run_info: what every record
      carries about the run (`run_info_of`). fingerprint: what decides the images beyond the items (model,
      defaults, seed, input): kept in OUT/run.json, and a resume with another is refused.
    """
    if fmt not in ("png", "webdataset"):
        raise ValueError(f"format must be png or webdataset; got {fmt!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.time()
    summary = Summary(errors=list(errors or ()))
    resolved, keys = [], []
    for item in items:
        try:
            item = runner.resolve(item)
            runner.shapes(item.args)
        except InputError as e:
            summary.errors.append(str(e))
            continue
        resolved.append(item)
        keys.append(group_key(item, runner.pipeline))
    if strict and summary.errors:
        raise InputError(f"{summary.errors[0]}" + (f" (and {len(summary.errors) - 1} more)" if len(summary.errors) > 1
                                                   else ""))
    for e in summary.errors:
        log(f"skipped: {e}")

    os.makedirs(out, exist_ok=True)
    _check_run_file(out, dict(run_info or {}, **(fingerprint or {}), batch_size=batch_size, format=fmt,
                              shard_size=shard_size))
    output.remove_temporaries(out)
    pi, pc = jax.process_index(), jax.process_count()
    index = output.Index(out, pi, pc)
    index.load()

    batches = plan_batches(resolved, keys, batch_size)
    per_unit = 1 if fmt == "png" else max(1, -(-shard_size // batch_size))
    units = host_share(plan_units(batches, per_unit), pi, pc)
    width = number_width(max((it.index for it in items), default=0) + 1)
    mine = sum(len(b.items) for u in units for b in u)
    bar = _bar(mine, progress)
    failed: set[int] = set()

    def make(batch) -> list[tuple[dict, bytes]]:
        """(record, PNG bytes) of each item of the batch that could be made."""
        import PIL.Image  # noqa: PLC0415

        good, images = [], []
        for it in batch.items:
            if runner.pipeline == "txt2img":
                good.append(it)
                continue
            try:
                images.append(load_image(it))
                good.append(it)
            except InputError as e:
                if strict:
                    raise
                failed.add(it.index)
                summary.errors.append(str(e))
                log(f"skipped: {e}")
        if not good:
            return []
        pixels = to_uint8(runner.run(good, images or None, pad_to=batch_size))
        pils = [PIL.Image.fromarray(p) for p in pixels]
        scores = [None] * len(good)
        if scorer is not None:
            if scorer.has_text:
                scores = scorer.score_text(pils, [it.args.get("prompt", "") for it in good])
            elif images:
                scores = scorer.score_images(pils, images)
        made = []
        for it, image, s in zip(good, pils, scores):
            key = f"{it.index:0{width}d}"
            record = dict(it.record(), **(run_info or {}), clip_score=None if s is None else round(float(s), 4))
            if fmt == "png":
                record["file"] = f"{key}.png"
            else:
                record["key"] = key
            made.append((record, files.png_bytes(image, record)))
        return made

    for unit in units:
        todo = [b for b in unit if any(it.index not in index.records for it in b.items)]
        done = sum(len(b.items) for b in unit) - sum(len(b.items) for b in todo)
        summary.already_done += done
        if bar is not None:
            bar.update(done)
        if not todo:
            for batch in unit:  # a run killed after its shard's index lines, before it cleared its staging
                staged = os.path.join(out, output.PARTIAL, f"batch-{batch.number:06d}.tar")
                if os.path.exists(staged):
                    os.remove(staged)
            continue
        if fmt == "png":
            for batch in todo:
                made = make(batch)
                for record, data in made:
                    files.atomic_write(os.path.join(out, record["file"]), data, sync_folder=False)
                files.fsync_folder(out)  # once per batch: the renames are durable before the index names them
                index.add([r for r, _ in made])
                summary.made += len(made)
                if bar is not None:
                    bar.update(len(batch.items))
            continue
        # webdataset: each batch staged in OUT/.partial, then the whole shard written at once.
        shard = f"shard-{unit[0].number // per_unit:05d}.tar"
        staging = os.path.join(out, output.PARTIAL)
        os.makedirs(staging, exist_ok=True)
        members, records = [], []
        for batch in unit:
            staged = os.path.join(staging, f"batch-{batch.number:06d}.tar")
            if os.path.exists(staged):
                part = output.read_tar(staged)
            else:
                part = []
                for record, data in make(batch):
                    record = dict(record, file=shard)
                    part += [(f"{record['key']}.png", data),
                             (f"{record['key']}.json", json.dumps(record, sort_keys=True).encode())]
                    summary.made += 1
                files.atomic_write(staged, output.tar_bytes(part))
                if bar is not None:
                    bar.update(len(batch.items))
            members += part
            records += [json.loads(d) for name, d in part if name.endswith(".json")]
        files.atomic_write(os.path.join(out, shard), output.tar_bytes(members))
        index.add(records)
        for batch in unit:
            os.remove(os.path.join(staging, f"batch-{batch.number:06d}.tar"))
    if bar is not None:
        bar.close()

    if pc > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("unclip_jax.generate: all shares written")
    if pi == 0:
        index.finish()
        staging = os.path.join(out, output.PARTIAL)
        if os.path.isdir(staging) and not os.listdir(staging):
            os.rmdir(staging)
        index = output.Index(out)
        index.load()
    summary.skipped = len(summary.errors)
    summary.total = len(index.records)
    scores = [r["clip_score"] for r in index.records.values() if r.get("clip_score") is not None]
    summary.scored = len(scores)
    summary.mean_clip_score = float(np.mean(scores)) if scores else None
    summary.seconds = time.time() - t0
    return summary


def _bar(total: int, progress: bool | None):
    """A tqdm bar over items with items/s and the time left, on a terminal (or when asked)."""
    if not (sys.stderr.isatty() if progress is None else progress):
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="generate", unit="img", file=sys.stderr, smoothing=0.1)


def run_info_of(pipe, pipeline: str, model: str, **extra: Any) -> dict:
    """What every record carries about the run: the model, pipeline and scheduler (and `extra`)."""
    return {"model": model, "pipeline": pipeline, "scheduler": type(pipe.scheduler).__name__, **extra}
