"""Smoke tests of the benchmark scripts: they run and print their tables (no timing assertions).

Each script runs in a subprocess on one CPU device with the persistent compilation cache
(as tests/test_ablate.py), so a re-run skips most of the compiling.
"""
import json
import math
import os
import subprocess
import sys

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args], env=subprocess_env(1),
                       cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_bench_moe_quick(tmp_path):
    out = tmp_path / "bench_moe.json"
    p = _run_script("bench_moe.py", "--quick", "--json", str(out))
    lines = p.stdout.splitlines()
    header = next(line for line in lines if line.startswith("impl"))
    assert {"ms", "GFLOP/s", "ratio", "mode"} <= set(header.split())
    table = {(line.split()[0], line.split()[6]): line.split() for line in lines
             if line.split() and line.split()[0] in ("block_sparse", "ragged_dot", "dense_reference")}
    for mode in ("fwd", "fwd+bwd"):
        ms, gflops, ratio = (float(v) for v in table[("block_sparse", mode)][7:10])
        assert ms > 0 and gflops > 0 and ratio > 0
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if r["ms"] is not None]
    assert {r["impl"] for r in timed} >= {"block_sparse", "ragged_dot", "dense_reference"}
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in timed)
    dense = [r for r in timed if r["impl"].startswith("dense_mlp")]
    assert dense and all(r["ratio"] == 1.0 for r in dense)


def test_bench_train_interleaves_rounds_and_times_only_after_warmup():
    """bench_train's timing loop: every stepper warms up first, then each round runs one step of
    each in turn, and only the rounds' steps are timed (so load drift hits both rows alike)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    calls = []

    def stepper(name, seconds):
        def step():
            calls.append(name)
            return seconds[len([c for c in calls if c == name]) - 1], 0.0
        return step

    times = bench_train.run_interleaved(
        {"a": stepper("a", [9.0, 1.0, 2.0, 3.0]), "b": stepper("b", [8.0, 4.0, 5.0, 6.0])},
        warmup=1, steps=3, log=lambda s: None)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert times == {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]}
