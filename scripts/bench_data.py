"""Data pipeline throughput: batches/s and tokens/s of ``next_batch`` (default 8 x 256 tokens).

    python scripts/bench_data.py [--workdir /tmp/trinity_bench_data] [--batches 300]
        [--batch-size 8] [--seq-len 256] [--train-tokens-per-s N]

Builds the default three-phase stdlib corpus (lib / tests / docs) in ``--workdir`` (the first
run trains the tokenizer and tokenises the corpus, and reports how long that took; later runs
reuse the shards), then times ``next_batch`` for packed and RSDB loading, and the validation
batches. The number to compare against is the tiny train step's tokens/s (measured by the
train loop): pass it as ``--train-tokens-per-s`` to print the ratio — the pipeline should be
far faster than training so it never stalls a step.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trinity_jax.config import from_config_dict  # noqa: E402
from trinity_jax.data import build_data  # noqa: E402


def make_config(args, loading: str):
    return from_config_dict({
        "model": {"vocab_size": args.vocab_size},
        "data": {"sources": {"lib": "stdlib:lib", "tests": "stdlib:tests", "docs": "stdlib:docs"},
                 "phases": [{"name": "general", "tokens": 6, "mixture": {"lib": 1, "tests": 1}},
                            {"name": "code", "tokens": 3, "mixture": {"lib": 2, "docs": 1}},
                            {"name": "anneal", "tokens": 1, "mixture": {"lib": 1, "docs": 1}}],
                 "loading": loading},
        "train": {"steps": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/trinity_bench_data")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--train-tokens-per-s", type=float, default=0.0,
                    help="the tiny train step's tokens/s, to print the ratio pipeline / train")
    args = ap.parse_args()

    logs: list[str] = []

    def log(msg):
        logs.append(msg)
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    dm = build_data(make_config(args, "packed"), args.workdir, log=log)
    build_s = time.perf_counter() - t0
    print(f"build_data: {build_s:.1f}s ({'first build' if logs else 'cached shards'})")
    for m in logs:
        print("  " + m)
    print(dm.summary())

    tokens_per_batch = args.batch_size * args.seq_len
    for loading in ("packed", "rsdb"):
        dm = build_data(make_config(args, loading), args.workdir, log=lambda m: None)
        dm.train.next_batch(args.batch_size)                         # warm-up
        t0 = time.perf_counter()
        for _ in range(args.batches - 1):
            dm.train.next_batch(args.batch_size)
        dt = time.perf_counter() - t0
        bps = (args.batches - 1) / dt
        tps = bps * tokens_per_batch
        line = (f"{loading:>6}: {bps:,.0f} batches/s, {tps:,.0f} tokens/s "
                f"(batch {args.batch_size} x {args.seq_len}, phases {dm.train.phase_name})")
        if args.train_tokens_per_s > 0:
            line += f"; {tps / args.train_tokens_per_s:,.1f}x the train step's tokens/s"
        print(line)
    t0 = time.perf_counter()
    val = dm.validation_batches(16, args.batch_size)
    print(f"validation: {len(val)} batches in {time.perf_counter() - t0:.2f}s")
    print(f"unigram entropy of phase 1: {dm.unigram_entropy:.3f} nats/token")
    if args.train_tokens_per_s <= 0:
        print("compare with: the tiny train step's tokens/s (pass --train-tokens-per-s N for the ratio)")


if __name__ == "__main__":
    main()
