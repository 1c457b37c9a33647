"""`python -m unclip_jax.cli ...`: the `unclip-jax` command."""

import sys

from unclip_jax.cli import main

sys.exit(main())
