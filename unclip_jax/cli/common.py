"""What the generating commands (txt2img, variation, depth2img) share: the checks that read files but
load no model, loading the pipeline, progress lines, and writing the PNGs.

Without --model a command uses the default model shipped in the package (`unclip_jax.toy.default`): its
`unclip` folder for txt2img and variation (the one folder serves both unCLIP pipelines), its `depth2img`
folder for depth2img; PNGs record it as `default:FOLDER@DIGEST`.

The library (jax and the pipelines) is imported inside the functions that load or run a model: importing
it costs about 3 s, and `--help` or a refused argument must not pay it (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time

from unclip_jax import files
from unclip_jax.cli.parsing import PROG, UsageError

PIPELINES = {
    "txt2img": "StableUnCLIPPipeline",
    "variation": "StableUnCLIPImg2ImgPipeline",
    "depth2img": "StableDiffusionDepth2ImgPipeline",
}
# command -> the default model's folder that an absent --model means
DEFAULT_MODELS = {"txt2img": "unclip", "variation": "unclip", "depth2img": "depth2img"}
# Flags that only mean something for a --model (the default model is a local orbax folder).
_MODEL_ONLY = ("prior", "variant", "revision")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Checks that read files but load no model


def read_image(path: str, what: str):
    import PIL.Image  # noqa: PLC0415  (import time: see the module docstring)

    try:
        image = PIL.Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL reports broken files as any of these
        raise UsageError(f"{what} {path}: cannot read it as an image ({e})") from None
    return image


def check_out(out: str) -> None:
    """--out must be a writable folder, or creatable: found now, not after generating."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out}: exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: cannot be created ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot be created ({parent} is not writable)")


def check_model_folder(args) -> None:
    """A local --model (and --prior) folder, before loading (a hub repo id: once resolved, see `load`);
    without --model, the shipped default model's files (sizes only) and configs. Guidance left unset
    becomes the command's default, or the default model's (`toy.default.SAMPLING`)."""
    from unclip_jax.toy import default  # noqa: PLC0415  (standard library only)

    settings = getattr(args, "model_guidance", {})
    if args.model is None:
        settings = {k: v for k, v in default.SAMPLING[args.command].items() if k in settings}
    for key, value in settings.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model is None:
        for name in _MODEL_ONLY:
            if getattr(args, name, None) is not None:
                raise UsageError(f"--{name} applies to a --model; the default model takes none (give --model too)")
        name = DEFAULT_MODELS[args.command]
        default.check_shipped(name)  # a DefaultModelMissing (an OSError) names the missing file
        check_pipeline_folder(os.path.join(default.weights_dir(), name), args)
        return
    if getattr(args, "prior", None) is not None and os.path.isdir(args.prior):
        prior_layout(args.prior)
    if os.path.isdir(args.model):
        check_pipeline_folder(args.model, args)


def model_name(args) -> str:
    """--model, or the default model's `default:FOLDER@DIGEST` (what logs and PNGs record)."""
    if args.model is not None:
        return args.model
    from unclip_jax.toy import default  # noqa: PLC0415

    return default.model_id(DEFAULT_MODELS[args.command])


def check_pipeline_folder(folder: str, args) -> None:
    """The right pipeline class, and a --noise-level its image noising schedule has (read from the
    scheduler's JSON config; no weights are read)."""
    from unclip_jax.pipelines import checks  # noqa: PLC0415  (import time)
    from unclip_jax.weights.checkpoint import read_config  # noqa: PLC0415
    from unclip_jax.weights.folder import read_model_index  # noqa: PLC0415

    index = read_model_index(folder)
    check_pipeline_class(folder, index.get("_class_name"), args, index)
    if getattr(args, "noise_level", None) is not None and "image_noising_scheduler" in index:
        config = read_config(os.path.join(folder, "image_noising_scheduler"), "scheduler_config.json")
        # diffusers' DDPMScheduler default when the config leaves it out
        checks.check_noise_level(args.noise_level, int(config.get("num_train_timesteps", 1000)), "--noise-level")


def check_pipeline_class(folder: str, found: str | None, args, index: dict | None = None) -> None:
    """A folder made for another pipeline is named as such (instead of a missing-component error). A
    StableUnCLIPPipeline folder that also holds an image encoder and its processor (the default model's)
    serves variation too."""
    want = PIPELINES[args.command]
    if found == want or found not in PIPELINES.values():
        return
    if (args.command == "variation" and found == PIPELINES["txt2img"]
            and all((index or {}).get(k) for k in ("image_encoder", "feature_extractor"))):
        return
    if getattr(args, "prior", None) is not None and found == PIPELINES["variation"]:
        return  # its decoder, with the --prior's prior
    other = next(c for c, p in PIPELINES.items() if p == found)
    hint = f"use `{PROG} {other}`"
    if args.command == "txt2img" and found == PIPELINES["variation"]:
        from unclip_jax.weights.folder import KARLO  # noqa: PLC0415  (import time)

        hint = f"add --prior {KARLO} for text-to-image with its decoder, or {hint}"
    raise UsageError(f"{folder} is a {found} checkpoint; `{args.command}` needs a {want} ({hint})")


