"""Run the variants of an ablation group one after another and compare them.

    python -m trinity_jax ablate experiments/ablations/balancing.py [--workdir runs/ablations/balancing]
        [--variants smebu,sign] [--config.train.steps=80 ...]

A *group* is an experiment file with a module-level ``VARIANTS`` (the variant names: a tuple,
or a dict name -> changed fields) and ``get_config(variant)``; variant ``v`` is the config of
``file.py:v`` plus the ``--config.*`` overrides, which apply to every variant. All variants are
validated before anything runs. Each trains in ``<workdir>/<variant>/`` (the usual workdir:
config.json, metrics.jsonl, tb/, plots/, checkpoints/, variants/base/) and:

- is skipped when finished (its metrics.jsonl has a record at ``train.steps`` with ``val_loss``);
- resumes from its own checkpoints when unfinished;
- is refused (before anything runs) when its config.json differs from the config asked for,
  since mixing runs of different configs in one table would mislead.

Variants with an empty ``data.cache_dir`` share ``<workdir>/_data`` (one tokenisation).
Then ``<workdir>/comparison.md`` (a table: one row per variant), ``loss.png`` and
``max_vio.png`` (one line per variant) and ``comparison.json`` (the rows, and which variants
each plot draws) are written. ``--compare-only`` rewrites them from the metrics already there.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from typing import Callable, Sequence

from trinity_jax.config import ConfigError, ExperimentConfig, check_workdir_config
from trinity_jax.train.metrics import read_metrics

__all__ = ["main", "group_variants", "variant_configs", "check_resumable", "is_finished", "run_variant", "read_metrics",
           "summarize", "comparison_table", "write_comparison"]

FINAL_LOSS_WINDOW = 3    # "final train loss" = mean of the last this-many logged losses


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- group -> configs

def group_variants(path: str) -> list[str]:
    """The variant names of a group file (its module-level ``VARIANTS``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"ablate {path}: no such file")
    from trinity_jax.config import load_config_file

    load_config_file(path)        # checks get_config() and puts the repo root on sys.path for the import below
    spec = importlib.util.spec_from_file_location(f"_trinity_group_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variants = getattr(module, "VARIANTS", None)
    if not variants or isinstance(variants, str):
        raise ConfigError(f"ablate {path}: the file defines no VARIANTS (a tuple of variant names, or a "
                          "dict name -> changed fields) for get_config(variant)")
    names = [str(v) for v in variants]
    for n in names:
        if not n or "/" in n or n.startswith(("_", ".")):
            raise ConfigError(f"ablate {path}: variant name {n!r} must be a plain directory name")
    return names


def variant_configs(path: str, overrides: dict[str, str], only: Sequence[str] = ()) -> dict:
    """{variant: validated ExperimentConfig} for the group file (optionally a subset)."""
    from trinity_jax.cli import load_experiment

    names = group_variants(path)
    unknown = [v for v in only if v not in names]
    if unknown:
        raise ConfigError(f"--variants: unknown variant {unknown[0]!r}; {path} has {names}")
    return {v: load_experiment(f"{path}:{v}", overrides) for v in names if not only or v in only}


def _with_shared_cache(cfg: ExperimentConfig, workdir: str) -> ExperimentConfig:
    if cfg.data.cache_dir:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=os.path.join(workdir, "_data")))


def check_resumable(cfg: ExperimentConfig, vdir: str) -> None:
    """Raise when ``vdir`` holds a run of a different config (see the module docstring): every
    field must match, mesh and logging included."""
    check_workdir_config(cfg, vdir, may_change=())


# ----------------------------------------------------------------------------- running

def is_finished(vdir: str, steps: int) -> bool:
    """A record at ``steps`` carrying ``val_loss`` (the loop's final evaluation) exists."""
    return any(int(r.get("step", -1)) == steps and r.get("val_loss") is not None for r in read_metrics(vdir))


def run_variant(cfg: ExperimentConfig, vdir: str, *, log: Callable = _log) -> None:
    """Pre-train one variant in ``vdir`` with checkpoints (resumes) and a Base variant at the end."""
    import jax

    from trinity_jax import recipe
    from trinity_jax.data import build_data
    from trinity_jax.train import loop

    data = build_data(cfg, vdir, process_index=jax.process_index(), process_count=jax.process_count(), log=log)
    callbacks = [recipe._checkpointer(cfg, vdir, log=log),
                 recipe.VariantCallback(vdir, cfg, data.tokenizer, "base", step=None,
                                        metadata={"stage": "ablation run"}, log=log)]
    loop.train(cfg, vdir, data=data, callbacks=callbacks, log=log)


# ----------------------------------------------------------------------------- comparison

