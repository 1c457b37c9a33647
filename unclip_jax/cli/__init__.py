"""The `unclip-jax` command.

    unclip-jax tiny DIR [--kind KIND]                    write a tiny random-weight checkpoint (no network)
    unclip-jax txt2img PROMPT [--model M] [--prior P]    text -> images (StableUnCLIPPipeline: prior + decoder)
    unclip-jax variation [PROMPT] --image I [--model M]  image variations (StableUnCLIPImg2ImgPipeline)
    unclip-jax depth2img PROMPT --image I [--model M]    depth-preserving image-to-image
    unclip-jax generate PROMPTS [--model M] --out DIR    many images: resumable, sharded, with CLIP scores
    unclip-jax convert SOURCE OUT                        a diffusers checkpoint or LDM single file -> an orbax folder
    unclip-jax export SOURCE OUT                         a pipeline -> a diffusers folder (PyTorch-named safetensors)
    unclip-jax train OBJECTIVE --model M --data D --out O  train a decoder, prior, depth, LoRA, ... (training.command)

Without --model the generating commands use the default model shipped in the package
(`unclip_jax.toy.default`): a toy-domain unCLIP family (one coloured shape on a plain background, 64 x 64)
trained by the project on a CPU, so that a fresh machine without a hub makes pictures that match their
prompts. Real checkpoints come from the hub (--model REPO_ID); `tiny` checkpoints are random, for tests.

One module per command (`add_parser`, an optional `check` that loads no model, `run`), the parsing shared
in `parsing`, what the generating commands share in `common`. Images are written as PNGs carrying their
generation parameters (JSON, under the `parameters` key of the PNG text). Every argument a user can get
wrong is checked before the model is loaded; user mistakes end with one line on stderr and exit status 2.
Progress bars show when stderr is a terminal, or with --progress. The generating commands use JAX's
persistent compilation cache (`unclip_jax.cache`), so a second run compiles nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from unclip_jax.cli import convert, depth2img, export, generate, tiny, train, txt2img, variation
from unclip_jax.cli.parsing import PROG, SCHEDULER_NAMES, OneLineParser, UsageError, scheduler_class

COMMANDS = {"tiny": tiny, "txt2img": txt2img, "variation": variation, "depth2img": depth2img, "generate": generate,
            "convert": convert, "export": export, "train": train}

__all__ = ["COMMANDS", "PROG", "SCHEDULER_NAMES", "OneLineParser", "UsageError", "main", "parser", "scheduler_class",
           "silence_torch_advice"]


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Stable unCLIP (with the Karlo prior) and Stable Diffusion "
                                             "depth-to-image in JAX.",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog=f"Run `{PROG} COMMAND --help` for a command's options. Benchmarks live in the "
                             "repository's benchmarks/ folder.\n\nexample (no network needed; the built-in "
                             "toy-domain model, 64 x 64 pictures of one coloured shape):\n"
                             f"  {PROG} txt2img \"a red circle on a blue background\" --out out")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def _no_torch_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


def silence_torch_advice() -> None:
    """transformers warns at import that PyTorch is missing; this runtime is torch-free on purpose."""
    logging.getLogger("transformers").addFilter(_no_torch_advice)


def _message(e: Exception) -> str:
    """One line: the error's first line; for a checkpoint that does not fit its model (ConversionError),
    the first names of what is missing, unexpected and mis-shaped, with their counts."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    parts = []
    for title, attr in (("missing", "missing"), ("unexpected", "unexpected"), ("wrong shape", "misshaped")):
        names = list(getattr(e, attr, None) or ())
        if names:
            parts.append(f"{title} ({len(names)}): {', '.join(map(str, names[:3]))}{', ...' if len(names) > 3 else ''}")
    return first if not parts else f"{first.rstrip('.')}: {'; '.join(parts)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    silence_torch_advice()
    try:
        args = parser().parse_args(argv)
        module = COMMANDS[args.command]
        if hasattr(module, "check"):
            module.check(args)
        progress = sys.stderr.isatty() if getattr(args, "progress", None) is None else args.progress
        if getattr(args, "compile_cache", False):
            from unclip_jax.cache import enable_compilation_cache  # noqa: PLC0415  (import time: jax)

            enable_compilation_cache()
        module.run(args, progress)
    except (UsageError, ValueError, OSError) as e:
        # Project errors (CheckpointError, ConversionError, UnsupportedConfigError, SchedulerConfigError) are
        # ValueErrors; OSError covers unreadable or unwritable files.
        where = f"{PROG} {command}" if command else PROG
        print(f"{where}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
