"""The `unclip-jax` command.

    unclip-jax tiny DIR [--kind KIND]                    write a tiny random-weight checkpoint (no network)
    unclip-jax txt2img PROMPT --model M [--prior P]      text -> images (StableUnCLIPPipeline: prior + decoder)
    unclip-jax variation [PROMPT] --image I --model M    image variations (StableUnCLIPImg2ImgPipeline)
    unclip-jax depth2img PROMPT --image I --model M      depth-preserving image-to-image
    unclip-jax convert ... / unclip-jax bench ...        `unclip_jax.conversion` / `unclip_jax.bench`

Images are written as PNGs carrying their generation parameters (JSON, under the `parameters` key of
the PNG text). Every argument a user can get wrong is checked before the model is loaded; user mistakes
(a missing model, a bad size, an unknown scheduler, an unreadable image) end with one line on stderr and
exit status 2. Progress bars (loading, the compiled run, each sampling loop) show when stderr is a
terminal, or with --progress.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import textwrap
import threading
import time

PROG = "unclip-jax"

# Short scheduler names (any of `unclip_jax.schedulers.SCHEDULERS`' class names is accepted as well).
SCHEDULER_NAMES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2-a": "KDPM2AncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-single": "DPMSolverSinglestepScheduler",
    "dpm++-sde": "DPMSolverSDEScheduler",
    "deis": "DEISMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "edm-euler": "EDMEulerScheduler",
}
# Samples only the prior's embedding (its schedule is fixed to squaredcos_cap_v2): not a decoder scheduler.
_PRIOR_ONLY = ("UnCLIPScheduler",)

PIPELINES = {
    "txt2img": "StableUnCLIPPipeline",
    "variation": "StableUnCLIPImg2ImgPipeline",
    "depth2img": "StableDiffusionDepth2ImgPipeline",
}
# Subcommands that hand their arguments over whole to another module's `main(argv) -> int`.
DELEGATES = {
    "convert": ("unclip_jax.conversion", "convert a diffusers/PyTorch checkpoint to an orbax pipeline folder"),
    "bench": ("unclip_jax.bench", "measure sampling speed"),
}
DTYPES = ("fp32", "bf16")


class UsageError(Exception):
    """A user mistake, reported as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage dump), raised as a UsageError for the command's
    `main` to report (every `unclip-jax` command, the delegated `convert` and `bench` included)."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


_EXAMPLES = {
    "txt2img": f"""examples:
  {PROG} txt2img "a photo of a red fox" --model stabilityai/stable-diffusion-2-1-unclip-small \\
      --prior kakaobrain/karlo-v1-alpha
  {PROG} txt2img "a watercolor lighthouse" --model ./unclip-orbax --steps 30 --scheduler dpm++ --count 4 --out out
  {PROG} tiny tiny-unclip && {PROG} txt2img "a cat" --model tiny-unclip --steps 4 --prior-steps 4""",
    "variation": f"""examples:
  {PROG} variation --image fox.png --model stabilityai/stable-diffusion-2-1-unclip --noise-level 100
  {PROG} variation "in the snow" --image fox.png --model ./unclip-img2img-orbax --count 4 --seed 3""",
    "depth2img": f"""examples:
  {PROG} depth2img "a marble statue" --image room.png --model stabilityai/stable-diffusion-2-depth
  {PROG} depth2img "an oil painting" --image room.png --depth-map room_depth.png --strength 0.7 --size 512 \\
      --model ./depth-orbax --save-depth""",
}


def _scheduler_table() -> str:
    rows = [f"  {short:<13} {cls}" for short, cls in SCHEDULER_NAMES.items()]
    return "schedulers (--scheduler; short name or class name, any case):\n" + "\n".join(rows)


