"""Argument parsing for every `unclip-jax` command: the one-line parser, the argument groups the
generating commands share, and the checks that need nothing but the arguments.

Imports only the standard library, so `--help` stays fast; the argument checks import the pipelines'
model-free checks (and with them numpy), never jax.
"""

from __future__ import annotations

import argparse
import textwrap

PROG = "unclip-jax"

# Short scheduler names; the class names themselves (the values, any case) are accepted as well. The set of
# values is every decoder scheduler in `unclip_jax.schedulers.SCHEDULERS` (a test keeps them equal).
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

DTYPES = ("fp32", "bf16")


class UsageError(Exception):
    """A user mistake, reported as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage dump), raised as a UsageError for `main` to report."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def command_parser(sub, name: str, help_: str, description: str, examples: str = "", *, notes: str = ""):
    """A subcommand's parser: the description wrapped, then `notes` and `examples` verbatim."""
    epilog = "\n\n".join(part for part in (notes, examples) if part)
    return sub.add_parser(name, help=help_, description=textwrap.fill(description, 78), epilog=epilog or None,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


_OUTPUT_NOTE = ("PNGs go to --out, numbered on from the highest number there (nothing is overwritten), each "
                "carrying its generation parameters as JSON under the PNG text key `parameters`; their paths "
                "are printed on stdout, one a line.")


# What --model means when it is left out: the default model shipped in the package (unclip_jax.toy.default).
DEFAULT_MODEL_HELP = ("default: the built-in toy-domain model, one shape of one colour on a plain background, "
                      "64 x 64 pictures, trained by the project on a CPU")


def add_model_argument(group, folder: str) -> None:
    """--model, optional: absent, the default model's `folder` ("unclip" or "depth2img")."""
    group.add_argument("--model", default=None, metavar="PATH_OR_REPO_ID",
                       help="pipeline folder (diffusers layout, or written by save_pretrained / convert) or hub "
                            f"repo id ({DEFAULT_MODEL_HELP}: its {folder} pipeline)")


def generation_parser(sub, name: str, help_: str, description: str, examples: str, *, steps: int,
                      guidance: float, default_model: str = "unclip") -> argparse.ArgumentParser:
    """A generating command's parser with the model, sampling and output groups every one of them takes;
    `default_model` is the folder of the shipped default model that an absent --model means."""
    rows = "\n".join(f"  {short:<13} {cls}" for short, cls in SCHEDULER_NAMES.items())
    p = command_parser(sub, name, help_, f"{description} {_OUTPUT_NOTE}", examples,
                       notes=f"schedulers (--scheduler; short name or class name, any case):\n{rows}")
    m = p.add_argument_group("model")
    add_model_argument(m, default_model)
    m.add_argument("--dtype", default="fp32", choices=DTYPES, help="compute dtype (default fp32)")
    m.add_argument("--variant", default=None, help='weight file variant of a diffusers folder, e.g. "fp16"')
    m.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    m.add_argument("--local-files-only", action="store_true", help="use the hub cache only, no download")
    s = p.add_argument_group("sampling")
    s.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what to steer away from (default: none)")
    s.add_argument("--steps", type=int, default=steps, metavar="N", help=f"denoising steps (default {steps})")
    from unclip_jax.toy.default import SAMPLING  # noqa: PLC0415  (standard library only)

    p.set_defaults(model_guidance={"guidance": guidance})
    s.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                   help=f"classifier-free guidance scale; <= 1 turns guidance off (default {guidance:g}; "
                        f"the default model: {SAMPLING[name]['guidance']:g})")
    s.add_argument("--scheduler", default=None, metavar="NAME",
                   help="decoder scheduler, built from the checkpoint's scheduler config as diffusers' "
                        "from_config does (names below; default: the checkpoint's)")
    s.add_argument("--eta", type=float, default=0.0, metavar="ETA", help="DDIM eta (default 0; other schedulers ignore it)")
    s.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0): same seed, same images")
    s.add_argument("--count", type=int, default=1, metavar="N", help="images to make (default 1)")
    o = p.add_argument_group("output and run")
    o.add_argument("--out", default=".", metavar="DIR", help="output folder, created if missing (default: here)")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    o.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not use the persistent compilation cache (default: on, in $UNCLIP_JAX_CACHE_DIR or "
                        "~/.cache/unclip-jax/jax; UNCLIP_JAX_CACHE_DIR= turns it off too)")
    return p


def add_noise_level(p) -> None:
    p.add_argument("--noise-level", type=int, default=0, metavar="LEVEL",
                   help="noise added to the CLIP image embedding, 0 to 999: higher strays further (default 0)")


def add_size(p, help_: str) -> None:
    p.add_argument("--size", type=int, default=None, metavar="PX", help=help_ + "; sets height and width")
    p.add_argument("--height", type=int, default=None, metavar="PX", help="height in pixels (instead of --size)")
    p.add_argument("--width", type=int, default=None, metavar="PX", help="width in pixels (instead of --size)")


# ---------------------------------------------------------------------------------------------------
# Checks that need only the arguments


def scheduler_class(name: str) -> str:
    """A --scheduler name (short, or a class name, any case) -> the scheduler class name."""
    by_lower = {k.lower(): v for k, v in SCHEDULER_NAMES.items()}
    by_lower.update({v.lower(): v for v in SCHEDULER_NAMES.values()})
    if name.lower() not in by_lower:
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)} "
                         "(or a class name, e.g. EulerDiscreteScheduler)")
    return by_lower[name.lower()]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_generation_arguments(args) -> None:
    """The shared generation arguments' limits, by the pipelines' own checks (`unclip_jax.pipelines.checks`,
    so the CLI and the API refuse the same values); sets args.height/width from --size and
    args.scheduler_class. The checks raise ValueError naming the flag."""
    # numpy comes with them: 0.15 s of CPU, up to 0.7 s of wall time on a busy machine, that --help skips.
    from unclip_jax.pipelines import checks  # noqa: PLC0415

    for name in ("steps", "count", "prior_steps"):
        if getattr(args, name, None) is not None:
            checks.check_count(getattr(args, name), _flag(name))
    for name in ("guidance", "prior_guidance"):
        if getattr(args, name, None) is not None:
            checks.check_guidance(getattr(args, name), _flag(name))
    checks.check_eta(args.eta, "--eta")
    if getattr(args, "noise_level", None) is not None:
        checks.check_noise_level(args.noise_level, None, "--noise-level")  # the schedule's end: cli.common
    if getattr(args, "strength", None) is not None:
        checks.check_strength(args.strength, "--strength")
    if args.size is not None and (args.height is not None or args.width is not None):
        raise UsageError("give --size, or --height and --width, not both")
    if args.size is not None:
        checks.check_side(args.size, "--size")
        args.height = args.width = args.size
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            checks.check_side(getattr(args, name), _flag(name))
    args.scheduler_class = None if args.scheduler is None else scheduler_class(args.scheduler)
