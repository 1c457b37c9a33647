"""A training run: checks, loading, the step loop, checkpoints, metrics, validation grids, the final folder.

    from unclip_jax.training.loop import RunConfig, train
    from unclip_jax.training.step import StepConfig
    train(RunConfig(objective="decoder", model="tiny-unclip", data="my-folder", out="run", batch_size=4,
                    seed=0, save_every=100, step=StepConfig(steps=1000, learning_rate=1e-5)))

OUT holds:
  metrics.jsonl       one JSON object per optimizer step: step, loss, lr, grad_norm, the objective's
                      metrics, epoch, skipped (bad records so far), and the timings steps_per_s and
                      samples_per_s (the only fields that differ between identical runs)
  tensorboard/        the same scalars and the validation grids, as TensorBoard event files (tensorboardX)
  checkpoints/        orbax checkpoints (see checkpoint.py); `resume=True` continues from the newest
  validation/         step-XXXXXX.png: the validation prompts sampled with the EMA params, one image per
                      prompt, left to right (at step 0, every `validation_every` steps and at the end)
  final/              written by the objective's `save` from the EMA params (or the trained ones without an
                      EMA): a folder that `objective.pipeline_class.from_pretrained` loads

Every check that can fail on the user's input (the data, the output folder and its final/, the
resolution, the batch and mesh, a checkpoint to resume) runs before the first step and before anything is
written to OUT.

Several processes (after `jax.distributed.initialize()`, the same config everywhere, OUT and the data on a
file system they share): the mesh spans every process's devices; each process reads and collates only its
rows of each global batch (`DataIterator.next_batch(rows, exchange)`, `Layout.put_rows`), so the step sees
the batch a single process would build; orbax saves and restores checkpoints with all of them; process 0
alone writes metrics.jsonl, TensorBoard, train_config.json, the validation grids (it samples them on its
own devices) and final/, from params gathered where they are sharded across processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from unclip_jax import files
from unclip_jax.training.checkpoint import (
    METRICS,
    Checkpoints,
    ResumeError,
    check_compatible,
    signature,
    truncate_metrics,
)
from unclip_jax.training.data import DEFAULT_DEPTH_COLUMN, DataIterator, open_source, transform
from unclip_jax.training.step import StepConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's settings (the `unclip-jax train` options; see `command.py` for each one's meaning)."""

    objective: str
    model: str
    data: Any  # a folder or a datasets.Dataset
    out: str
    batch_size: int
    step: StepConfig
    seed: int = 0
    save_every: int = 500
    keep: int = 3
    resume: bool = False
    resolution: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "lanczos"
    image_column: str = "image"
    caption_column: str = "text"
    depth_column: str | None = None
    skip_missing_files: bool = False
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 0  # 0: only at the start and the end (if there are prompts)
    validation_steps: int = 20
    remat: bool = False
    fsdp: int = 1
    objective_options: dict = dataclasses.field(default_factory=dict)
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    log_every: int = 1  # steps between TensorBoard scalar writes
    cache_latents: bool = False  # the frozen encoders' outputs computed once per picture (`_LatentCache`)


def _log(msg: str) -> None:
    print(f"unclip-jax train: {msg}", file=sys.stderr, flush=True)