_OUTPUT_NOTE = ("PNGs go to --out, numbered on from the highest number there (nothing is overwritten), each "
                "carrying its generation parameters as JSON under the PNG text key `parameters`; their paths "
                "are printed on stdout, one a line.")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Stable unCLIP (with the Karlo prior) and Stable Diffusion depth-to-image "
                                       "in JAX.", formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"Run `{PROG} COMMAND --help` for a command's options.\n\nexample (no network needed):\n"
                       f"  {PROG} tiny tiny-unclip\n"
                       f"  {PROG} txt2img \"a photo of a cat\" --model tiny-unclip --steps 4 --prior-steps 4 "
                       "--out out")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    t = sub.add_parser("tiny", help="write a tiny random-weight checkpoint, for trying things out (no network)",
                       description="Writes a tiny random-weight pipeline folder (real layout, toy sizes, 32 x 32 "
                                   "images of structured noise) without torch or a network.")
    t.add_argument("out", help="folder to create (must not exist)")
    t.add_argument("--kind", default="unclip", choices=("unclip", "unclip_img2img", "depth2img"),
                   help="pipeline: unclip (for txt2img), unclip_img2img (for variation) or depth2img (default unclip)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")

    g = _generation_parser(sub, "txt2img", "generate images from a prompt (StableUnCLIPPipeline)",
                           "Text -> Karlo prior -> CLIP image embedding -> Stable unCLIP decoder -> PNGs.",
                           steps=20, guidance=10.0)
    g.add_argument("prompt", help="what to draw")
    g.add_argument("--prior", default=None, metavar="PATH_OR_REPO_ID",
                   help="take the prior (tokenizer, CLIP text model, PriorTransformer, scheduler) from this "
                        "pipeline: a Karlo UnCLIPPipeline (kakaobrain/karlo-v1-alpha, as diffusers' recipe "
                        "for stable-diffusion-2-1-unclip-small) or a StableUnCLIPPipeline; then --model may "
                        "be an image-variation checkpoint, whose decoder is used")
    g.add_argument("--prior-steps", type=int, default=25, metavar="N", help="prior denoising steps (default 25)")
    g.add_argument("--prior-guidance", type=float, default=4.0, metavar="SCALE", help="prior guidance scale (default 4)")
    _noise_level(g)
    _size(g, "image size in pixels, a multiple of 8 (default: the model's, 768 for the real checkpoints)")

    v = _generation_parser(sub, "variation", "variations of an image (StableUnCLIPImg2ImgPipeline)",
                           "Image -> CLIP image embedding (noised by --noise-level) -> Stable unCLIP decoder, "
                           "optionally guided by a prompt -> PNGs.", steps=20, guidance=10.0)
    v.add_argument("prompt", nargs="?", default="", help="optional text guidance (default: none)")
    v.add_argument("--image", required=True, metavar="PATH", help="the image to vary (any format PIL reads)")
    _noise_level(v)
    _size(v, "output size in pixels, a multiple of 8 (default: the model's, 768 for the real checkpoints)")

    d = _generation_parser(sub, "depth2img", "re-render an image from a prompt, keeping its depth "
                                             "(StableDiffusionDepth2ImgPipeline)",
                           "Image -> depth (estimated by the checkpoint's DPT, or --depth-map) + VAE latents "
                           "noised to --strength -> denoised under the prompt -> PNGs.", steps=50, guidance=7.5)
    d.add_argument("prompt", help="what the image should become")
    d.add_argument("--image", required=True, metavar="PATH", help="the image to re-render (any format PIL reads)")
    d.add_argument("--strength", type=float, default=0.8, metavar="S",
                   help="how much to change, in (0, 1]: int(steps * S) of the steps are run (default 0.8)")
    d.add_argument("--depth-map", default=None, metavar="PATH",
                   help="a depth image to use instead of the estimate (grayscale, near = bright; color is "
                        "read as luminance; any scale)")
    d.add_argument("--save-depth", action="store_true", help="also write the depth map used, as a 16-bit PNG")
    _size(d, "resize the input image to this size first, a multiple of 8 (default: as it is, cut down to a "
             "multiple of 8)")

    for name, (module, help_) in DELEGATES.items():
        # Only listed here: main() hands these their arguments untouched, so their own --help shows.
        sub.add_parser(name, help=f"{help_} (`{PROG} {name} --help`: {module})", add_help=False)
    return p


