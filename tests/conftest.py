"""Test set-up: 8 emulated CPU devices (must be set before jax is imported anywhere).

The suite is compile-bound (tiny models, many configs), so XLA:CPU's backend optimisation is
turned off (`--xla_backend_optimization_level=0`): about a third less compile time, the same
semantics (tests compare numbers between paths compiled alike, never against timings).
Subprocess tests get the same flags from `subprocess_env`. Every test process (both xdist
workers, CLI subprocesses, notebook kernels) shares one persistent compilation cache under
.cache/jax-tests, so a program compiled by one is loaded by the others.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None) -> str:
    """XLA_FLAGS for a test process: `devices` emulated CPU devices (None: leave the count alone)."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return count + FAST_COMPILE


def subprocess_env(devices: int | None = 1, **extra: str) -> dict:
    """Environment of a CLI/script subprocess: CPU, `devices` devices, fast compiles, the shared
    persistent compilation cache (restarts and repeated configs compile once), repo on the path."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax-tests"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
                               + " " + FAST_COMPILE)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