def prior_layout(folder: str) -> dict[str, str]:
    """StableUnCLIPPipeline's prior components -> their names in the --prior folder."""
    from unclip_jax.weights.errors import CheckpointError  # noqa: PLC0415  (import time)
    from unclip_jax.weights.folder import prior_layout as layout  # noqa: PLC0415

    try:
        return layout(folder)
    except CheckpointError as e:
        raise UsageError(f"--prior {e}") from None


# ---------------------------------------------------------------------------------------------------
# Loading and progress


@contextlib.contextmanager
def elapsed(label: str, enabled: bool):
    """A progress line showing the time spent so far on a step of unknown length (compilation, a
    whole pipeline call), refreshed from a thread while the main thread is busy in XLA."""
    if not enabled:
        yield
        return
    from tqdm import tqdm  # noqa: PLC0415  (import time)

    bar = tqdm(desc=label, total=None, bar_format="{desc}: {elapsed}", leave=False, file=sys.stderr)
    done = threading.Event()

    def refresh():
        while not done.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def load(args, progress: bool):
    """(pipeline, params) for the command, with the scheduler swapped when asked."""
    import jax.numpy as jnp  # noqa: PLC0415  (import time)

    import unclip_jax  # noqa: PLC0415
    from unclip_jax.schedulers import scheduler_from_config  # noqa: PLC0415
    from unclip_jax.weights.checkpoint import read_config  # noqa: PLC0415
    from unclip_jax.weights.hub import resolve  # noqa: PLC0415

    cls = getattr(unclip_jax, PIPELINES[args.command])
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    t0 = time.time()
    name = model_name(args)
    with elapsed(f"loading {name}", progress):
        if args.model is None:
            from unclip_jax.toy import default  # noqa: PLC0415

            folder = default.pipeline_folder(DEFAULT_MODELS[args.command])  # made once, in the cache
        else:
            folder = resolve(args.model, cls.COMPONENTS, variant=args.variant, revision=args.revision,
                             local_files_only=args.local_files_only)
        check_pipeline_folder(folder, args)
        swap = {} if getattr(args, "prior", None) is None else {"prior": args.prior}
        if args.scheduler_class is not None:
            config = read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
            swap["scheduler"] = scheduler_from_config(config, class_name=args.scheduler_class)
        pipe, params = cls.from_pretrained(folder, dtype=dtype, variant=args.variant,
                                           local_files_only=args.local_files_only, **swap)
    log(f"loaded {name} in {time.time() - t0:.1f}s")
    return pipe, params


def call_arguments(args, params, progress: bool) -> dict:
    """The pipeline call's keywords that every generating command passes."""
    import jax  # noqa: PLC0415  (import time)

    return dict(params=params, key=jax.random.key(args.seed), num_inference_steps=args.steps,
                guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                num_images_per_prompt=args.count, eta=args.eta, progress_bar=progress)


def generate(args, progress: bool, call) -> None:
    """The run of a command that loads its pipeline, calls it once and saves what it made:
    `call(pipe, keywords)` calls the pipeline with the command's own arguments and `keywords` (the
    `call_arguments`, params included) and returns the images."""
    pipe, params = load(args, progress)
    recorded = settings(args, pipe)
    t0 = time.time()
    with elapsed("generating (compiles on first use)", progress):
        images = call(pipe, call_arguments(args, params, progress))
    log(f"generated {len(images)} image(s) in {time.time() - t0:.1f}s")
    save(images, args, recorded)


# ---------------------------------------------------------------------------------------------------
# Output

# Arguments that are not generation parameters (or are recorded otherwise: --size as height and width).
_NOT_RECORDED = {"out", "progress", "images", "scheduler_class", "save_depth", "size", "local_files_only",
                 "compile_cache", "max_pixels"}


def settings(args, pipe) -> dict:
    """The generation parameters a PNG records."""
    recorded = {k: v for k, v in vars(args).items() if k not in _NOT_RECORDED}
    recorded["model"] = model_name(args)
    recorded["scheduler"] = type(pipe.scheduler).__name__
    return recorded


def _next_number(folder: str) -> int:
    """Files are numbered on from the highest number already in the folder: nothing is overwritten."""
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := re.match(r"(\d{5})-", f))]
    return max(numbers, default=-1) + 1


def _write_png(image, path: str, parameters: dict) -> None:
    """Written atomically: a killed run leaves no half-written PNG."""
    files.atomic_write(path, files.png_bytes(image, parameters))
    print(path, flush=True)


def save(images, args, recorded: dict, extra: dict | None = None) -> None:
    """PNGs `NNNNN-COMMAND-SEED-INDEX.png` (INDEX: the image's place in this run), each recording its
    parameters with its real height and width; `extra` {name: image} as `NNNNN-COMMAND-SEED-name.png`."""
    os.makedirs(args.out, exist_ok=True)
    n = _next_number(args.out)
    for i, image in enumerate(images):
        path = os.path.join(args.out, f"{n + i:05d}-{args.command}-{args.seed}-{i}.png")
        _write_png(image, path, dict(recorded, index=i, height=image.height, width=image.width))
    for name, image in (extra or {}).items():
        path = os.path.join(args.out, f"{n:05d}-{args.command}-{args.seed}-{name}.png")
        _write_png(image, path, dict(recorded, image_kind=name, height=image.height, width=image.width))