def _generation_parser(sub, name: str, help_: str, description: str, *, steps: int, guidance: float):
    p = sub.add_parser(name, help=help_, description=textwrap.fill(f"{description} {_OUTPUT_NOTE}", 78),
                       epilog=f"{_scheduler_table()}\n\n{_EXAMPLES[name]}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, metavar="PATH_OR_REPO_ID",
                   help="pipeline folder (diffusers layout, or written by save_pretrained / convert) or hub repo id")
    m.add_argument("--dtype", default="fp32", choices=DTYPES, help="compute dtype (default fp32)")
    m.add_argument("--variant", default=None, help='weight file variant of a diffusers folder, e.g. "fp16"')
    m.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    m.add_argument("--local-files-only", action="store_true", help="use the hub cache only, no download")
    s = p.add_argument_group("sampling")
    s.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what to steer away from (default: none)")
    s.add_argument("--steps", type=int, default=steps, metavar="N", help=f"denoising steps (default {steps})")
    s.add_argument("--guidance", type=float, default=guidance, metavar="SCALE",
                   help=f"classifier-free guidance scale; <= 1 turns guidance off (default {guidance:g})")
    s.add_argument("--scheduler", default=None, metavar="NAME",
                   help="decoder scheduler, built from the checkpoint's scheduler config as diffusers' "
                        "from_config does (names below; default: the checkpoint's)")
    s.add_argument("--eta", type=float, default=0.0, metavar="ETA", help="DDIM eta (default 0; other schedulers ignore it)")
    s.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0): same seed, same images")
    s.add_argument("--count", type=int, default=1, metavar="N", help="images to make (default 1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=".", metavar="DIR", help="output folder, created if missing (default: here)")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    return p


def _noise_level(p) -> None:
    p.add_argument("--noise-level", type=int, default=0, metavar="LEVEL",
                   help="noise added to the CLIP image embedding, 0 to 999: higher strays further (default 0)")


def _size(p, help_: str) -> None:
    p.add_argument("--size", type=int, default=None, metavar="PX", help=help_ + "; sets height and width")
    p.add_argument("--height", type=int, default=None, metavar="PX", help="height in pixels (instead of --size)")
    p.add_argument("--width", type=int, default=None, metavar="PX", help="width in pixels (instead of --size)")


# ---------------------------------------------------------------------------------------------------
# Checks before any model work


def scheduler_class(name: str) -> str:
    """A --scheduler name (short, or a class name, any case) -> the scheduler class name."""
    from unclip_jax.schedulers import SCHEDULERS  # noqa: PLC0415

    by_lower = {k.lower(): v for k, v in SCHEDULER_NAMES.items()}
    by_lower.update({k.lower(): k for k in SCHEDULERS if k not in _PRIOR_ONLY})
    if name.lower() not in by_lower:
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)} "
                         "(or a class name, e.g. EulerDiscreteScheduler)")
    return by_lower[name.lower()]


