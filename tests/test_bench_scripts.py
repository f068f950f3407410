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


def _import_script(name):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


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
    bench_train = _import_script("bench_train")
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


def test_profile_train_sums_device_ops_and_names_their_part(tmp_path):
    """profile_train's trace reading: HLO instruction times are summed per op of the train-step
    module; where a GPU device process exists, host-side events of the same op are ignored (they
    would count the launches twice); each op goes to the part its HLO op_name names."""
    import gzip
    pt = _import_script("profile_train")
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        # device kernels: fusion.1 twice (two steps), fusion.2 once; one from another module
        {"ph": "X", "pid": 2, "ts": 0.0, "dur": 30.0, "name": "k", "args": {"hlo_op": "fusion.1", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 2, "ts": 100.0, "dur": 20.0, "name": "k", "args": {"hlo_op": "fusion.1", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 2, "ts": 200.0, "dur": 7.0, "name": "k", "args": {"hlo_op": "fusion.2", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 2, "ts": 300.0, "dur": 99.0, "name": "k", "args": {"hlo_op": "fusion.1", "hlo_module": "jit_eval_step"}},
        # the host's launch event of fusion.1 and a python event
        {"ph": "X", "pid": 1, "ts": 0.0, "dur": 500.0, "name": "launch", "args": {"hlo_op": "fusion.1", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 1, "ts": 600.0, "dur": 900.0, "name": "PjitFunction(train_step)"},
    ]
    trace = tmp_path / "t.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert pt.op_times(str(trace)) == {"fusion.1": 50.0, "fusion.2": 7.0}
    # CPU traces have no device process: the thunks' events (host threads) are the ops
    cpu = [e for e in events if e.get("pid") != 2 and e.get("args", {}).get("name") != "/device:GPU:0"]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": cpu}, f)
    assert pt.op_times(str(trace)) == {"fusion.1": 500.0}
    # a CPU while thunk encloses its body's thunks on the same thread: only its own time counts
    nested = [
        {"ph": "X", "pid": 1, "tid": 5, "ts": 0.0, "dur": 100.0, "name": "w", "args": {"hlo_op": "while.9", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 1, "tid": 5, "ts": 10.0, "dur": 30.0, "name": "a", "args": {"hlo_op": "dot.1", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 1, "tid": 5, "ts": 50.0, "dur": 40.0, "name": "a", "args": {"hlo_op": "dot.1", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 1, "tid": 5, "ts": 120.0, "dur": 5.0, "name": "b", "args": {"hlo_op": "add.2", "hlo_module": "jit_train_step"}},
        {"ph": "X", "pid": 1, "tid": 6, "ts": 20.0, "dur": 50.0, "name": "c", "args": {"hlo_op": "add.3", "hlo_module": "jit_train_step"}},
    ]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": nested}, f)
    assert pt.op_times(str(trace)) == {"while.9": 30.0, "dot.1": 70.0, "add.2": 5.0, "add.3": 50.0}

    hlo = "\n".join([
        '  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/jvp(Transformer)/closed_call/moe_layers/self_attn/add"}',
        '  ROOT %fusion.2 = f32[4]{0} fusion(%p), metadata={op_name="jit(train_step)/cond/branch_1_fun/mul"}',
        '  %copy.3 = f32[4]{0} copy(%p)',
    ])
    names = pt.op_names(hlo)
    assert names == {"fusion.1": "jit(train_step)/jvp(Transformer)/closed_call/moe_layers/self_attn/add",
                     "fusion.2": "jit(train_step)/cond/branch_1_fun/mul"}
    parts = {op: pt.part_of(names.get(op)) for op in ("fusion.1", "fusion.2", "copy.3")}
    assert parts == {"fusion.1": "attention", "fusion.2": "optimizer", "copy.3": "unmapped"}
    assert pt.part_of("jit(train_step)/transpose(jvp(Transformer))/closed_call/moe_layers/mlp/while") == "moe"
    assert pt.part_of("jit(train_step)/jvp()/while/body/closed_call/td,dv->tv/dot_general") == "loss"
    assert pt.part_of("jit(train_step)/transpose(jvp(Transformer))/closed_call/moe_layers/post_mlp_layernorm/mul") == "norms"


def test_profile_train_runs_and_splits_the_step_into_parts():
    p = _run_script("profile_train.py", "--dtype", "float32", "--steps", "1", "--top", "5", "--model",
                    json.dumps({"num_hidden_layers": 2, "num_experts": 8, "vocab_size": 512, "hidden_size": 64,
                                "intermediate_size": 128, "moe_intermediate_size": 32,
                                "num_attention_heads": 2, "num_key_value_heads": 1}))
    lines = p.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("part")))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        name, ms, share, ops = line.rsplit(None, 3)
        rows[name] = (float(ms), float(share.rstrip("%")), int(ops))
    assert {"attention", "moe", "optimizer", "loss"} <= set(rows)
    assert all(ms > 0 and ops > 0 for ms, _, ops in rows.values())
    assert abs(sum(share for _, share, _ in rows.values()) - 100.0) < 0.5


def test_ab_train_builds_copies_in_balanced_order_and_compares_across_copies():
    """ab_train: every variant is built `copies` times, alternating direction per pass (no
    variant always first); the summary groups step times by variant across its copies."""
    ab = _import_script("ab_train")
    assert ab.balanced_order(["a", "b"], 4) == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert ab.balanced_order(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]
    order = ["a", "b", "b", "a"]
    times = [[1.0, 3.0, 2.0], [2.0, 2.0, 2.0], [4.0, 4.0, 5.0], [6.0, 6.0, 6.0]]
    res = ab.summarise(["a", "b"], order, times)
    assert res["copy_medians"] == {"a": [2.0, 6.0], "b": [2.0, 4.0]}
    assert res["round_sums"] == {"a": [7.0, 9.0, 8.0], "b": [6.0, 6.0, 7.0]}
    ratio, per_round, spread = ab.compare(res, "a", "b")   # b's speed-up over a
    assert (ratio, per_round, spread) == (4.0 / 3.0, 7.0 / 6.0, 3.0)
    import argparse
    name, (model, groups) = ab.parse_variant(
        argparse.ArgumentParser(), 'x={"scan_unroll": 1, "train.loss_chunk_size": 256}')
    assert (name, model, groups) == ("x", {"scan_unroll": 1}, {"train": {"loss_chunk_size": 256}})


def test_ab_layer_stands_the_old_modules_names_in_and_restores_them():
    """While an old copy is built, the old file's names replace the new module's (functions
    that look them up by name see the old ones); afterwards the module is as it was."""
    import types

    ab_layer = _import_script("ab_layer")
    new, old = types.ModuleType("new_mod"), types.ModuleType("old_mod")
    exec("a = 1\ndef get():\n    return a\n", vars(new))
    exec("a = 2\nonly_old = 3\n", vars(old))
    get = new.get
    with ab_layer.standing_in(new, old):
        assert (new.a, get(), new.only_old) == (2, 2, 3)
    assert (new.a, get(), hasattr(new, "only_old")) == (1, 1, False)


def test_ab_layer_compares_a_layer_with_its_version_at_a_revision():
    """A tiny MoE layer against moe.py at HEAD: both versions run, and the same file gives the
    same loss and gradients (difference 0); a bad revision is refused by name."""
    tiny = json.dumps({"hidden_size": 32, "moe_intermediate_size": 16, "num_experts": 8,
                       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    p = _run_script("ab_layer.py", "--layer", "moe", "--copies", "1", "--rounds", "2",
                    "--batch", "2", "--seq", "32", "--model", tiny)
    assert "speed-up new vs old:" in p.stdout
    assert p.stdout.rstrip().endswith("largest difference in loss and gradients: 0"), p.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ab_layer.py"), "--layer", "moe",
                          "--rev", "no-such-revision"], env=subprocess_env(1), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--rev 'no-such-revision'" in bad.stderr, bad.stderr[-2000:]
