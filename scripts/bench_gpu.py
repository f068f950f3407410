"""Check and time the Pallas MoE kernels on an NVIDIA GPU (run through scripts/bench_gpu.sh).

1. Correctness (compiled kernels, not interpret mode), fresh random inputs, against the
   pure-JAX references and jax.lax.ragged_dot, by normwise relative error
   ||out - ref|| / ||ref||: route (exact integers), gmm / gmm(rhs^T) / tgmm forward, and the
   gmm gradients, with empty groups and padding rows.
2. Timing at Trinity-Large expert shapes (d=3072, f=3072, 32 local experts, 16k tokens x k=4
   = 65536 rows, bf16): gmm, gmm with rhs^T (the d_lhs product), tgmm (the d_rhs product),
   gmm fwd+bwd, jax.lax.ragged_dot, and a dense bf16 matmul of equal FLOPs; a small sweep of
   Triton tilings per kernel. Prints a table (median ms, TFLOP/s, ratio to dense, speed-up
   over ragged_dot) to stdout and to $OUT/bench_gpu.txt when $OUT is set.
   Targets: best gmm >= 70% of dense bf16 throughput and >= 5x ragged_dot.

`--cpu-smoke` runs the same logic on tiny shapes in interpret mode (checks the script here).
Exit status: 0 all checks pass (and, on GPU, targets met), 1 a check or target failed,
2 no GPU (without --cpu-smoke).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Tilings (tm, tk, tn, num_warps, num_stages) tried for each kernel on GPU.
GMM_SWEEP = [(128, 64, 128, 4, 4), (128, 64, 128, 8, 3), (128, 64, 256, 8, 3),
             (64, 64, 128, 4, 4), (256, 64, 128, 8, 3), (128, 32, 128, 4, 5)]
TGMM_SWEEP = [(128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
              (64, 128, 256, 8, 3)]
SMOKE_SWEEP = [(32, 16, 32, None, None), (16, 32, 16, None, None)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes in interpret mode on CPU (checks the script logic)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (T)")
    p.add_argument("--k", type=int, default=4, help="experts per token")
    p.add_argument("--d", type=int, default=3072, help="hidden size (gmm K)")
    p.add_argument("--f", type=int, default=3072, help="expert FFN width (gmm N)")
    p.add_argument("--experts", type=int, default=32, help="local experts (groups G)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="only the first tiling of each sweep")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--skip-ragged", action="store_true", help="do not time jax.lax.ragged_dot")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Report:
    """Collects lines for stdout and $OUT/bench_gpu.txt."""

    def __init__(self):
        self.lines = []
        self.failures = []

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def fail(self, what):
        self.failures.append(what)
        self(f"FAIL: {what}")

    def write(self):
        out = os.environ.get("OUT")
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "bench_gpu.txt"), "w") as f:
                f.write("\n".join(self.lines) + "\n")


def rel_err(x, ref):
    import numpy as np
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def group_sizes_for(rng, rows, groups, empty=0, padding=0):
    """Uneven sizes summing to rows - padding, `empty` groups of size 0."""
    import numpy as np
    p = rng.dirichlet(np.full(groups, 8.0))
    if empty:
        p[rng.choice(groups, empty, replace=False)] = 0.0
        p /= p.sum()
    sizes = rng.multinomial(rows - padding, p)
    return sizes.astype(np.int32)


def timeit(fn, args, reps, warmup):
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_checks(rep, interpret, smoke, rng):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pallas_kernels import (gmm, gmm_reference, group_slots, route, route_reference, tgmm,
                                tgmm_reference)

    def check(name, err, tol):
        ok = err <= tol
        rep(f"  {'ok  ' if ok else 'FAIL'} {name:<44s} rel err {err:.2e} (tol {tol:.0e})")
        if not ok:
            rep.failures.append(name)

    def guarded(name, fn):
        try:
            fn()
        except Exception:  # keep going: one broken kernel should not hide the others
            rep.fail(f"{name} raised:\n{traceback.format_exc()}")

    rep("== correctness (interpret)" if interpret else "== correctness (compiled)")

    def routing():
        t, e, k = (37, 12, 3) if smoke else (4096 + 37, 256, 4)
        logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(e) * 0.1, jnp.float32)
        got = route(logits, bias, k, 2.448, interpret=interpret)
        want = route_reference(logits, bias, k, 2.448)
        for field in ("experts", "dest", "group_sizes", "group_offsets"):
            same = bool(np.array_equal(np.asarray(getattr(got, field)),
                                       np.asarray(getattr(want, field))))
            check(f"route.{field} (T={t}, E={e}, k={k}) exact", 0.0 if same else 1.0, 0.0)
        check("route.weights", rel_err(got.weights, want.weights), 1e-6)
        gs = group_slots(want.experts, e, interpret=interpret)
        check("group_slots.dest exact",
              0.0 if np.array_equal(np.asarray(gs.dest), np.asarray(want.dest)) else 1.0, 0.0)

    def matmuls():
        m, kd, n, g = (200, 48, 40, 6) if smoke else (8192 + 77, 512, 384, 32)
        tiling = (32, 16, 32) if smoke else (128, 64, 128)
        sizes = group_sizes_for(rng, m, g, empty=g // 4, padding=m // 10)
        gsz = jnp.asarray(sizes)
        for dtype, tol in ((jnp.bfloat16, 1e-5), (jnp.float32, 1e-5)):
            lhs = jnp.asarray(rng.standard_normal((m, kd)), dtype)
            rhs = jnp.asarray(rng.standard_normal((g, kd, n)), dtype)
            name = jnp.dtype(dtype).name
            out = gmm(lhs, rhs, gsz, tiling=tiling, interpret=interpret)
            ref = gmm_reference(lhs, rhs, gsz)
            # same input values, f32 accumulation on both sides: only summation order differs
            check(f"gmm {name} vs reference", rel_err(out, ref), tol)
            check(f"gmm {name} vs ragged_dot", rel_err(
                out, jax.lax.ragged_dot(lhs, rhs, gsz, preferred_element_type=jnp.float32,
                                        precision=jax.lax.Precision.HIGHEST)), tol)
            pad_max = float(jnp.abs(out[int(sizes.sum()):]).max()) if sizes.sum() < m else 0.0
            check(f"gmm {name} padding rows are 0", pad_max, 0.0)
            out_t = gmm(lhs, jnp.swapaxes(rhs, 1, 2), gsz, tiling=tiling, transpose_rhs=True,
                        interpret=interpret)
            check(f"gmm(rhs^T) {name} vs reference", rel_err(out_t, ref), tol)
            grad = jnp.asarray(rng.standard_normal((m, n)), dtype)
            check(f"tgmm {name} vs reference",
                  rel_err(tgmm(lhs, grad, gsz, tiling=tiling, interpret=interpret),
                          tgmm_reference(lhs, grad, gsz)), tol)
        # gradients, bf16 (cotangent and results rounded to bf16: ~4e-3)
        lhs = jnp.asarray(rng.standard_normal((m, kd)), jnp.bfloat16)
        rhs = jnp.asarray(rng.standard_normal((g, kd, n)), jnp.bfloat16)
        cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
        f = lambda a, b: jnp.sum(gmm(a, b, gsz, tiling=tiling, interpret=interpret) * cot)
        fr = lambda a, b: jnp.sum(jax.lax.ragged_dot(a, b, gsz, preferred_element_type=jnp.float32)
                                  * cot)
        got = jax.jit(jax.grad(f, (0, 1)))(lhs, rhs)
        want = jax.jit(jax.grad(fr, (0, 1)))(lhs, rhs)
        check("gmm grad lhs bf16 vs ragged_dot", rel_err(got[0], want[0]), 1e-2)
        check("gmm grad rhs bf16 vs ragged_dot", rel_err(got[1], want[1]), 1e-2)

    guarded("routing checks", routing)
    guarded("gmm/tgmm checks", matmuls)


def run_timing(rep, args, interpret, smoke, rng):
    import jax
    import jax.numpy as jnp
    from pallas_kernels import gmm, tgmm

    if smoke:
        m, kd, n, g = 256, 64, 64, 4
        gmm_sweep = tgmm_sweep = SMOKE_SWEEP
        reps, warmup = 2, 1
    else:
        m, kd, n, g = args.tokens * args.k, args.d, args.f, args.experts
        gmm_sweep, tgmm_sweep = GMM_SWEEP, TGMM_SWEEP
        reps, warmup = args.reps, args.warmup
    if args.quick:
        gmm_sweep, tgmm_sweep = gmm_sweep[:1], tgmm_sweep[:1]
    flops = 2.0 * m * kd * n
    sizes = jnp.asarray(group_sizes_for(rng, m, g))
    rep(f"== timing: M={m} rows (T={m // max(args.k, 1)} x k), K=d={kd}, N=f={n}, G={g}, "
        f"bf16 in, f32 accumulation; group sizes min {int(sizes.min())} "
        f"max {int(sizes.max())}; {reps} reps, median")
    lhs = jnp.asarray(rng.standard_normal((m, kd)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((g, kd, n)) * 0.02, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    dense_w = jnp.asarray(rng.standard_normal((kd, n)) * 0.02, jnp.bfloat16)
    rows = []   # (op, config, ms, flops)

    def add(op, config, fn, fargs, op_flops=flops):
        # one line before and after each row: a run cut by its time limit still shows how far
        # it got and what it measured (the table comes at the end)
        rep(f"  timing {op} [{config}] ...")
        try:
            ms = timeit(jax.jit(fn), fargs, reps, warmup)
            rows.append((op, config, ms, op_flops))
            rep(f"  timed  {op} [{config}]: {ms:.3f} ms")
        except Exception:
            rep.fail(f"timing {op} {config} raised:\n{traceback.format_exc()}")

    add("dense bf16 [M,K]@[K,N]", "XLA", lambda a, w: jnp.dot(a, w), (lhs, dense_w))
    if not args.skip_ragged:
        add("ragged_dot", "XLA", lambda a, b, s: jax.lax.ragged_dot(a, b, s), (lhs, rhs, sizes))

    def cfg(t):
        return f"{t[0]}x{t[1]}x{t[2]} w{t[3]} s{t[4]}"

    for t in gmm_sweep:
        add("gmm", cfg(t), lambda a, b, s, t=t: gmm(
            a, b, s, tiling=t[:3], num_warps=t[3], num_stages=t[4],
            preferred_element_type=jnp.bfloat16, interpret=interpret), (lhs, rhs, sizes))
    for t in gmm_sweep[:3]:   # d_lhs [M,K] = dy [M,N] @ rhs[g]^T, rhs as stored [G,K,N]
        add("gmm rhs^T (d_lhs)", cfg(t), lambda a, b, s, t=t: gmm(
            a, b, s, tiling=t[:3], num_warps=t[3], num_stages=t[4], transpose_rhs=True,
            preferred_element_type=jnp.bfloat16, interpret=interpret), (dy, rhs, sizes))
    for t in tgmm_sweep:
        add("tgmm (d_rhs)", cfg(t), lambda a, b, s, t=t: tgmm(
            a, b, s, tiling=t[:3], num_warps=t[3], num_stages=t[4],
            preferred_element_type=jnp.float32, interpret=interpret), (lhs, dy, sizes))
    best_gmm = min((r for r in rows if r[0] == "gmm"), key=lambda r: r[2], default=None)
    if best_gmm is not None:
        bt = next(t for t in gmm_sweep if cfg(t) == best_gmm[1])

        def fwd_bwd(a, b, s):
            fwd = lambda a, b: gmm(a, b, s, tiling=bt[:3], num_warps=bt[3], num_stages=bt[4],
                                   preferred_element_type=jnp.bfloat16, interpret=interpret)
            out, vjp = jax.vjp(fwd, a, b)
            return vjp(out)

        add("gmm fwd+bwd (3 products)", cfg(bt), fwd_bwd, (lhs, rhs, sizes), 3 * flops)

    dense = next((r for r in rows if r[0].startswith("dense")), None)
    ragged = next((r for r in rows if r[0] == "ragged_dot"), None)
    rep(f"{'op':<26s} {'config':<22s} {'ms':>9s} {'TFLOP/s':>8s} {'vs dense':>9s} "
        f"{'vs ragged':>9s}")
    for op, config, ms, fl in rows:
        tflops = fl / (ms * 1e-3) / 1e12
        vs_dense = f"{tflops / (dense[3] / (dense[2] * 1e-3) / 1e12):.2f}" if dense else "-"
        vs_ragged = f"{(ragged[2] * fl / ragged[3]) / ms:.1f}x" if ragged else "-"
        rep(f"{op:<26s} {config:<22s} {ms:9.3f} {tflops:8.1f} {vs_dense:>9s} {vs_ragged:>9s}")
    if best_gmm and dense and not smoke:
        frac = dense[2] / best_gmm[2]
        rep(f"best gmm {best_gmm[1]}: {frac:.0%} of dense bf16 throughput (target >= 70%)")
        if frac < 0.70:
            rep.fail("gmm below 70% of dense bf16 throughput")
        if ragged:
            speedup = ragged[2] / best_gmm[2]
            rep(f"best gmm vs ragged_dot: {speedup:.1f}x (target >= 5x)")
            if speedup < 5:
                rep.fail("gmm below 5x ragged_dot")


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    rep = Report()
    backend = jax.default_backend()
    if not args.cpu_smoke and backend != "gpu":
        print(f"bench_gpu.py: no GPU backend (jax.default_backend() == {backend!r}); "
              "this benchmark needs an NVIDIA GPU with jax[cuda]. Use --cpu-smoke to check "
              "the script logic on tiny shapes in interpret mode.", file=sys.stderr)
        return 2
    interpret = args.cpu_smoke
    rep(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
    if backend == "gpu":
        rep(f"device kind: {jax.devices()[0].device_kind}")
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    if not args.skip_checks:
        run_checks(rep, interpret, args.cpu_smoke, rng)
    run_timing(rep, args, interpret, args.cpu_smoke, rng)
    rep(f"total {time.time() - t0:.1f} s; "
        f"{'all checks passed' if not rep.failures else f'{len(rep.failures)} failure(s)'}")
    rep.write()
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
