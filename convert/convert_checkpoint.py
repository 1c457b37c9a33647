"""Convert a diffusers Stable unCLIP / depth-to-image pipeline (folder or hub repo id) into an orbax folder.

    python convert/convert_checkpoint.py SOURCE OUT [--dtype fp32|bf16|fp16] [--variant fp16] [--revision R]
                                         [--local-files-only] [--cache-dir DIR] [--overwrite] [--quiet]

The same command as `unclip-jax convert` (unclip_jax/cli/convert.py; see convert/README.md).
"""

import sys

from unclip_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
