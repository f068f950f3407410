"""`python -m trinity_jax <command>`: train, export, generate, convert-hf, plan (see --help).

On Linux the command first re-executes itself once with glibc's transparent-huge-page
tunable set (see `trinity_jax.malloc_env`; ~10-25% faster CPU train steps); set
TRINITY_MALLOC_HUGETLB=0 to skip that.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
    from trinity_jax.malloc_env import reexec_with_hugepages
    reexec_with_hugepages()
    from trinity_jax.cli import main
    sys.exit(main())