def _finite(xs):
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def summarize(records: list[dict]) -> dict:
    """One table row from a variant's metrics records."""
    losses = _finite(r.get("loss") for r in records)
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    vio = [r["max_vio"] for r in records if r.get("max_vio") is not None]
    het = _finite(r.get("batchhet") for r in records)
    tps = _finite(r.get("tokens_per_s") for r in records)
    return {"steps": int(records[-1]["step"]) if records else 0,
            "final_loss": sum(losses[-FINAL_LOSS_WINDOW:]) / len(losses[-FINAL_LOSS_WINDOW:]) if losses else None,
            "val_loss": val[-1] if val else None,
            "max_vio": vio[-1] if vio else None,
            "batchhet": sum(het) / len(het) if het else None,
            "tokens_per_s": _median(tps)}


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _plot(series: dict, key: str, ylabel: str, path: str, title: str) -> list[str]:
    """One line per variant of ``key`` against step; returns the variants drawn."""
    from trinity_jax.train.metrics import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = []
    for name, records in series.items():
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), label=name)
            drawn.append(name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def comparison_table(rows: dict) -> list[str]:
    """Markdown table lines, one row per variant (rows from :func:`summarize`)."""
    lines = ["| variant | steps | final train loss | val loss | max_vio (final) | BatchHet (mean) | tokens/s (median) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v, r in rows.items():
        lines.append(f"| {v} | {r['steps']} | {_fmt(r['final_loss'], '.4f')} | {_fmt(r['val_loss'], '.4f')} | "
                     f"{_fmt(r['max_vio'], '.3f')} | {_fmt(r['batchhet'], '.4f')} | {_fmt(r['tokens_per_s'], ',.0f')} |")
    return lines


COLUMNS_NOTE = (f"final train loss: mean of the last {FINAL_LOSS_WINDOW} logged train losses (nats/token, incl. "
                "z-loss and balance loss); val loss: CE on the fixed validation batches after the last step; "
                "max_vio: max over MoE layers of max_i (n_i − n̄)/n̄ at the last logged step; BatchHet: max − mean "
                "of a step's microbatch losses (0 with one microbatch), mean over logged steps; tokens/s: median "
                "over log intervals (compilation and evaluation excluded).")


def write_comparison(workdir: str, variants: Sequence[str], *, group: str = "", command: str = "") -> dict:
    """comparison.md / .json and loss.png / max_vio.png from ``<workdir>/<variant>/metrics.jsonl``.

    Returns the rows ({variant: summary}).
    """
    series = {v: read_metrics(os.path.join(workdir, v)) for v in variants}
    rows = {v: summarize(recs) for v, recs in series.items()}
    name = os.path.splitext(os.path.basename(group))[0] if group else os.path.basename(os.path.normpath(workdir))
    lines = [f"# Ablation: {name}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += comparison_table(rows) + ["", COLUMNS_NOTE, "", "![loss](loss.png)", "", "![max_vio](max_vio.png)", ""]
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write("\n".join(lines))
    plots = {"loss.png": _plot(series, "loss", "train loss (nats / token)", os.path.join(workdir, "loss.png"),
                               f"{name}: train loss"),
             "max_vio.png": _plot(series, "max_vio", "MaxVio (max over MoE layers)",
                                  os.path.join(workdir, "max_vio.png"), f"{name}: MaxVio")}
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump({"group": group, "command": command, "variants": rows, "plots": plots}, f, indent=2)
    return rows


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    from trinity_jax.cli import _split_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(prog="trinity ablate", description="run the variants of an ablation group")
    p.add_argument("group", help="experiments/ablations/<group>.py (defines VARIANTS and get_config(variant))")
    p.add_argument("--workdir", default=None, help="default runs/ablations/<group>")
    p.add_argument("--variants", default="", help="comma-separated subset of the group's variants")
    p.add_argument("--compare-only", action="store_true", help="only rewrite the comparison")
    args = p.parse_args(rest)
    stem = os.path.splitext(os.path.basename(args.group))[0]
    workdir = os.path.abspath(args.workdir or os.path.join("runs", "ablations", stem))
    only = [v for v in args.variants.split(",") if v]
    configs = {v: _with_shared_cache(c, workdir) for v, c in variant_configs(args.group, overrides, only).items()}
    for v, cfg in configs.items():                 # refuse before anything runs
        check_resumable(cfg, os.path.join(workdir, v))
    command = " ".join(["python -m trinity_jax ablate", args.group]
                       + ([f"--workdir {args.workdir}"] if args.workdir else [])
                       + ([f"--variants {args.variants}"] if only else [])
                       + [f"--config.{k}={v}" for k, v in overrides.items()])
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    for i, (v, cfg) in enumerate([] if args.compare_only else configs.items()):
        vdir = os.path.join(workdir, v)
        if is_finished(vdir, cfg.train.steps):
            _log(f"[ablate] {i + 1}/{len(configs)} {v}: finished, skipped ({vdir})")
            continue
        _log(f"[ablate] {i + 1}/{len(configs)} {v}: training {cfg.train.steps} steps in {vdir}")
        run_variant(cfg, vdir)
    rows = write_comparison(workdir, list(configs), group=args.group, command=command)
    print("\n".join(comparison_table(rows)))
    print(f"\nwrote {os.path.join(workdir, 'comparison.md')}, loss.png, max_vio.png ({time.time() - t0:.0f} s)")
    return 0
