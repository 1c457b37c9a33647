"""`unclip-jax train OBJECTIVE ...`: the parsing and the run live in `unclip_jax.training.command`."""

from __future__ import annotations

from unclip_jax.training.command import register


def add_parser(sub) -> None:
    register(sub)


def run(args, progress: bool) -> None:
    from unclip_jax.training.command import run as run_train  # noqa: PLC0415

    args.progress = progress
    run_train(args)
