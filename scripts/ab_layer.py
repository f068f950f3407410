"""Is the working tree's attention or MoE layer faster than the one at a git revision? One
layer's forward+backward, both versions built in one process, replicated and interleaved.

    .venv/bin/python scripts/ab_layer.py --layer attention-local|attention-global|moe
        [--rev HEAD] [--dtype bfloat16] [--copies 4] [--rounds 12] [--model JSON]
        [--batch 8] [--seq 512]

"old" is the layer's module file (``trinity_jax/model/attention.py`` or ``moe.py``) as it is
at ``--rev``; "new" is the file in the working tree. The old file is loaded as a module of its
own, and while an old copy is built (traced and compiled) its functions and classes stand in
for the new module's names, so code elsewhere that looks them up by name (the MoE registry,
``moe_dispatch``) sees the old ones too. Everything outside that one file is the working
tree's. The layer is the bench model's (``scripts/bench_train.py``: d=256, 4 heads of 64, 2 kv
heads, window 128, 64 experts of 128 top-4 + 1 shared) on 8 × 512 tokens, bf16 compute on
fp32 weights by default; the local/global flag is a constant, as in the unrolled train step.

Each version is built ``--copies`` times in a balanced order (old new new old ...) and each
round times one call of every copy in turn (``scripts/ab_train.py`` explains why: whole-step
builds differ by 10-15% here). The verdict is the ratio of the mean of the copies' medians,
with the per-round ratio of the summed times beside it. Session 10 measured the resolution by
comparing a file with itself: 0.98-1.01x. It also prints the largest difference between the
two versions' loss and gradients, so a change meant to keep the values shows whether it did.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

FILES = {"attention-local": "trinity_jax/model/attention.py",
         "attention-global": "trinity_jax/model/attention.py",
         "moe": "trinity_jax/model/moe.py"}


def load_at_revision(rev: str, path: str, name: str):
    """The module file `path` as it is at git revision `rev`, imported as module `name`."""
    root = os.path.dirname(HERE)
    try:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"ab_layer: --rev {rev!r}: git show {rev}:{path} failed: {e.stderr.strip()}")
    f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    f.write(text)
    f.close()
    spec = importlib.util.spec_from_file_location(name, f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # flax's dataclass transform looks the module up
    try:
        spec.loader.exec_module(module)
    finally:
        os.unlink(f.name)
    return module


class standing_in:
    """Within the block, `module`'s public and private top-level names are `other`'s."""

    def __init__(self, module, other):
        self.module, self.other, self.saved = module, other, None

    def __enter__(self):
        self.saved = dict(vars(self.module))
        vars(self.module).update({k: v for k, v in vars(self.other).items()
                                  if not (k.startswith("__") and k.endswith("__"))})

    def __exit__(self, *exc):
        vars(self.module).clear()
        vars(self.module).update(self.saved)


def layer_step(module, layer: str, cfg, batch: int, seq: int):
    """-> (step() -> (seconds, loss) of one jitted forward+backward, as bench_train's steppers;
    (loss, grads) of the first, compiling call)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(cfg.dtype)
    x = jax.random.normal(jax.random.key(0), (batch, seq, cfg.hidden_size), dtype)
    if layer == "moe":
        m = module.MoE(cfg)
        valid = jnp.ones((batch, seq), bool)
        v = m.init(jax.random.key(1), x, valid)

        def loss(p, x):
            y, aux = m.apply({"params": p, "balance": v["balance"]}, x, valid)
            return jnp.sum(y.astype(jnp.float32) ** 2) + aux["balance"]
        params = v["params"]
    else:
        is_global = jnp.bool_(layer == "attention-global")
        m = module.Attention(cfg)
        pos = jnp.tile(jnp.arange(seq), (batch, 1))
        seg = jnp.ones((batch, seq), jnp.int32)
        rope = module.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
        params = m.init(jax.random.key(1), x, is_global, rope, seg)

        def loss(p, x):
            return jnp.sum(m.apply(p, x, is_global, rope, seg).astype(jnp.float32) ** 2)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    first = jax.block_until_ready(f(params, x))

    def step():
        t = time.perf_counter()
        value, _ = jax.block_until_ready(f(params, x))
        return time.perf_counter() - t, float(value)
    return step, first


def max_difference(a, b) -> float:
    import jax
    import jax.numpy as jnp
    return max(float(jnp.max(jnp.abs(u.astype(jnp.float32) - w.astype(jnp.float32))))
               for u, w in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main(argv=None) -> int:
    from trinity_jax.malloc_env import reexec_with_hugepages
    if argv is None:
        reexec_with_hugepages()
    import ab_train
    import bench_train as bt
    from trinity_jax.train.metrics import describe_host

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", choices=sorted(FILES), required=True)
    ap.add_argument("--rev", default="HEAD", help="git revision of the old version")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--copies", type=int, default=4, help="builds of each version")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--model", default="{}", help="JSON object of model fields to override")
    ap.add_argument("--batch", type=int, default=bt.BATCH)
    ap.add_argument("--seq", type=int, default=bt.SEQ)
    args = ap.parse_args(argv)
    if args.copies < 1 or args.rounds < 1:
        ap.error("--copies and --rounds must be at least 1")
    fields, _, _ = bt.model_and_shape(ap, "bench", args.model)

    import importlib

    from trinity_jax.config import model_config
    cfg = model_config(**{**fields, "dtype": args.dtype})
    path = FILES[args.layer]
    new = importlib.import_module(path[:-3].replace("/", "."))
    old = load_at_revision(args.rev, path, f"{new.__name__}_at_{args.rev.replace('~', '_')}")
    names = ["old", "new"]
    order = ab_train.balanced_order(names, args.copies)
    steps, firsts = {}, {}
    for i, name in enumerate(order):
        if name == "old":
            with standing_in(new, old):
                steps[i], first = layer_step(old, args.layer, cfg, args.batch, args.seq)
        else:
            steps[i], first = layer_step(new, args.layer, cfg, args.batch, args.seq)
        firsts.setdefault(name, first)
    times = bt.run_interleaved(steps, 0, args.rounds, log=lambda s: None)   # built = compiled
    res = ab_train.summarise(names, order, list(times.values()))
    med = {n: [1e3 * m for m in res["copy_medians"][n]] for n in names}
    ratio, per_round, _ = ab_train.compare(res, "old", "new")
    print(describe_host())
    print(f"{args.layer}, {args.dtype}, {args.batch} x {args.seq} tokens, forward+backward; "
          f"old = {path} at {args.rev}, new = working tree; {args.copies} copies x {args.rounds} rounds")
    for n in names:
        print(f"  {n}: mean of copy medians {statistics.mean(med[n]):.1f} ms   copies "
              + " ".join(f"{m:.1f}" for m in med[n]))
    print(f"speed-up new vs old: {ratio:.3f}x (per-round sums {per_round:.3f}x); largest difference "
          f"in loss and gradients: {max_difference(firsts['old'], firsts['new']):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
