"""Where one train step's time goes, by part of the model, on CPU or GPU.

    .venv/bin/python scripts/profile_train.py [--size bench|gpu] [--dtype bfloat16]
        [--optimizer adamw|muon] [--model JSON] [--steps 2] [--top 25] [--trace-dir DIR]
        [--hlo FILE]

Builds our train step exactly as ``scripts/bench_train.py`` does (same shapes, presets and
``--model`` overrides), runs 2 warm-up steps, records ``--steps`` steps with
``jax.profiler``, and sums the recorded time of every XLA operation of the step (CPU: the
thunks, less the time of thunks nested in them; GPU: the kernels on the device's streams). Each operation is put in a part of the
model by the ``op_name`` that XLA keeps in the compiled HLO's metadata:

    attention    self_attn (projections, RoPE, q/k norms, scores, softmax, gate)
    moe          moe_layers/mlp (router, expert loops or kernels, shared expert)
    dense mlp    dense_layers/mlp
    norms        the sandwich norms around attention and MLP
    optimizer    the update inside the non-finite guard's conditional
    loss         the chunked cross-entropy and z-loss (lm_head products, logsumexp)
    other model  embedding, lm_head, residual adds, what else is inside the Transformer
    outside      balance statistics, clipping norms, metrics
    unmapped     operations without metadata (copies, the loops' own bookkeeping)

Prints ms per step and the share of each part, then the ``--top`` operations. On CPU the
thunks of the two cores overlap, so the parts sum to more than the wall time of a step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PARTS = (   # (part, test on an op_name), first match wins
    ("optimizer", lambda s: "/cond/branch" in s and "Transformer" not in s),
    ("loss", lambda s: "jvp()" in s),
    ("attention", lambda s: "self_attn" in s),
    ("moe", lambda s: "moe_layers/mlp" in s),
    ("dense mlp", lambda s: "dense_layers/mlp" in s),
    ("norms", lambda s: "layernorm" in s),
    ("other model", lambda s: "Transformer" in s or "_layers/" in s),
    ("outside", lambda s: True),
)


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the op_name of its metadata (the first seen)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def part_of(op_name: str | None) -> str:
    if op_name is None:
        return "unmapped"
    return next(name for name, test in PARTS if test(op_name))


def op_times(trace_file: str, module: str = "train_step") -> collections.Counter:
    """Summed self time (µs) per HLO instruction of `module` in a jax.profiler trace.

    Self time: an event's duration less that of the events nested in it on the same thread (a
    `while` or conditional thunk on CPU encloses its body's thunks, which are events of their
    own). Where the trace has GPU device processes, only their events count (host launch
    events would count the kernels twice)."""
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in procs.items() if "/device:" in name and "CPU" not in name}
    by_thread = collections.defaultdict(list)
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args or module not in args.get("hlo_module", ""):
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        by_thread[e["pid"], e.get("tid")].append(e)
    acc = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        stack = []   # [end, op] of the open enclosing events
        for e in evs:
            dur = e.get("dur", 0.0)
            while stack and e["ts"] >= stack[-1][0]:
                stack.pop()
            if stack:
                acc[stack[-1][1]] -= dur          # nested: not the encloser's own time
            acc[e["args"]["hlo_op"]] += dur
            stack.append((e["ts"] + dur, e["args"]["hlo_op"]))
    return acc


def main() -> int:
    from trinity_jax.malloc_env import reexec_with_hugepages
    reexec_with_hugepages()
    import bench_train as bt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("bench", "gpu"), default="bench")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    ap.add_argument("--model", default="{}", help="JSON object of model fields to override")
    ap.add_argument("--steps", type=int, default=2, help="steps recorded")
    ap.add_argument("--top", type=int, default=25, help="operations listed")
    ap.add_argument("--trace-dir", default="", help="keep the trace here (default: a temp dir)")
    ap.add_argument("--hlo", default="", help="also write the compiled step's HLO text here")
    args = ap.parse_args()
    model, n_batch, seq = bt.model_and_shape(ap, args.size, args.model)
    if args.steps < 1:
        ap.error(f"--steps={args.steps}: must be at least 1")

    import jax
    from trinity_jax.parallel import rules
    from trinity_jax.train.metrics import describe_host

    run, batch, wd = bt.make_run(bt.make_batch(model, n_batch, seq), model, args.optimizer,
                                 args.dtype)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_train_")
    walls = []
    with rules.use_mesh(run.mesh):
        for _ in range(2):
            run.state, m = run.train_step(run.state, batch)
            jax.block_until_ready(m["loss"])
        hlo = run.train_step.lower(run.state, batch).compile().as_text()
        if args.hlo:
            with open(args.hlo, "w") as f:
                f.write(hlo)
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            t = time.perf_counter()
            run.state, m = run.train_step(run.state, batch)
            jax.block_until_ready(m["loss"])
            walls.append(time.perf_counter() - t)
        jax.profiler.stop_trace()
    run.writer.close()
    wd.cleanup()
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise SystemExit(f"profile_train: no *.trace.json.gz under {trace_dir}")
    times = op_times(files[-1])
    if not times:
        raise SystemExit(f"profile_train: no events of train_step with hlo_op/hlo_module args in "
                         f"{files[-1]} (this jax's trace format is not the one read here)")
    names = op_names(hlo)
    per_step = 1e-3 / args.steps   # µs summed over the steps -> ms per step
    parts, counts = collections.Counter(), collections.Counter()
    for op, us in times.items():
        parts[part_of(names.get(op))] += us
        counts[part_of(names.get(op))] += 1
    total = sum(parts.values())
    print(f"{describe_host()}, size {args.size}, "
          f"{args.dtype}, {args.optimizer}; wall per step {min(walls) * 1e3:.1f} ms (best of "
          f"{args.steps}); recorded op time per step {total * per_step:.1f} ms; trace {files[-1]}")
    print(f"{'part':<12}{'ms/step':>10}{'share':>8}{'ops':>7}")
    for name, us in parts.most_common():
        print(f"{name:<12}{us * per_step:10.1f}{us / total:8.1%}{counts[name]:7d}")
    print(f"\ntop {args.top} operations (ms/step, part, op_name):")
    for op, us in times.most_common(args.top):
        print(f"{us * per_step:8.2f}  {part_of(names.get(op)):<11} {op[:40]:<40} "
              f"{(names.get(op) or '')[-90:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
