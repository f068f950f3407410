"""Train-step throughput: our jitted step vs transformers' AfmoeForCausalLM (torch), on CPU
(the target) or, where JAX sees a GPU, on that GPU (torch on CUDA beside it).

    .venv/bin/python scripts/bench_train.py [--steps 5] [--warmup 2] [--skip-hf]
        [--dtypes float32,bfloat16] [--optimizers adamw,muon] [--size bench|gpu]
        [--model JSON] [--out FILE.json]

Same run, same config (d=256, 8 layers (1 dense), 64 experts top-4 + 1 shared, vocab 8192),
same batch (8 × 512 tokens, one document per row) and optimizer: ours is the full Trinity
step (chunked CE + z-loss, balance loss, SMEBU, clipping) with every parameter on AdamW
(``optim.hidden_optimizer=adamw``, like-for-like) and, as a second row, with the recipe's
Muon; HF's is ``torch.optim.AdamW`` on the CE of ``model(input_ids).logits``. Each compute
dtype gets its rows: fp32 throughout, and bf16 compute on fp32 master weights (ours:
``model.dtype=bfloat16``; HF: the forward and loss under ``torch.autocast`` in bfloat16).
After ``--warmup`` (compile) steps of each, ``--steps`` rounds run one step of each row in
turn, so a drift in the shared machine's load hits every row of a round alike. Reports per row
the median step: tokens/s and MFU = tokens/s × train FLOPs/token / the n³ matmul peak of
the row's dtype (the mean of a measurement at the start and one at the end of the run); and
the ratio to HF in the same dtype, both of the medians and as the median of the per-round
ratios. Target: ours ≥ 2× HF tokens/s and MFU ≥ 40%. Run it alone: it uses every core.

``--size gpu`` is a larger model and batch for a GPU (d=1024, 64 experts of 512, vocab 32768,
16 × 2048 tokens), where the bench shape is launch-bound; ``--model '{"moe_impl": "ragged_dot"}'``
overrides fields of the model (both sides where HF has them). On a GPU the peak is an 8192³
product (2048³ on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
             num_hidden_layers=8, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, num_experts=64, num_experts_per_tok=4, num_shared_experts=1,
             route_scale=2.826, global_attn_every_n_layers=4, sliding_window=128,
             max_position_embeddings=512, mup_enabled=True,
             scan_unroll=8)   # layer stacks unrolled: ~20% faster steps on CPU (compile ~1.5x)
BATCH, SEQ = 8, 512
# --size gpu: a shape that keeps a GPU busy (the bench shape above is launch-bound there)
GPU_MODEL = dict(MODEL, vocab_size=32768, hidden_size=1024, intermediate_size=3072,
                 moe_intermediate_size=512, num_attention_heads=8, head_dim=128,
                 sliding_window=512, max_position_embeddings=2048,
                 scan_unroll=0)   # auto: scanned layers off CPU (a GPU compile is the long pole)
GPU_BATCH, GPU_SEQ = 16, 2048


def model_and_shape(ap: argparse.ArgumentParser, size: str, model_json: str) -> tuple[dict, int, int]:
    """(model fields, batch, seq) of `--size` with the `--model` JSON overrides applied; a bad
    --model stops the parser `ap` with a message naming the flag."""
    try:
        overrides = json.loads(model_json)
        assert isinstance(overrides, dict)
    except (ValueError, AssertionError):
        ap.error(f"--model={model_json!r}: expected a JSON object of model fields")
    model, batch, seq = (GPU_MODEL, GPU_BATCH, GPU_SEQ) if size == "gpu" else (MODEL, BATCH, SEQ)
    return {**model, **overrides}, batch, seq


def make_batch(model: dict, batch: int, seq: int, seed: int = 0) -> dict:
    """One document per row (no packing, so HF and we see the same attention pattern)."""
    r = np.random.default_rng(seed)
    toks = r.integers(0, model["vocab_size"], (batch, seq + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "loss_mask": np.ones((batch, seq), np.float32)}


class _FixedBatch:
    """A data module that serves the same batch every step."""

    def __init__(self, batch):
        self.phase_plan = [("bench", 0, 10 ** 9)]
        outer = batch

        class _It:
            tokens_seen, phase_name, step = 0, "bench", 0

            def next_batch(self, b):
                self.step += 1
                return outer

        self.train = _It()

    def validation_batches(self, n, b):
        return []


def make_run(batch, model: dict, hidden_optimizer: str, dtype: str = "float32",
             groups: dict | None = None):
    """Our train run (trinity_jax.train.loop.setup) on a fixed `batch`, in a temporary workdir
    -> (run, the batch on the run's devices, the TemporaryDirectory). `groups` overrides fields
    of any config group, over the bench's own: {"train": {"loss_chunk_size": 256}, ...}."""
    from trinity_jax.config import from_config_dict
    from trinity_jax.train import loop

    b, s = batch["inputs"].shape
    base = {"model": {**model, "dtype": dtype},
            "train": dict(batch_size=b, seq_len=s, steps=10 ** 6, peak_flops=1.0),
            "optim": dict(warmup_steps=10, hidden_optimizer=hidden_optimizer, ns_dtype=dtype)}
    groups = groups or {}
    cfg = from_config_dict({g: {**base.get(g, {}), **groups.get(g, {})} for g in {*base, *groups}})
    wd = tempfile.TemporaryDirectory()
    run = loop.setup(cfg, wd.name, data=_FixedBatch(batch), log=lambda *a: None)
    return run, run.to_device(batch), wd


def ours_stepper(batch, model: dict, hidden_optimizer: str, dtype: str = "float32",
                 groups: dict | None = None):
    """Our jitted train step on `batch` -> (step() -> (seconds, loss), info dict, close())."""
    import jax
    from trinity_jax.parallel import rules

    run, dev_batch, wd = make_run(batch, model, hidden_optimizer, dtype, groups)

    def step():
        with rules.use_mesh(run.mesh):
            t = time.perf_counter()
            run.state, m = run.train_step(run.state, dev_batch)
            jax.block_until_ready(m["loss"])
            return time.perf_counter() - t, float(m["loss"])

    def close():
        run.writer.close()
        wd.cleanup()

    return step, {"dtype": dtype, "flops_per_token": run.flops_per_token, "devices": jax.device_count()}, close


def hf_stepper(batch, model: dict, dtype: str = "float32", device: str = "cpu"):
    """transformers' AfmoeForCausalLM + torch AdamW on `batch`, same interface as ours_stepper;
    bfloat16: the forward and the loss under autocast (fp32 weights and optimizer)."""
    import contextlib

    import torch
    from transformers import AfmoeConfig, AfmoeForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    m = model
    hf_cfg = AfmoeConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"], moe_intermediate_size=m["moe_intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_dense_layers=m["num_dense_layers"],
        num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_key_value_heads"],
        head_dim=m["head_dim"], num_experts=m["num_experts"],
        num_experts_per_tok=m["num_experts_per_tok"], num_shared_experts=m["num_shared_experts"],
        route_scale=m["route_scale"], global_attn_every_n_layers=m["global_attn_every_n_layers"],
        sliding_window=m["sliding_window"], max_position_embeddings=m["max_position_embeddings"],
        mup_enabled=m["mup_enabled"], tie_word_embeddings=False)
    net = AfmoeForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(batch["inputs"].astype(np.int64)).to(device)
    labels = torch.from_numpy(batch["targets"].astype(np.int64)).to(device)

    autocast = ((lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bfloat16"
                else contextlib.nullcontext)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        sync()
        t = time.perf_counter()
        with autocast():
            logits = net(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t, loss.item()

    return step, {"dtype": dtype, "threads": torch.get_num_threads(), "device": device}, lambda: None


def run_interleaved(steppers: dict, warmup: int, steps: int, log) -> dict[str, list[float]]:
    """Warm every stepper up (compile), then time `steps` rounds in which each runs one step in
    turn: drift in the machine's load hits every row of a round alike. -> timed seconds by name."""
    times = {name: [] for name in steppers}
    for name, step in steppers.items():
        for i in range(warmup):
            dt, loss = step()
            log(f"  {name} warm-up {i}: {dt:.3f}s loss {loss:.4f}")
    for i in range(steps):
        for name, step in steppers.items():
            dt, loss = step()
            times[name].append(dt)
            log(f"  {name} step {i}: {dt:.3f}s loss {loss:.4f}")
    return times


SHORT = {"float32": "f32", "bfloat16": "bf16"}


def main() -> int:
    from trinity_jax.malloc_env import reexec_with_hugepages
    reexec_with_hugepages()     # both sides of the comparison run under it (one process)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="compute dtypes, each with its own rows: float32 and/or bfloat16")
    ap.add_argument("--optimizers", default="adamw,muon",
                    help="our step with every matrix on AdamW (like-for-like with HF) and/or Muon")
    ap.add_argument("--size", choices=("bench", "gpu"), default="bench",
                    help="bench: the issue's CPU shape; gpu: a larger model and batch for a GPU")
    ap.add_argument("--model", default="{}", help="JSON object of model fields to override")
    ap.add_argument("--out", default="")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    dtypes, optimizers = args.dtypes.split(","), args.optimizers.split(",")
    for name, values, allowed in (("--dtypes", dtypes, SHORT), ("--optimizers", optimizers, ("adamw", "muon"))):
        if not values or any(v not in allowed for v in values):
            ap.error(f"{name}={','.join(values)}: allowed values are {', '.join(allowed)}")
    model, n_batch, seq = model_and_shape(ap, args.size, args.model)
    log = (lambda *a: None) if args.quiet else (lambda s: print(s, flush=True))

    import jax
    from trinity_jax.train.metrics import describe_host, host_cpu, measure_matmul_peak

    backend = jax.default_backend()
    device = {"cpu": "cpu", "gpu": "cuda"}.get(backend)
    if device is None:
        raise SystemExit(f"bench_train: JAX backend {backend!r}: only cpu and gpu are supported")
    n_peak = 2048 if backend == "cpu" else 8192

    def peaks_now():
        return {dt: measure_matmul_peak(n=n_peak, repeats=3 if backend == "cpu" else 10, dtype=dt) for dt in dtypes}

    peaks = [peaks_now()]
    log(f"JAX backend {describe_host()}; matmul peaks ({n_peak}³): "
        + ", ".join(f"{SHORT[dt]} {p / 1e9:.1f} GFLOP/s" for dt, p in peaks[0].items()))
    batch = make_batch(model, n_batch, seq)
    made, hf_of = {}, {}
    for dt in dtypes:
        for opt in optimizers:
            made[f"ours {SHORT[dt]} ({opt})"] = ours_stepper(batch, model, opt, dt)
        if not args.skip_hf:
            hf_of[dt] = f"hf {SHORT[dt]} (adamw, torch)"
            made[hf_of[dt]] = hf_stepper(batch, model, dt, device)
    times = run_interleaved({name: m[0] for name, m in made.items()}, args.warmup, args.steps, log)
    for _, _, close in made.values():
        close()
    peaks.append(peaks_now())
    peak = {dt: statistics.mean(p[dt] for p in peaks) for dt in dtypes}   # MFU denominators
    fpt = next(info["flops_per_token"] for name, (_, info, _) in made.items() if name.startswith("ours"))
    rows = {}
    for name, ts in times.items():
        step_s = statistics.median(ts)
        tokens_per_s = n_batch * seq / step_s
        info = made[name][1]
        rows[name] = {**info, "step_s": step_s, "step_times_s": ts,
                      "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * fpt / peak[info["dtype"]]}
    res = {"backend": backend, "host_cpu": host_cpu() if backend == "cpu" else None, "config": model,
           "batch": [n_batch, seq], "peak_flops": peak, "peaks_flops": peaks,
           "rows": rows}
    print(f"\n{describe_host()}")
    print(f"train FLOPs/token {fpt / 1e6:.1f}M; median of {args.steps} interleaved rounds after "
          f"{args.warmup} warm-up; MFU of each dtype's {n_peak}³ matmul peak (mean of start and end):")
    for dt in dtypes:
        print(f"  {SHORT[dt]} peak {peak[dt] / 1e9:.1f} GFLOP/s (start {peaks[0][dt] / 1e9:.1f}, "
              f"end {peaks[1][dt] / 1e9:.1f})")
    print(f"{'':26}{'step s':>9}{'tokens/s':>11}{'MFU':>8}")
    for name, r in rows.items():
        print(f"{name:26}{r['step_s']:9.3f}{r['tokens_per_s']:11,.0f}{r['mfu']:8.1%}")
    for name, r in rows.items():
        hf = rows.get(hf_of.get(r["dtype"], ""))
        if name.startswith("ours") and hf is not None:
            # per round: HF's step time / ours in the same round, then the median over rounds
            paired = statistics.median(h / o for h, o in zip(hf["step_times_s"], r["step_times_s"]))
            r["ratio_vs_hf"], r["ratio_vs_hf_paired"] = r["tokens_per_s"] / hf["tokens_per_s"], paired
            print(f"ratio {name} / {hf_of[r['dtype']]} tokens/s: {r['ratio_vs_hf']:.2f}× "
                  f"(median of per-round ratios {paired:.2f}×)")
    if hf_of:
        print("targets: ours (adamw, like-for-like) ≥ 2× hf in the same dtype; MFU ≥ 40%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