def _read_image(path: str, what: str):
    import PIL.Image  # noqa: PLC0415

    try:
        image = PIL.Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL reports broken files as any of these
        raise UsageError(f"{what} {path}: cannot read it as an image ({e})") from None
    return image


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(args) -> None:
    """Every check that needs no model; fills in args.scheduler_class, args.images."""
    from unclip_jax.pipelines import checks  # noqa: PLC0415

    for name in ("steps", "count", "prior_steps"):
        if getattr(args, name, None) is not None:
            checks.check_count(getattr(args, name), _flag(name))
    for name in ("guidance", "prior_guidance"):
        if getattr(args, name, None) is not None:
            checks.check_finite_real(getattr(args, name), _flag(name))
    checks.check_eta(args.eta, "--eta")
    if getattr(args, "noise_level", None) is not None:
        checks.check_noise_level(args.noise_level, None, "--noise-level")
    if getattr(args, "strength", None) is not None:
        checks.check_strength(args.strength, "--strength")
    if args.size is not None and (args.height is not None or args.width is not None):
        raise UsageError("give --size, or --height and --width, not both")
    if args.size is not None:
        checks.check_side(args.size, "--size", checks.VAE_FACTOR)
        args.height = args.width = args.size
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            checks.check_side(getattr(args, name), _flag(name), checks.VAE_FACTOR)
    if args.command == "depth2img" and (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width (or --size) to resize the input image")
    args.scheduler_class = None if args.scheduler is None else scheduler_class(args.scheduler)
    args.images = {}
    if getattr(args, "image", None) is not None:
        args.images["image"] = _read_image(args.image, "--image")
    if getattr(args, "depth_map", None) is not None:
        depth = _read_image(args.depth_map, "--depth-map")
        args.images["depth_map"] = depth if depth.mode in ("L", "I", "I;16", "F") else depth.convert("L")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if os.path.isdir(args.model):
        _check_pipeline_class(args.model, args)
    if getattr(args, "prior", None) is not None and os.path.isdir(args.prior):
        _prior_layout(args.prior)


def _check_pipeline_class(folder: str, args) -> None:
    """A folder made for another pipeline is named as such (instead of a missing-component error)."""
    from unclip_jax.weights.folder import read_model_index  # noqa: PLC0415

    found = read_model_index(folder).get("_class_name")
    want = PIPELINES[args.command]
    if found == want or found not in PIPELINES.values():
        return
    if getattr(args, "prior", None) is not None and found == PIPELINES["variation"]:
        return  # its decoder, with the --prior's prior
    other = next(c for c, p in PIPELINES.items() if p == found)
    hint = f"use `{PROG} {other}`"
    if args.command == "txt2img" and found == PIPELINES["variation"]:
        from unclip_jax.weights.folder import KARLO  # noqa: PLC0415

        hint = f"add --prior {KARLO} for text-to-image with its decoder, or {hint}"
    raise UsageError(f"{folder} is a {found} checkpoint; `{args.command}` needs a {want} ({hint})")


def _prior_layout(folder: str) -> dict[str, str]:
    """StableUnCLIPPipeline's prior components -> their names in the --prior folder."""
    from unclip_jax.weights.errors import CheckpointError  # noqa: PLC0415
    from unclip_jax.weights.folder import prior_layout  # noqa: PLC0415

    try:
        return prior_layout(folder)
    except CheckpointError as e:
        raise UsageError(f"--prior {e}") from None


# ---------------------------------------------------------------------------------------------------
# Progress


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _elapsed(label: str, enabled: bool):
    """A progress line showing the time spent so far on a step of unknown length (compilation, a
    whole pipeline call), refreshed from a thread while the main thread is busy in XLA."""
    if not enabled:
        yield
        return
    from tqdm import tqdm  # noqa: PLC0415

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


def _load(args, progress: bool):
    """(pipeline, params) for the command, with the scheduler swapped when asked."""
    import jax.numpy as jnp  # noqa: PLC0415

    import unclip_jax  # noqa: PLC0415
    from unclip_jax.weights.hub import resolve  # noqa: PLC0415
    from unclip_jax.schedulers import scheduler_from_config  # noqa: PLC0415
    from unclip_jax.weights.checkpoint import read_config  # noqa: PLC0415

    cls = getattr(unclip_jax, PIPELINES[args.command])
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    t0 = time.time()
    with _elapsed(f"loading {args.model}", progress):
        folder = resolve(args.model, cls.COMPONENTS, variant=args.variant, revision=args.revision,
                         local_files_only=args.local_files_only)
        _check_pipeline_class(folder, args)
        swap = {} if getattr(args, "prior", None) is None else {"prior": args.prior}
        if args.scheduler_class is not None:
            config = read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
            swap["scheduler"] = scheduler_from_config(config, class_name=args.scheduler_class)
        pipe, params = cls.from_pretrained(folder, dtype=dtype, variant=args.variant,
                                           local_files_only=args.local_files_only, **swap)
    _log(f"loaded {args.model} in {time.time() - t0:.1f}s")
    return pipe, params


# ---------------------------------------------------------------------------------------------------
# Commands


def _settings(args, pipe) -> dict:
    """The generation parameters a PNG records."""
    skip = {"out", "progress", "images", "scheduler_class", "save_depth", "size", "local_files_only"}
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    settings["scheduler"] = type(pipe.scheduler).__name__
    return settings


def _next_number(folder: str) -> int:
    """Files are numbered on from the highest number already in the folder: nothing is overwritten."""
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := re.match(r"(\d{5})-", f))]
    return max(numbers, default=-1) + 1


