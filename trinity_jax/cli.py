"""Command line: `python -m trinity_jax <command>` (or the `trinity` console script).

    quickstart  [--config experiments/tiny.py] [--workdir runs/quickstart]   the main job
    ablate      experiments/ablations/GROUP.py [--workdir DIR] [--config.a.b=v ...]   run a group's
                variants (resumable), then write DIR/comparison.md and loss / MaxVio plots
    train       --config FILE --workdir DIR [--config.a.b=v ...]   pre-train (+ SFT if sft.steps > 0);
                resumes from DIR, writes variants/{truebase,base,preview}
    sft         --config FILE --workdir DIR                        only the SFT stage (Base -> Preview)
    plan        --config FILE [--mesh replica=16,fsdp=128,expert=8 --devices 2048]
    convert-hf  --hf HF_DIR --out OUT_DIR          import an AFMoE directory into a variant dir
    export      --workdir DIR --variant base [--hf OUT] [--dtype D]   write an HF dir; --dtype re-saves the
                variant itself in D (default: the variant is left as it is)
    generate    --model DIR --prompt "..." [--chat]

Only train, sft and plan take `--config.a.b=v` overrides; other commands refuse them. An output
directory that exists, is not empty and is not an earlier output of the same kind is refused.
Errors in the input are printed as one line (`error: ...`) and exit with status 2;
`--verbose` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--config.a.b=v` / `--config.a.b v` out of argv."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key = a[len("--config."):]
            if "=" in key:
                key, val = key.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"{a}: missing value")
                val, i = argv[i + 1], i + 1
            overrides[key] = val
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def load_experiment(path: str, overrides: dict[str, str]):
    from trinity_jax.config import from_config_dict, load_config_file

    return from_config_dict(load_config_file(path, overrides))


# ----------------------------------------------------------------------------- commands

def cmd_plan(args, overrides) -> int:
    from trinity_jax.model.counting import count_params, format_count, train_flops_per_token

    cfg = load_experiment(args.config, overrides)
    mesh = None
    if args.mesh:
        mesh = {}
        for part in args.mesh.split(","):
            k, _, v = part.partition("=")
            if k not in ("replica", "fsdp", "expert", "tensor") or not v.lstrip("-").isdigit():
                raise ValueError(f"--mesh {args.mesh!r}: expected axis=size pairs over replica, fsdp, expert, tensor")
            mesh[k] = int(v)
    try:
        from trinity_jax.parallel import planner
    except ImportError:
        planner = None
    if mesh is not None and planner is not None and hasattr(planner, "format_plan"):
        print(planner.format_plan(cfg, mesh, n_devices=args.devices, peak_flops=args.peak_flops,
                                  interconnect_bw=args.bandwidth))
        return 0
    m = cfg.model
    c = count_params(m)
    fpt = train_flops_per_token(m, cfg.train.seq_len)
    print(f"config: {args.config}")
    rows = [("total parameters", format_count(c["total"])), ("active parameters", format_count(c["active"])),
            ("embedding (both)", format_count(c["embedding"])), ("attention + norms", format_count(c["attention"])),
            ("dense MLP", format_count(c["dense_mlp"])), ("routed experts", format_count(c["routed_experts"])),
            ("shared experts", format_count(c["shared_experts"])), ("router", format_count(c["router"])),
            ("routing fraction", f"{m.num_experts_per_tok}/{m.num_experts} = "
                                 f"{m.num_experts_per_tok / max(m.num_experts, 1):.2%}"),
            (f"train FLOPs / token (seq {cfg.train.seq_len})", format_count(fpt)),
            ("train FLOPs / step", format_count(fpt * cfg.train.batch_size * cfg.train.seq_len))]
    from trinity_jax.inference.kv_cache import plan_rows
    rows += plan_rows(m, cfg.train.seq_len)
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    return 0


def cmd_convert_hf(args, overrides) -> int:
    import trinity_jax as tj
    from trinity_jax.checkpoint import hf

    try:
        from trinity_jax.checkpoint import variants
    except ImportError:
        variants = None
    as_variant = variants is not None and hasattr(variants, "save_variant") and not args.as_hf
    if as_variant:                 # refuse an unrelated --out before reading the model
        variants.check_variant_output_dir(args.out)
    else:
        hf.check_hf_output_dir(args.out)
    model = tj.load(args.hf)       # validates everything before writing
    if as_variant:
        path = variants.save_variant(model, args.out, name=os.path.basename(os.path.normpath(args.out)),
                                     metadata={"source": os.path.abspath(args.hf)})
    else:
        path = tj.export_hf(model, args.out)
    print(f"wrote {path}")
    return 0


def _maybe_distributed(args) -> None:
    if args.coordinator or os.environ.get("SLURM_NTASKS") or os.environ.get("TRINITY_COORDINATOR"):
        from trinity_jax.parallel import distributed
        distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def cmd_export(args, overrides) -> int:
    from trinity_jax.checkpoint import variants

    path = variants.export(args.workdir, args.variant, hf_dir=args.hf, dtype=args.dtype)
    print(f"wrote {path}")
    return 0


def cmd_generate(args, overrides) -> int:
    import trinity_jax as tj

    model = tj.load(args.model)
    kwargs = dict(max_new_tokens=args.max_new_tokens, stream=True, chat=args.chat)
    for k in ("temperature", "top_k", "top_p", "min_p"):
        if getattr(args, k) is not None:
            kwargs[k] = getattr(args, k)
    for piece in model.generate(args.prompt, **kwargs):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_sft(args, overrides) -> int:
    from trinity_jax import recipe

    cfg = load_experiment(args.config, overrides)
    if cfg.sft.steps <= 0:
        raise ValueError("sft.steps=0: set --config.sft.steps=N (> 0) to run the SFT stage")
    recipe.post_train(cfg, args.workdir)
    return 0


def cmd_pretrain(args, overrides) -> int:
    from trinity_jax import recipe

    cfg = load_experiment(args.config, overrides)
    _maybe_distributed(args)
    recipe.pretrain(cfg, args.workdir)
    if cfg.sft.steps > 0:
        recipe.post_train(cfg, args.workdir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trinity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from an experiment config (resumes from --workdir)")
    t.add_argument("--config", required=True)
    t.add_argument("--workdir", required=True)
    t.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
    t.add_argument("--num-processes", type=int, default=None)
    t.add_argument("--process-id", type=int, default=None)
    t.set_defaults(fn=cmd_pretrain, takes_overrides=True)

    s = sub.add_parser("sft", help="run only the SFT stage (Base -> Preview) of a workdir")
    s.add_argument("--config", required=True)
    s.add_argument("--workdir", required=True)
    s.set_defaults(fn=cmd_sft, takes_overrides=True)

    pl = sub.add_parser("plan", help="parameter / FLOP counts; with --mesh, per-device memory and time")
    pl.add_argument("--config", required=True)
    pl.add_argument("--mesh", default=None, help="e.g. replica=16,fsdp=128,expert=8")
    pl.add_argument("--devices", type=int, default=None)
    pl.add_argument("--peak-flops", type=float, default=989e12, help="per-device peak FLOP/s (H100 bf16 dense)")
    pl.add_argument("--bandwidth", type=float, default=400e9, help="per-device interconnect bytes/s")
    pl.set_defaults(fn=cmd_plan, takes_overrides=True)

    c = sub.add_parser("convert-hf", help="import a Hugging Face AFMoE directory")
    c.add_argument("--hf", required=True, help="directory with config.json + safetensors")
    c.add_argument("--out", required=True)
    c.add_argument("--as-hf", action="store_true", help="write a (re-exported) HF directory instead")
    c.set_defaults(fn=cmd_convert_hf)

    e = sub.add_parser("export", help="re-export a variant of a training workdir")
    e.add_argument("--workdir", required=True)
    e.add_argument("--variant", required=True, choices=("truebase", "base", "preview"))
    e.add_argument("--hf", default=None, help="also write a Hugging Face directory here")
    e.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="re-save the variant itself in this dtype (default: leave the variant untouched)")
    e.set_defaults(fn=cmd_export)

    g = sub.add_parser("generate", help="sample from a model directory, streaming tokens")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", dest="top_k", type=int, default=None)
    g.add_argument("--top-p", dest="top_p", type=float, default=None)
    g.add_argument("--min-p", dest="min_p", type=float, default=None)
    g.set_defaults(fn=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    if verbose:
        argv.remove("--verbose")
    try:
        if argv and argv[0] == "quickstart":
            from trinity_jax import quickstart
            return quickstart.main(argv[1:])
        if argv and argv[0] == "ablate":
            from trinity_jax import ablate
            return ablate.main(argv[1:])
        rest, overrides = _split_overrides(argv)
        args = build_parser().parse_args(rest)
        if overrides and not getattr(args, "takes_overrides", False):
            key, val = next(iter(overrides.items()))
            raise ValueError(f"--config.{key}={val}: the {args.command} command takes no --config overrides "
                             "(only train, sft and plan do)")
        fn: Callable = args.fn
        return int(fn(args, overrides) or 0)
    except USER_ERRORS as e:
        if verbose:
            raise
        msg = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
