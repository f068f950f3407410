"""Decode throughput: trinity_jax generation vs transformers `generate`, same weights, CPU.

    python scripts/bench_generate.py [--config experiments/tiny.py] [--batch 1 8] [--new 128] [--repeats 3]

Random weights for the config's model are exported with `tj.export_hf` and loaded by
`transformers.AfmoeForCausalLM`; both sides generate `--new` tokens greedily after the same
random `--prompt`-token prompt, with no stop token (exactly --new tokens each). Reported: the
median over --repeats of generated tokens per second (batch × new / wall time, prefill included,
compilation excluded by a warm-up run), for our fully-jitted loop (`generate_tokens`), our
streaming path (a jitted step per token, as `m.generate(stream=True)`), and transformers (with
1 or the default number of torch threads, whichever is faster on a short run: torch's threads
thrash when the cores are shared); then the ratios ours / transformers and whether the greedy
tokens agree.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trinity_jax as tj  # noqa: E402
from trinity_jax.cli import load_experiment  # noqa: E402
from trinity_jax.inference.generate import stream_tokens  # noqa: E402
from trinity_jax.model import abstract_variables  # noqa: E402


def random_model(cfg, seed: int = 0) -> tj.LoadedModel:
    """Weights ~ N(0, (2σ)²) (sharper than the init, so greedy argmaxes are not near-ties)."""
    rng = np.random.default_rng(seed)
    std = 2 * cfg.sigma
    v = jax.tree_util.tree_map(lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32)
                               if len(a.shape) > 1 else np.ones(a.shape, np.float32), abstract_variables(cfg))
    if "balance" in v:
        v["balance"] = jax.tree_util.tree_map(lambda a: (0.01 * rng.standard_normal(a.shape)).astype(np.float32),
                                              v["balance"])
    return tj.LoadedModel(cfg, v)


def pick_torch_threads(hf, prompt, pad_id: int, default: int) -> int:
    """The faster of 1 and `default` torch threads on a short generation (threads thrash on busy cores)."""
    import torch

    best, best_t = 1, float("inf")
    for n in sorted({1, default}):
        torch.set_num_threads(n)
        with torch.no_grad():
            hf.generate(torch.as_tensor(prompt[:, :4], dtype=torch.long), max_new_tokens=2, do_sample=False,
                        eos_token_id=None, pad_token_id=pad_id)
            t0 = time.perf_counter()
            hf.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=8, do_sample=False,
                        eos_token_id=None, pad_token_id=pad_id)
        if time.perf_counter() - t0 < best_t:
            best, best_t = n, time.perf_counter() - t0
    return best


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()                                       # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/tiny.py")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    import transformers

    cfg = load_experiment(args.config, {}).model
    ours = random_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers.AfmoeForCausalLM.from_pretrained(tj.export_hf(ours, os.path.join(tmp, "hf"))).eval()
    print(f"model: {args.config}  d={cfg.hidden_size} layers={cfg.num_hidden_layers} experts={cfg.num_experts} "
          f"k={cfg.num_experts_per_tok} vocab={cfg.vocab_size} window={cfg.sliding_window} | "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"attn={hf.config._attn_implementation}")
    print(f"greedy, prompt {args.prompt}, {args.new} new tokens, median of {args.repeats}; "
          "HF at its best torch thread count")
    print(f"{'batch':>5} {'ours loop tok/s':>16} {'ours stream tok/s':>18} {'HF tok/s':>10} {'ratio':>7} "
          f"{'stream ratio':>13} {'same':>6}")
    default_threads = torch.get_num_threads()
    for b in args.batch:
        prompt = np.random.default_rng(b).integers(7, cfg.vocab_size, (b, args.prompt)).astype(np.int32)
        t_loop, out = timed(lambda: ours.generate_tokens(prompt, args.new), args.repeats)
        t_stream, _ = timed(lambda: [int(s[0]) for s in stream_tokens(ours, prompt, args.new)], args.repeats)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=args.new,
                                   do_sample=False, eos_token_id=None, pad_token_id=cfg.pad_token_id).numpy()
        threads = pick_torch_threads(hf, prompt, cfg.pad_token_id, default_threads)
        torch.set_num_threads(threads)
        t_hf, want = timed(hf_generate, args.repeats)
        torch.set_num_threads(default_threads)
        n = b * args.new
        same = float(np.mean(out == want)) if out.shape == want.shape else 0.0
        print(f"{b:>5} {n / t_loop:>16.0f} {n / t_stream:>18.0f} {n / t_hf:>10.0f} {t_hf / t_loop:>6.1f}x "
              f"{t_hf / t_stream:>12.1f}x {same:>6.0%}  (HF {threads} thread{'s' if threads > 1 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