def _save(images, args, settings: dict, extra: dict | None = None) -> None:
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415

    import unclip_jax  # noqa: PLC0415

    os.makedirs(args.out, exist_ok=True)
    n = _next_number(args.out)
    for i, image in enumerate(images):
        info = PngInfo()
        info.add_text("parameters", json.dumps(dict(settings, index=i)))
        info.add_text("Software", f"unclip-jax {unclip_jax.__version__}")
        path = os.path.join(args.out, f"{n + i:05d}-{args.command}-{args.seed}.png")
        image.save(path, pnginfo=info)
        print(path, flush=True)
    for name, image in (extra or {}).items():
        path = os.path.join(args.out, f"{n:05d}-{args.command}-{args.seed}-{name}.png")
        image.save(path)
        print(path, flush=True)


def _common_call_args(args) -> dict:
    import jax  # noqa: PLC0415

    return dict(key=jax.random.key(args.seed), num_inference_steps=args.steps, guidance_scale=args.guidance,
                negative_prompt=args.negative_prompt, num_images_per_prompt=args.count, eta=args.eta)


def _generate(args, progress: bool) -> None:
    import numpy as np  # noqa: PLC0415
    import PIL.Image  # noqa: PLC0415

    pipe, params = _load(args, progress)
    settings = _settings(args, pipe)
    kw = dict(_common_call_args(args), params=params, progress_bar=progress)
    extra = {}
    t0 = time.time()
    with _elapsed("generating (compiles on first use)", progress):
        if args.command == "txt2img":
            images = pipe(args.prompt, height=args.height, width=args.width, noise_level=args.noise_level,
                          prior_num_inference_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance,
                          **kw).images
        elif args.command == "variation":
            images = pipe(args.images["image"], args.prompt, height=args.height, width=args.width,
                          noise_level=args.noise_level, **kw).images
        else:
            image = args.images["image"]
            if args.height is not None:
                image = image.resize((args.width, args.height), resample=PIL.Image.LANCZOS)
            depth = args.images.get("depth_map")
            if depth is None and args.save_depth:
                depth = np.asarray(pipe.estimate_depth(params, image))
            if args.save_depth:
                d = np.asarray(depth, np.float64)
                d = (d - d.min()) / max(d.max() - d.min(), 1e-12)
                extra["depth"] = PIL.Image.fromarray(np.round(d.reshape(d.shape[-2:]) * 65535).astype(np.uint16))
            images = pipe(args.prompt, image, depth_map=depth, strength=args.strength, **kw).images
    _log(f"generated {len(images)} image(s) in {time.time() - t0:.1f}s")
    _save(images, args, settings, extra)


def _tiny(args) -> None:
    from unclip_jax.tiny import write_tiny  # noqa: PLC0415

    print(write_tiny(args.kind, args.out, seed=args.seed))


def _delegate(command: str, argv: list[str]) -> int:
    module_name = DELEGATES[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise UsageError(f"not available: this install has no {module_name}") from None
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        if command in DELEGATES:
            return _delegate(command, argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "tiny":
            _tiny(args)
            return 0
        _check(args)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        _generate(args, progress)
    except (UsageError, ValueError, OSError) as e:
        # Project errors (CheckpointError, UnsupportedConfigError, SchedulerConfigError) are ValueErrors;
        # OSError covers unreadable or unwritable files.
        where = f"{PROG} {command}" if command in PIPELINES or command in DELEGATES or command == "tiny" else PROG
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"{where}: error: {lines[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
