"""`unclip-jax convert`: a diffusers pipeline (folder or hub repo id) -> an orbax folder that loads without
torch. The command half of `unclip_jax.conversion.convert_pipeline`."""

from __future__ import annotations

from unclip_jax.cli.parsing import command_parser

DTYPES = ("fp32", "bf16", "fp16")  # `unclip_jax.weights.convert.DTYPES` (a test keeps them equal)


def add_parser(sub) -> None:
    p = command_parser(sub, "convert", "convert a diffusers/PyTorch checkpoint to an orbax pipeline folder",
                       "Convert a diffusers pipeline (folder or hub repo id) into an orbax folder that loads "
                       "without torch. Components are converted one at a time; the output is written beside OUT "
                       "and renamed into place at the end.")
    p.add_argument("source", help="diffusers pipeline folder or hub repo id, or a single-file .ckpt/.safetensors "
                                  "in Stability's layout (sd21-unclip-h/-l, 512-depth-ema)")
    p.add_argument("out", help="folder to create")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="saved param dtype (default fp32)")
    p.add_argument("--variant", default=None, help='weights variant to read, e.g. "fp16"')
    p.add_argument("--revision", default=None, help="hub branch, tag or commit hash")
    p.add_argument("--local-files-only", action="store_true", help="use the hub cache only (no network)")
    p.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (atomically)")
    p.add_argument("--config-from", default=None,
                   help="for a single file: diffusers folder or hub id giving configs, tokenizer, processors "
                        "(default: the hub repo of the file's kind)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")


def run(args, progress: bool) -> None:
    from unclip_jax.conversion import convert_pipeline  # noqa: PLC0415  (import time: jax, see cli.common)

    print(convert_pipeline(args.source, args.out, dtype=args.dtype, variant=args.variant, revision=args.revision,
                           local_files_only=args.local_files_only, cache_dir=args.cache_dir,
                           overwrite=args.overwrite, progress=progress and not args.quiet,
                           config_from=args.config_from))
