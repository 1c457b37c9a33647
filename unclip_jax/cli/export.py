"""`unclip-jax export`: any pipeline we load -> a diffusers-format folder (PyTorch-named safetensors, configs,
tokenizer and processor files, model_index.json) that diffusers' `from_pretrained` loads. The command half of
`unclip_jax.conversion.export_pipeline`."""

from __future__ import annotations

from unclip_jax.cli.convert import DTYPES
from unclip_jax.cli.parsing import command_parser


def add_parser(sub) -> None:
    p = command_parser(sub, "export", "write a pipeline as a diffusers-format folder (PyTorch-named safetensors)",
                       "Write a pipeline (a folder written by convert or save_pretrained, a diffusers folder or a "
                       "hub repo id) as a diffusers-format folder that diffusers' from_pretrained loads; writing "
                       "needs no torch. The output is written beside OUT and renamed into place at the end.")
    p.add_argument("source", help="pipeline folder or hub repo id")
    p.add_argument("out", help="folder to create")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="saved weight dtype (default fp32)")
    p.add_argument("--variant", action="store_true",
                   help="name the weight files after the dtype (model.fp16.safetensors), for diffusers' variant=")
    p.add_argument("--local-files-only", action="store_true", help="use the hub cache only (no network)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (atomically)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run(args, progress: bool) -> None:
    del progress
    from unclip_jax.conversion import export_pipeline  # noqa: PLC0415  (import time: jax, see cli.common)

    out = export_pipeline(args.source, args.out, dtype=args.dtype, variant=args.variant, overwrite=args.overwrite,
                          local_files_only=args.local_files_only)
    if not args.quiet:
        print(out)
