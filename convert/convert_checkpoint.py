"""Convert a diffusers Stable unCLIP / depth-to-image pipeline (folder or hub repo id) into an orbax folder.

    python convert/convert_checkpoint.py SOURCE OUT [--dtype fp32|bf16|fp16] [--variant fp16] [--revision R]
                                         [--local-files-only] [--cache-dir DIR] [--overwrite] [--quiet]

The same command as `unclip-jax convert` and `python -m unclip_jax.conversion` (see convert/README.md).
"""

import sys

from unclip_jax.conversion import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
