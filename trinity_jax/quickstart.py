"""The main job (`scripts/quickstart.sh`): plan table → tokenize the embedded corpus → pre-train the
tiny Trinity through its phases (TrueBase, Base) → SFT (Preview) → samples → summary.

A second run resumes unfinished stages from their checkpoints and skips finished ones.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

from trinity_jax.cli import _split_overrides, load_experiment

DEFAULT_CONFIG = "experiments/tiny.py"
CHAT_QUESTION = "What does `textwrap.dedent` do?"
PROMPT = "def fibonacci(n):\n"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def plan_all(root: str) -> None:
    from trinity_jax.config import from_config_dict, load_config_file
    from trinity_jax.model.counting import count_params, format_count, train_flops_per_token

    rows = []
    for path in sorted(glob.glob(os.path.join(root, "experiments", "*.py"))):
        if os.path.basename(path).startswith("_"):
            continue
        cfg = from_config_dict(load_config_file(path))
        c = count_params(cfg.model)
        m = cfg.model
        rows.append((os.path.basename(path)[:-3], format_count(c["total"]), format_count(c["active"]),
                     f"{m.num_experts_per_tok}/{m.num_experts}+{m.num_shared_experts}",
                     str(m.num_hidden_layers), format_count(train_flops_per_token(m, cfg.train.seq_len))))
    head = ("config", "total", "active", "experts", "layers", "train FLOPs/token")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths)))


def sample(model, prompt: str, *, chat: bool, max_new_tokens: int = 48) -> str:
    if not hasattr(model, "generate"):
        return "(generation not available)"
    kw = dict(max_new_tokens=max_new_tokens, chat=chat)
    if not chat:
        kw["temperature"] = 0.0
    return model.generate(prompt, **kw)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(prog="trinity quickstart")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--workdir", default="runs/quickstart")
    args = p.parse_args(rest)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    cfg = load_experiment(args.config, overrides)      # validated before anything runs
    workdir = os.path.abspath(args.workdir)

    _banner("1/5 models in experiments/ (parameters, FLOPs)")
    plan_all(root)

    import trinity_jax as tj
    from trinity_jax import recipe

    _banner(f"2/5 pre-training {args.config} through {max(1, len(cfg.data.phases))} phase(s) -> {workdir}")
    run, data = recipe.pretrain(cfg, workdir, log=_log)
    val_batches = data.validation_batches(cfg.train.eval_batches, cfg.train.batch_size)

    if cfg.sft.steps > 0:
        _banner(f"3/5 SFT ({cfg.sft.steps} steps, assistant-only loss) -> Preview")
        recipe.post_train(cfg, workdir, log=_log)
    else:
        _banner("3/5 SFT skipped (sft.steps=0)")

    _banner("4/5 samples")
    results = {}
    for name in ("truebase", "base", "preview"):
        path = os.path.join(workdir, "variants", name)
        if not os.path.isdir(path):
            continue
        m = tj.load(path)
        results[name] = {"path": path, "val_loss": recipe.validation_loss(m, val_batches),
                         "step": m.metadata.get("step"), "tokens_seen": m.metadata.get("tokens_seen")}
        chat = name == "preview"
        prompt = CHAT_QUESTION if chat else PROMPT
        try:
            text = sample(m, prompt, chat=chat)
        except Exception as e:  # noqa: BLE001 - a sample must not fail the job
            text = f"(generation failed: {type(e).__name__}: {e})"
        print(f"--- {name} | {'chat: ' if chat else ''}{prompt!r}\n{text}\n", flush=True)

    _banner("5/5 summary")
    ent = getattr(data, "unigram_entropy", None)
    print(f"workdir            {workdir}")
    print(f"metrics            {os.path.join(workdir, 'metrics.jsonl')}  (TensorBoard: {os.path.join(workdir, 'tb')})")
    print(f"plots              {os.path.join(workdir, 'plots')}")
    print(f"checkpoints        {os.path.join(workdir, 'checkpoints')}")
    for name, r in results.items():
        print(f"variant {name:<10} {r['path']}  step {r['step']}  val loss {r['val_loss']:.3f} nats/token")
    if ent is not None:
        print(f"unigram entropy    {ent:.3f} nats/token (a model that ignores context)")
    if "truebase" in results and "base" in results:
        tb, b = results["truebase"]["val_loss"], results["base"]["val_loss"]
        print(f"Base vs TrueBase   {b:.3f} vs {tb:.3f} nats/token ({'lower' if b < tb else 'NOT lower'})")
    print(f"wall time          {time.time() - t0:.0f} s")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"variants": results, "unigram_entropy": ent, "wall_s": time.time() - t0}, f, indent=2)
    return 0
