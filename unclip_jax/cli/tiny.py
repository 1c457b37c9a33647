"""`unclip-jax tiny`: a tiny random-weight pipeline folder (`unclip_jax.tiny`), for trying things out."""

from __future__ import annotations

from unclip_jax.cli.parsing import command_parser

KINDS = ("unclip", "unclip_img2img", "depth2img")  # `unclip_jax.tiny.KINDS` (a test keeps them equal)


def add_parser(sub) -> None:
    t = command_parser(sub, "tiny", "write a tiny random-weight checkpoint, for trying things out (no network)",
                       "Writes a tiny random-weight pipeline folder (real layout, toy sizes, 32 x 32 images of "
                       "structured noise) without torch or a network. Run again on the same folder with the same "
                       "--kind and --seed, it leaves the folder as it is; any other existing path is refused.")
    t.add_argument("out", help="folder to create")
    t.add_argument("--kind", default="unclip", choices=KINDS,
                   help="pipeline: unclip (for txt2img), unclip_img2img (for variation) or depth2img (default unclip)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")


def run(args, progress: bool) -> None:
    from unclip_jax.tiny import write_tiny  # noqa: PLC0415  (import time: jax, see cli.common)

    print(write_tiny(args.kind, args.out, seed=args.seed, exist_ok=True))