def check_out(out: str) -> None:
    """OSError unless `out` can be created (or written, if it exists); creates nothing."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"--out {out}: exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise OSError(f"--out {out}: {probe} is not writable")


# The unCLIP pipeline an objective trains, where one folder holds the components of both (the default
# model's folder serves StableUnCLIPPipeline and StableUnCLIPImg2ImgPipeline).
UNCLIP_PIPELINE = {"decoder": "StableUnCLIPImg2ImgPipeline", "prior": "StableUnCLIPPipeline",
                   "clip": "StableUnCLIPPipeline"}


def _load_pipeline(model: str, dtype, remat: bool, objective: str | None = None):
    """(pipe, params) of the pipeline class named by `model`'s model_index.json (or, for an unCLIP folder
    that also holds every component of the unCLIP pipeline `objective` trains, of that one), the models'
    compute dtype `dtype`, their blocks rematerialised if `remat`."""
    import unclip_jax  # noqa: PLC0415
    from unclip_jax.weights.hub import resolve  # noqa: PLC0415
    from unclip_jax.weights.folder import read_model_index  # noqa: PLC0415

    folder = resolve(model, ())
    index = read_model_index(folder)
    name = index.get("_class_name")
    wanted = UNCLIP_PIPELINE.get(objective or "")
    if wanted and name in UNCLIP_PIPELINE.values() and all(
            c in index for c in getattr(unclip_jax, wanted).COMPONENTS):
        name = wanted
    cls = getattr(unclip_jax, str(name), None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"--model {model}: pipeline class {name!r} is not one this package trains")
    pipe, params = cls.from_pretrained(folder, dtype=dtype)
    if remat:
        for component in pipe.COMPONENTS:
            module = getattr(pipe, component)
            if hasattr(module, "remat") and hasattr(module, "clone"):
                setattr(pipe, component, module.clone(remat=True))
    return pipe, params


def _default_build(name: str, pipe, params, options: dict):
    try:
        from unclip_jax.training.objectives import build_objective  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(f"objective {name!r}: the objectives are not available in this install ({e})") from None
    return build_objective(name, pipe, params, options)


def _check_resolution(pipe, resolution: int) -> None:
    factor = getattr(pipe, "vae_scale_factor", 1)
    unet = getattr(pipe, "unet", None)
    if unet is not None and hasattr(getattr(unet, "config", None), "downsample_factor"):
        factor *= unet.config.downsample_factor
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"--resolution {resolution}: must be a positive multiple of {factor} (the VAE's "
                         f"factor {getattr(pipe, 'vae_scale_factor', 1)} times the UNet's downsampling)")


def _default_resolution(pipe) -> int:
    unet = getattr(pipe, "unet", None)
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    if isinstance(size, int):
        return size * getattr(pipe, "vae_scale_factor", 1)
    raise ValueError("--resolution is required for this model (it has no UNet sample_size)")


# ---------------------------------------------------------------------------------------------- validation


def _validation_images(pipe, params, prompts, *, key, resolution: int, steps: int, image) -> np.ndarray:
    """[N, R, R, 3] float in [0, 1]: one image per prompt."""
    name = type(pipe).__name__
    common = dict(params=params, key=key, num_inference_steps=steps, output_type="np", height=resolution,
                  width=resolution)
    if "Img2Img" in name:
        return np.asarray(pipe([image] * len(prompts), prompt=list(prompts), **common).images)
    if "Depth2Img" in name:
        common.pop("height"), common.pop("width")
        return np.asarray(pipe(list(prompts), image=[image] * len(prompts), **common).images)
    return np.asarray(pipe(list(prompts), **common).images)


def write_grid(images: np.ndarray, path: str) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] side by side, written to `path` as a PNG atomically; returns the grid."""
    from PIL import Image  # noqa: PLC0415

    grid = np.concatenate(list(np.clip(images, 0, 1)), axis=1)
    grid = (grid * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write(path, files.png_bytes(Image.fromarray(grid)))
    return grid


# ---------------------------------------------------------------------------------------------- the run


class _Metrics:
    """metrics.jsonl (appended and flushed per step) and TensorBoard; written by process 0 only."""

    def __init__(self, out: str, start: int, log_every: int, primary: bool = True):
        self.primary = primary
        self.tb = self.file = None
        if not primary:
            return
        self.path = os.path.join(out, METRICS)
        truncate_metrics(self.path, start)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self.log_every = log_every
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
        except ImportError:
            self.tb = None
            _log("tensorboardX is not installed: no TensorBoard events")
        else:
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, row: dict) -> None:
        if not self.primary:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None and row["step"] % self.log_every == 0:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def image(self, grid: np.ndarray, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image("validation", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def train(config: RunConfig, *, load: Callable | None = None, build: Callable | None = None) -> str:
    """Runs `config`; returns OUT/final. `load(model) -> (pipe, params)` and `build(name, pipe, params,
    options) -> (objective, pipe, params)` replace the pipeline loader and `build_objective` (tests)."""
    import jax  # noqa: PLC0415

    from unclip_jax.sharding import Layout, make_mesh, place, process_any  # noqa: PLC0415
    from unclip_jax.training import step as steps  # noqa: PLC0415
    from unclip_jax.weights.folder import check_destination  # noqa: PLC0415

    sc = config.step
    # ---- checks that need nothing loaded
    if config.batch_size < 1 or sc.steps < 1 or config.save_every < 1 or config.keep < 1:
        raise ValueError("--batch-size, --steps, --save-every and --keep must be at least 1")
    if config.cache_latents and (config.random_flip or not config.center_crop):
        raise ValueError("--cache-latents encodes each picture once, so its crop must not vary: it needs "
                         "--center-crop and no --random-flip")
    check_out(config.out)
    depth_column = config.depth_column
    if depth_column is None and config.objective == "depth" and not config.objective_options.get("depth_from_model"):
        depth_column = DEFAULT_DEPTH_COLUMN
    source = open_source(config.data, depth_column=depth_column, image_column=config.image_column,
                         text_column=config.caption_column, skip_missing=config.skip_missing_files)
    if source.skipped:
        counts = ", ".join(f"{v} record(s) with {k}" for k, v in source.skipped.items())
        _log(f"{source.description}: skipping {counts}")
    layout = Layout(make_mesh(config.fsdp))
    steps.check_batch(layout, sc, config.batch_size)
    ckpt_dir = os.path.join(config.out, "checkpoints")
    final = os.path.join(config.out, "final")
    check_destination(final, overwrite=True)  # what would refuse to replace OUT/final: now, not at the end
    if not config.resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ResumeError(f"--out {config.out} holds checkpoints of a run: pass --resume to continue it, or "
                          f"choose another --out")
    checkpoints, start, resume_meta = None, 0, None
    if config.resume and os.path.isdir(ckpt_dir):
        checkpoints = Checkpoints(config.out, every=config.save_every, keep=config.keep)
        latest = checkpoints.latest_step()
        if latest is not None:
            start, resume_meta = latest, checkpoints.read_meta(latest)
            # The objective first, before the model is loaded; the trained tree once it is built.
            check_compatible(resume_meta, objective=config.objective, model=config.model,
                             trainable_signature=resume_meta.get("signature"),
                             where=os.path.join(ckpt_dir, str(latest)))

    # ---- the model and the objective
    pipe, params = (load or (lambda m: _load_pipeline(m, sc.compute_dtype, config.remat, config.objective)))(config.model)
    resolution = config.resolution or _default_resolution(pipe)
    _check_resolution(pipe, resolution)
    options = {"resolution": resolution, **config.objective_options}
    objective, pipe, params = (build or _default_build)(config.objective, pipe, params, options)
    if config.cache_latents and objective.cache is None:
        raise ValueError(f"--cache-latents: the {objective.name} objective has no frozen encoder outputs to "
                         "cache (the decoder and depth objectives have)")
    trainable, frozen = objective.split(params)
    sig = signature(trainable)

    if resume_meta is not None:
        check_compatible(resume_meta, objective=objective.name, model=config.model, trainable_signature=sig,
                         where=os.path.join(ckpt_dir, str(start)))
    if config.resume and resume_meta is None:
        _log(f"--resume: no complete checkpoint in {ckpt_dir}; starting from step 0")

    iterator = DataIterator(source, batch_size=config.batch_size * sc.gradient_accumulation_steps,
                            resolution=resolution, seed=config.seed, center_crop=config.center_crop,
                            random_flip=config.random_flip, interpolation=config.interpolation)
    state = steps.init_state(sc, trainable, config.seed)
    state = jax.tree.map(lambda x: place(x, layout.param(np.shape(x))), state)
    master_frozen = frozen  # what OUT/final is written from (the step may get a bf16 copy)
    frozen = steps.cast_floating(frozen, sc.compute_dtype) if sc.mixed_precision != "no" else frozen
    frozen = layout.put_params(frozen)
    if resume_meta is not None:
        state = checkpoints.restore(start, state)
        iterator.restore(resume_meta["data"])
        _log(f"resumed from step {start} ({os.path.join(ckpt_dir, str(start))})")

    cache = None
    if config.cache_latents and start < sc.steps:  # a finished run resumed takes no step
        cache = _LatentCache.build(objective, objective.merge(trainable, frozen), source, resolution, config,
                                   chunk=config.batch_size * sc.gradient_accumulation_steps)

    # ---- OUT is written from here on
    os.makedirs(config.out, exist_ok=True)
    if checkpoints is None:
        checkpoints = Checkpoints(config.out, every=config.save_every, keep=config.keep)
    primary = jax.process_index() == 0
    if primary:  # what a killed run left half-written (our own temporaries only)
        for folder in (config.out, os.path.join(config.out, "validation")):
            files.remove_temporaries(folder)
    metrics = _Metrics(config.out, start, config.log_every, primary)
    if primary:
        files.atomic_write(os.path.join(config.out, "train_config.json"),
                           json.dumps(_describe(config, resolution), indent=2))

    validation = None
    if config.validation_prompts:
        validation = _Validation(config, objective, pipe, source, resolution, metrics)
    if validation is not None and start == 0:
        validation.run(0, state, master_frozen)

    # Each process reads and collates only its rows of every global batch (all of them with one process).
    examples = config.batch_size * sc.gradient_accumulation_steps
    rows = layout.process_rows(examples)
    exchange = process_any if jax.process_count() > 1 else None

    def next_local_batch():
        examples = iterator.next_batch(rows, exchange)
        batch = objective.collate(examples)
        return batch if cache is None else cache.replace(batch, [e["record"] for e in examples])

    pending = next_local_batch() if start < sc.steps else None
    step_fn = None if pending is None else steps.compile_step(objective, sc, layout, state, frozen, pending)
    bar = _progress_bar(config, start, sc.steps) if primary else None
    meta = {"objective": objective.name, "model": config.model, "signature": sig, "seed": config.seed}
    try:
        t0 = time.perf_counter()
        for n in range(start + 1, sc.steps + 1):
            batch = pending if pending is not None else next_local_batch()
            pending = None
            batch = {k: layout.put_rows(v, rows, examples) for k, v in batch.items()}
            state, out = step_fn(state, frozen, batch)
            out = {k: float(v) for k, v in jax.device_get(out).items()}
            t1 = time.perf_counter()
            row = {"step": n, **out, "epoch": iterator.epoch, "skipped": iterator.skipped,
                   "steps_per_s": 1.0 / max(t1 - t0, 1e-9), "samples_per_s": examples / max(t1 - t0, 1e-9)}
            t0 = t1
            metrics.write(row)
            if checkpoints.due(n, sc.steps):
                checkpoints.save(n, state, {**meta, "step": n, "data": iterator.state()})
            if validation is not None and config.validation_every and n % config.validation_every == 0 \
                    and n != sc.steps:
                validation.run(n, state, master_frozen)
            if bar is not None:
                bar.set_postfix(loss=f"{out['loss']:.4f}", refresh=False)
                bar.update(1)
        if validation is not None and start < sc.steps:
            validation.run(sc.steps, state, master_frozen)
        checkpoints.wait()
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        checkpoints.close()

    params = _final_params(objective, state, master_frozen)  # every process: it may gather
    error = None
    if primary:
        try:
            _save_final(objective, pipe, params, final)
        except Exception as e:  # noqa: BLE001 - raised below, after the other processes hear of it
            error = e
    # Every process returns once OUT/final is written, or raises if it could not be (rather than one
    # process failing while the others wait for it).
    if process_any([error is not None])[0] and error is None:
        raise OSError(f"process 0 could not write {final} (see its log)")
    if error is not None:
        raise error
    return final


def _final_params(objective, state, frozen):
    """The EMA (or the trained params, without one), whole on this process (gathered from the others
    where they are sharded across processes: every process calls this), merged into the untouched
    frozen params."""
    import jax  # noqa: PLC0415

    from unclip_jax.sharding import local_copy  # noqa: PLC0415

    trained = state.ema if state.ema is not None else state.trainable
    return objective.merge(jax.tree.map(local_copy, trained), frozen)


def _save_final(objective, pipe, params, final: str) -> None:
    """objective.save into a temporary sibling, swapped in for OUT/final in one step."""
    from unclip_jax.weights.folder import atomic_folder  # noqa: PLC0415

    with atomic_folder(final, overwrite=True) as tmp:
        os.rmdir(tmp)  # objective.save writes a folder that must not exist
        objective.save(tmp, pipe, params)


class _Validation:
    def __init__(self, config: RunConfig, objective, pipe, source, resolution: int, metrics: _Metrics):
        self.config, self.objective, self.resolution, self.metrics = config, objective, resolution, metrics
        cls = objective.pipeline_class
        if isinstance(pipe, cls):
            self.pipe = pipe
        else:
            self.pipe = cls(**{n: getattr(pipe, n) for n in cls.COMPONENTS})
        image = None
        for record in source.records:
            try:
                image = transform(record, resolution, center_crop=True, random_flip=False,
                                  rng=np.random.default_rng(0))["image"]
                break
            except Exception:  # noqa: BLE001 - a bad record: try the next one
                continue
        from PIL import Image  # noqa: PLC0415

        self.image = None if image is None else Image.fromarray(image)

    def run(self, step: int, state, frozen) -> None:
        """Called by every process (the params may need gathering); process 0 alone samples, on its own
        devices, and writes the grid."""
        import jax  # noqa: PLC0415

        params = _final_params(self.objective, state, frozen)
        if not self.metrics.primary:
            return
        images = _validation_images(self.pipe, params, self.config.validation_prompts,
                                    key=jax.random.key(self.config.seed), resolution=self.resolution,
                                    steps=self.config.validation_steps, image=self.image)
        path = os.path.join(self.config.out, "validation", f"step-{step:06d}.png")
        self.metrics.image(write_grid(images, path), step)


class _LatentCache:
    """`--cache-latents`: the objective's `cache` outputs (its frozen encoders' results, e.g. the VAE
    posterior and the CLIP image embedding) for every record of the source, computed once before the
    first step, in record order, in chunks of the step's batch size (the last padded, so one executable
    serves all). Batches then carry them in place of the inputs they replace (`objective.cache_replaces`),
    looked up by each example's record index; the loss gives what it would give on the raw batch.
    Held in host memory (every process holds all records): for datasets of up to some hundred thousand
    small pictures, as diffusers' scripts precompute VAE latents."""

    def __init__(self, arrays: dict[str, np.ndarray], replaces: tuple[str, ...]):
        self.arrays, self.replaces = arrays, replaces

    @classmethod
    def build(cls, objective, params, source, resolution: int, config: RunConfig, chunk: int) -> "_LatentCache":
        import jax  # noqa: PLC0415

        from unclip_jax.training.data import BadRecord  # noqa: PLC0415

        n = len(source)
        _log(f"--cache-latents: encoding the {n} records once")
        t0 = time.perf_counter()
        encode = jax.jit(objective.cache)
        arrays: dict[str, np.ndarray] = {}
        bar = _progress_bar(config, 0, n, desc="cache", unit="picture")
        for start in range(0, n, chunk):
            examples, where = [], []
            for i in range(start, min(start + chunk, n)):
                try:
                    examples.append(transform(source.records[i], resolution, center_crop=True, random_flip=False,
                                              rng=np.random.default_rng(0), interpolation=config.interpolation))
                except BadRecord:  # skipped by the iterator too: never looked up
                    continue
                where.append(i)
            if examples:
                real = len(examples)
                examples += examples[:1] * (chunk - real)
                out = jax.device_get(encode(params, objective.collate(examples)))
                for k, v in out.items():
                    if k not in arrays:
                        arrays[k] = np.zeros((n, *np.shape(v)[1:]), np.asarray(v).dtype)
                    arrays[k][where] = np.asarray(v)[:real]
            if bar is not None:
                bar.update(min(start + chunk, n) - start)
        if bar is not None:
            bar.close()
        size = sum(a.nbytes for a in arrays.values()) / 2 ** 20
        _log(f"--cache-latents: {', '.join(arrays)} of {n} records in {time.perf_counter() - t0:.0f} s ({size:.0f} MB)")
        return cls(arrays, objective.cache_replaces)

    def replace(self, batch: dict, records: list[int]) -> dict:
        """`batch` with the cached values of `records` in place of the inputs they replace."""
        out = {k: v for k, v in batch.items() if k not in self.replaces}
        out.update({k: a[records] for k, a in self.arrays.items()})
        return out


def _progress_bar(config: RunConfig, start: int, total: int, desc: str = "train", unit: str = "step"):
    show = sys.stderr.isatty() if config.progress is None else config.progress
    if not show:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=start, desc=desc, unit=unit, file=sys.stderr)


def _describe(config: RunConfig, resolution: int) -> dict:
    d = dataclasses.asdict(config)
    d["data"] = config.data if isinstance(config.data, str) else repr(config.data)
    d["resolution"] = resolution
    return d
