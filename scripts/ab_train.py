"""Is variant B of the train step faster than A? Replicated, interleaved A/B on this machine.

    .venv/bin/python scripts/ab_train.py --variant base='{}' \\
        --variant qkv='{"attention_impl": "xla"}' [--copies 4] [--rounds 5] [--dtype bfloat16]
        [--optimizer adamw] [--size bench|gpu]

Each ``--variant NAME=JSON`` is the bench model (``scripts/bench_train.py``) with those model
fields overridden; a key ``group.field`` overrides another config group's field
(``{"train.loss_chunk_size": 1024}``). Every variant is built ``--copies`` times, the copies interleaved in a
balanced order (A B B A A B B A ...), and each round runs one step of every copy in turn.

Why copies: on the 2-core dev box two builds of the *same* step differ by 10-15% for their
whole life (session 9: one config's copies ran at 1.54-2.11 s medians), and the copy built
second was the faster in most pairs. A single build per variant, run in turn, reported a change
that does nothing as 1.11x faster twice, and as 0.86x when the build order was swapped. So
the verdict here compares variants across copies: the ratio of the means of the copies'
median steps, with the spread of the copies beside it, and the median over rounds of the
per-round ratio of the summed step times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def balanced_order(names: list[str], copies: int) -> list[str]:
    """Build order with each variant `copies` times, alternating direction each pass
    (A B, B A, A B, ...), so no variant is always built first or last."""
    order = []
    for c in range(copies):
        order.extend(names if c % 2 == 0 else names[::-1])
    return order


def parse_variant(ap: argparse.ArgumentParser, text: str) -> tuple[str, tuple[dict, dict]]:
    """NAME=JSON -> (NAME, (model fields, {group: fields} for the `group.field` keys))."""
    name, sep, body = text.partition("=")
    try:
        fields = json.loads(body) if sep else None
        assert isinstance(fields, dict) and name
    except (ValueError, AssertionError):
        ap.error(f"--variant {text!r}: expected NAME=JSON, a JSON object of model fields")
    model, groups = {}, {}
    for key, value in fields.items():
        group, dot, field = key.partition(".")
        if dot:
            groups.setdefault(group, {})[field] = value
        else:
            model[key] = value
    return name, (model, groups)


def summarise(names: list[str], order: list[str], times: list[list[float]]) -> dict:
    """Per variant: the copies' median steps; per round: each variant's summed step time."""
    med = {n: [statistics.median(ts) for o, ts in zip(order, times) if o == n] for n in names}
    rounds = len(times[0])
    per_round = {n: [sum(ts[r] for o, ts in zip(order, times) if o == n) for r in range(rounds)]
                 for n in names}
    return {"copy_medians": med, "round_sums": per_round}


def compare(res: dict, base: str, other: str) -> tuple[float, float, float]:
    """(speed-up of `other` over `base`: the ratio of the means of the copies' medians; the
    median over rounds of the per-round ratio of summed times; the largest spread between one
    variant's copies) from a `summarise` result."""
    med, sums = res["copy_medians"], res["round_sums"]
    ratio = statistics.mean(med[base]) / statistics.mean(med[other])
    per_round = statistics.median(a / b for a, b in zip(sums[base], sums[other]))
    spread = max(max(med[k]) / min(med[k]) for k in (base, other))
    return ratio, per_round, spread


def main() -> int:
    from trinity_jax.malloc_env import reexec_with_hugepages
    reexec_with_hugepages()
    import bench_train as bt
    from trinity_jax.train.metrics import describe_host

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON (at least two)")
    ap.add_argument("--copies", type=int, default=4, help="builds of each variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    ap.add_argument("--size", choices=("bench", "gpu"), default="bench")
    args = ap.parse_args()
    variants = dict(parse_variant(ap, v) for v in args.variant)
    if len(variants) < 2:
        ap.error("give at least two --variant NAME=JSON (distinct names)")
    if args.copies < 1 or args.rounds < 1:
        ap.error("--copies and --rounds must be at least 1")
    names = list(variants)
    base_model, n_batch, seq = bt.model_and_shape(ap, args.size, "{}")
    batch = bt.make_batch(base_model, n_batch, seq)
    order = balanced_order(names, args.copies)
    made = {}
    for i, name in enumerate(order):
        model, groups = variants[name]
        made[f"{name}#{i}"] = bt.ours_stepper(batch, {**base_model, **model}, args.optimizer,
                                              args.dtype, groups)
        print(f"built copy {i} of {name}", flush=True)
    by_copy = bt.run_interleaved({k: m[0] for k, m in made.items()}, args.warmup, args.rounds,
                                 log=lambda s: None)
    for _, _, close in made.values():
        close()
    res = summarise(names, order, list(by_copy.values()))
    print(f"\n{describe_host()}")
    print(f"{args.size} model, {args.dtype}, {args.optimizer}; {args.copies} copies x "
          f"{args.rounds} rounds; step seconds")
    print(f"{'variant':<16}{'mean of copy medians':>22}   copies' medians")
    for n in names:
        m = res["copy_medians"][n]
        print(f"{n:<16}{statistics.mean(m):22.3f}   " + " ".join(f"{x:.3f}" for x in m))
    base = names[0]
    for n in names[1:]:
        ratio, paired, spread = compare(res, base, n)
        print(f"speed-up {n} vs {base}: {ratio:.3f}x (per-round sums {paired:.3f}x); "
              f"copies of one variant differ by up to {spread:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
