"""Runs `unclip_jax.bench` from a checkout: `python benchmarks/bench.py [--tiny] [--what unet] ...`
(the same as `unclip-jax bench ...`; see benchmarks/README.md)."""

import sys

from unclip_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
