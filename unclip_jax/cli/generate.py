"""`unclip-jax generate`: many images from a prompts file or a dataset column, resumable, sharded over the
devices and hosts, deterministic per item, with CLIP scores. The command lives with its library in
`unclip_jax.generation.command`; this module is its place among the commands."""

from __future__ import annotations

from unclip_jax.generation.command import add_parser, check, run

__all__ = ["add_parser", "check", "run"]
