"""trinity_jax.malloc_env: the launchers restart once with glibc's huge-page tunable, and the
tunable really cuts the page faults of large fresh allocations (the XLA:CPU temp arena case)."""
import os
import subprocess
import sys

import pytest

from trinity_jax.malloc_env import TUNABLE, _thp_available, wanted_tunables


def test_wanted_tunables_decisions():
    assert wanted_tunables({}, "linux", thp=True) == TUNABLE
    assert wanted_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux", thp=True) == \
        "glibc.malloc.arena_max=2:" + TUNABLE                     # other tunables are kept
    assert wanted_tunables({"GLIBC_TUNABLES": TUNABLE}, "linux", thp=True) is None      # done
    assert wanted_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", thp=True) is None
    assert wanted_tunables({"TRINITY_MALLOC_HUGETLB": "0"}, "linux", thp=True) is None  # opt-out
    assert wanted_tunables({}, "darwin", thp=True) is None
    assert wanted_tunables({}, "linux", thp=False) is None                            # THP [never]


_PROBE = """
import ctypes, os, resource, sys
from trinity_jax.malloc_env import reexec_with_hugepages
if sys.argv[1] == "reexec":
    reexec_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20                                       # 256 MiB: glibc serves it with a fresh mmap
libc.free(libc.malloc(n))
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n)
ctypes.memset(p, 1, n)                              # touch every page, as XLA's temp arena is
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, os.environ.get("GLIBC_TUNABLES", ""))
"""

@pytest.mark.skipif(sys.platform != "linux" or not _thp_available(), reason="needs Linux with THP")
def test_reexec_sets_the_tunable_and_cuts_page_faults():
    """Re-executed, the process has the tunable and a fresh 256 MiB allocation takes < 1/20 of
    the minor faults it takes without it (65,536 4 KiB pages vs ~128 huge pages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TRINITY_MALLOC_HUGETLB")}
    runs = {}
    for mode in ("plain", "reexec"):
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        runs[mode] = (int(out[0]), out[1] if len(out) > 1 else "")
    assert runs["plain"][1] == "" and runs["reexec"][1] == TUNABLE
    assert runs["plain"][0] > 30_000, runs
    assert runs["reexec"][0] * 20 < runs["plain"][0], runs


def test_console_script_and_module_entry_points_start():
    """`trinity` (setup.cfg console script -> trinity_jax.__main__:main) and
    `python -m trinity_jax` both get through the re-exec to the CLI."""
    script = os.path.join(os.path.dirname(sys.executable), "trinity")
    if not os.path.exists(script):
        pytest.skip(f"no console script at {script} (package not installed with scripts)")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TRINITY_MALLOC_HUGETLB")}
    for cmd in ([script, "--help"], [sys.executable, "-m", "trinity_jax", "--help"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stderr[-2000:])
        assert "usage: trinity" in out.stdout, cmd
