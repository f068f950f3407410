"""Start-up tuning of glibc malloc for XLA:CPU: transparent huge pages for large allocations.

XLA:CPU allocates an executable's temporary buffers as one block per execution and frees it at
the end, and glibc serves a block that large with a fresh ``mmap``. Every train step therefore
touches gigabytes of new 4 KiB pages: on the bench model of ``scripts/bench_train.py`` (a 2.36 GB
temp arena) that was ~596,000 minor page faults and ~1.2 s of kernel time per 3.5 s step.
With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc advises transparent huge pages (2 MiB) for
such blocks, and the faults drop to ~1,500 per step.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so the launchers (the CLI, the
benchmarks) call :func:`reexec_with_hugepages` first: it re-executes the same command line
once with the tunable added. Nothing happens when it is already set, off Linux, when the
kernel's THP mode is ``never``, or when ``TRINITY_MALLOC_HUGETLB=0``.
"""
from __future__ import annotations

import os
import sys

__all__ = ["TUNABLE", "wanted_tunables", "reexec_with_hugepages"]

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available(path: str = _THP_MODE) -> bool:
    try:
        with open(path) as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


def wanted_tunables(environ: dict, platform: str = sys.platform, thp: bool | None = None) -> str | None:
    """The GLIBC_TUNABLES value to restart with, or None when no restart is needed."""
    if platform != "linux" or environ.get("TRINITY_MALLOC_HUGETLB", "1") == "0":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    if not (_thp_available() if thp is None else thp):
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def reexec_with_hugepages() -> None:
    """Re-execute this process (same interpreter, same argv) with :data:`TUNABLE` set, if wanted.

    Call it first thing in a launcher, before heavy imports (they would be paid twice)."""
    value = wanted_tunables(dict(os.environ))
    if value is None:
        return
    os.environ["GLIBC_TUNABLES"] = value
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
