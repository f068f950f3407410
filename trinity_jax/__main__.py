"""`python -m trinity_jax <command>` (or the `trinity` console script): train, export, generate,
convert-hf, plan (see --help).

On Linux the command first re-executes itself once with glibc's transparent-huge-page
tunable set (see `trinity_jax.malloc_env`; ~10-25% faster CPU train steps); set
TRINITY_MALLOC_HUGETLB=0 to skip that.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from trinity_jax.malloc_env import reexec_with_hugepages
    if argv is None:                    # a real command line (not a call from Python code)
        reexec_with_hugepages()
    from trinity_jax.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
