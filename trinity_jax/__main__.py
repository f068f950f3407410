"""`python -m trinity_jax <command>`: train, export, generate, convert-hf, plan (see --help)."""
from __future__ import annotations

import sys

from trinity_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
