"""Scale planner: per-device memory, communication, FLOPs and a step-time lower bound.

``plan(cfg, mesh_sizes, n_devices, peak_flops, interconnect_bw)`` prices one training step of
an ExperimentConfig on a replica×fsdp×expert×tensor mesh without allocating anything:

- parameters / gradients / optimizer state: every variable of the real model
  (``jax.eval_shape`` of its init) sharded by the ONE rules table (``rules.param_specs``,
  with its divisibility fallback); fp32 master weights and fp32 gradients; Muon keeps one fp32
  momentum buffer, AdamW two (the optimizer's own per-parameter rule decides which);
- activations per microbatch under ``model.remat_policy`` (analytic count of what autodiff
  keeps per token and layer, plus one layer's recompute and a loss chunk as transients);
- all-to-all bytes per MoE layer (the fixed-buffer exchange of ``parallel.expert``; the
  ragged exchange for comparison), FSDP all-gathers / reduce-scatters and the replica
  all-reduce;
- FLOPs per step (``model.counting.train_flops_per_token`` × tokens, plus remat recompute and
  the padding rows of the fixed expert buffers), and the step-time lower bound
  max(FLOPs / peak, bytes / bandwidth) (perfect overlap) beside the no-overlap sum.

It is a model, not a measurement: ``tests/test_parallel_planner.py`` compares it with XLA's
``memory_analysis()`` of a depth-reduced config compiled on emulated CPU devices.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from trinity_jax.config import ConfigError, ExperimentConfig, MeshConfig
from trinity_jax.parallel.mesh import AXES, DATA_AXES, mesh_shape

__all__ = ["plan", "format_plan", "depth_reduced", "param_table", "activation_bytes",
           "GIB", "main"]

GIB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def depth_reduced(cfg: ExperimentConfig, dense_layers: int = 1, moe_layers: int = 1) -> ExperimentConfig:
    """The same config with fewer layers (for compiling a cross-check of the analytic numbers)."""
    m = cfg.model
    nd = min(dense_layers, m.num_dense_layers)
    nm = min(moe_layers, m.num_moe_layers)
    model = dataclasses.replace(m, num_hidden_layers=nd + nm, num_dense_layers=nd)
    return dataclasses.replace(cfg, model=model)


# ----------------------------------------------------------------------------- parameters

def param_table(cfg: ExperimentConfig, sizes: dict) -> list[dict]:
    """One row per variable: path, shape, mesh spec, global and per-device elements, optimizer."""
    import jax
    from trinity_jax.model.transformer import init_boxed
    from trinity_jax.parallel import rules
    import flax.linen as nn
    try:
        from trinity_jax.train.optimizer import _rule as opt_rule
    except ImportError:   # pragma: no cover - train/ not installed
        opt_rule = None

    boxed = jax.eval_shape(lambda r: init_boxed(cfg.model, r), jax.random.key(0))
    specs = rules.param_specs(boxed, sizes)
    shapes = nn.unbox(boxed)
    rows = []
    for (path, spec), sds in zip(jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0],
            jax.tree.leaves(shapes)):
        keys = [str(getattr(k, "key", k)) for k in path]
        collection, p = keys[0], "/".join(keys[1:])
        shape = tuple(sds.shape)
        factor = 1
        for entry in spec:
            for a in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
                factor *= sizes[a]
        n = math.prod(shape)
        if collection != "params":
            group = "balance"
        elif opt_rule is not None:
            group = opt_rule(p, shape, cfg.optim.router_on_muon).group
        else:
            group = "adam" if ("embed_tokens" in p or "lm_head" in p or len(shape) < 2
                               or p.endswith("scale")) else "muon"
        rows.append(dict(path=f"{collection}/{p}", shape=shape, spec=spec, n=n,
                         per_device=n // factor, shard_factor=factor, group=group,
                         expert="/experts/" in f"/{p}/"))
    return rows


# ----------------------------------------------------------------------------- activations

def _tokens_per_device(cfg: ExperimentConfig, sizes: dict) -> int:
    dp = math.prod(sizes[a] for a in DATA_AXES)
    micro = cfg.train.batch_size // cfg.train.microbatches
    return max(1, micro // dp) * cfg.train.seq_len


def _fill(cfg: ExperimentConfig, sizes: dict) -> float:
    """Rows the local experts compute per routed token-slot (fixed-size exchange buffers)."""
    ep = sizes["expert"]
    if ep == 1:
        return 1.0
    f = cfg.mesh.ep_buffer_factor
    return float(ep) if f <= 0 else float(min(f, ep))     # the buffers are capped at ep x (expert.py)


def activation_bytes(cfg: ExperimentConfig, sizes: dict) -> dict:
    """Per-device activation bytes of one microbatch: saved for backward + peak transient."""
    m = cfg.model
    bc = _DTYPE_BYTES[m.dtype]
    tp = sizes["tensor"]
    t = _tokens_per_device(cfg, sizes)
    s = cfg.train.seq_len
    d, dh = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * dh / tp, m.num_key_value_heads * dh / tp
    heads = m.num_attention_heads / tp
    k, e, im = m.num_experts_per_tok, max(m.num_experts, 1), m.moe_intermediate_size / tp
    sh = m.moe_intermediate_size * m.num_shared_experts / tp
    fill = _fill(cfg, sizes)
    # elements per token (x bytes) of every intermediate autodiff would keep ('none').
    # Attention has a custom VJP (model/attention.py): it keeps q, k, v, the output and an fp32
    # log-sum-exp per head; the fp32 scores, probabilities and their cotangents [heads, S] exist
    # for one layer at a time (counted at S = the sequence, an upper bound for local_blocks;
    # a fused kernel — attention_impl='dot_product_attention', cuDNN flash on GPU — never
    # materialises them)
    scores_transient = heads * (4 + bc) * (s if m.attention_impl != "dot_product_attention" else 1)
    attn_all = bc * (2 * d + 6 * q + 4 * kv + 2 * d) + heads * 4
    dense_all = bc * (2 * d + 3 * m.intermediate_size / tp + 2 * d)
    moe_all = (bc * (2 * d + k * fill * (4 * d + 3 * im) + 3 * sh + 2 * d)
               + 4 * (2 * e + k * d))                                              # fp32 router / combine
    nd, nm = m.num_dense_layers, m.num_moe_layers
    layer_in = bc * d                                                               # the scan carry
    policy = m.remat_policy
    # one layer's intermediates exist again in backward: as cotangents (every policy) and, when
    # rematerialised, as the recomputed forward values too
    layer_max = max(attn_all + dense_all if nd else 0.0, attn_all + moe_all if nm else 0.0)
    if policy == "none":
        saved = nd * (attn_all + dense_all) + nm * (attn_all + moe_all)
        transient = layer_max
    else:
        if policy == "full":
            keep_attn = keep_dense = keep_moe = 0.0
        elif policy == "save_dots":          # matmul outputs without batch dims
            keep_attn = bc * (2 * q + 2 * kv + d)
            keep_dense = bc * (2 * m.intermediate_size / tp + d)
            keep_moe = 4 * e + bc * (2 * sh + d)
        else:                                # save_dots_except_moe: the named tensors
            keep_attn = bc * (q + d)                         # attn_out, layer_attn
            keep_dense = bc * (m.intermediate_size / tp + d)  # mlp_hidden, layer_mlp
            keep_moe = bc * (sh + d)                          # shared_hidden, layer_mlp
        saved = (nd * (layer_in + keep_attn + keep_dense)
                 + nm * (layer_in + keep_attn + keep_moe))
        transient = 2 * layer_max
    transient += scores_transient          # one layer's attention scores, in its backward only
    layer_max += scores_transient
    chunk = min(cfg.train.loss_chunk_size, t)
    loss_chunk = chunk * m.vocab_size / tp * 4 * 2                                  # logits + grad, fp32
    return dict(tokens=t, saved=saved * t, transient=transient * t + loss_chunk,
                total=saved * t + transient * t + loss_chunk, layer_max=layer_max * t)


# ----------------------------------------------------------------------------- the plan

def _resolve_sizes(mesh_sizes: Any, n_devices: Optional[int]) -> dict:
    if isinstance(mesh_sizes, MeshConfig):
        mc = mesh_sizes
    else:
        unknown = set(mesh_sizes) - set(AXES)
        if unknown:
            raise ConfigError(f"--mesh: unknown axis {sorted(unknown)[0]!r}; axes are {list(AXES)}")
        mc = MeshConfig(**{a: int(mesh_sizes.get(a, 1)) for a in AXES})
    if n_devices is None:
        if any(getattr(mc, a) == -1 for a in AXES):
            raise ConfigError("--devices is needed when a mesh axis is -1 (inferred)")
        n_devices = math.prod(getattr(mc, a) for a in AXES)
    return mesh_shape(mc, n_devices)


def plan(cfg: ExperimentConfig, mesh_sizes: Any, n_devices: Optional[int] = None,
         peak_flops: float = 989e12, interconnect_bw: float = 400e9,
         intra_node_bw: Optional[float] = None, devices_per_node: int = 8) -> dict:
    """Per-device numbers (bytes, FLOPs, seconds) of one training step; see the module doc.

    ``interconnect_bw``: bytes/s per device between nodes (FSDP / replica collectives).
    ``intra_node_bw`` (default: the same): bytes/s per device inside a node, used for the
    expert all-to-all when expert×tensor devices fit in one node (the mesh keeps the inner
    axes inside a host).
    """
    from trinity_jax.model.counting import count_params, train_flops_per_token
    from trinity_jax.parallel.mesh import validate_mesh_for

    sizes = _resolve_sizes(mesh_sizes, n_devices)
    n_dev = math.prod(sizes.values())
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **sizes))
    validate_mesh_for(cfg, n_dev)
    m, tr = cfg.model, cfg.train
    bc = _DTYPE_BYTES[m.dtype]
    rows = param_table(cfg, sizes)
    params = [r for r in rows if not r["path"].startswith("balance/")]
    p_dev = sum(r["per_device"] for r in params)
    muon_dev = sum(r["per_device"] for r in params if r["group"] == "muon")
    adam_dev = sum(r["per_device"] for r in params if r["group"] == "adam")
    bal_dev = sum(r["per_device"] for r in rows if r["path"].startswith("balance/"))
    out: dict[str, Any] = dict(mesh=sizes, devices=n_dev)
    out["params_bytes"] = 4 * p_dev
    out["grads_bytes"] = 4 * p_dev
    out["opt_bytes"] = 4 * (muon_dev + 2 * adam_dev)
    out["balance_bytes"] = 4 * 2 * bal_dev                                  # expert_bias + SMEBU momentum
    out["grad_accum_bytes"] = 4 * p_dev if tr.microbatches > 1 else 0
    act = activation_bytes(cfg, sizes)
    out["act_tokens"] = act["tokens"]
    out["act_saved_bytes"] = act["saved"]
    out["act_transient_bytes"] = act["transient"]
    out["act_bytes"] = act["total"]
    out["state_bytes"] = out["params_bytes"] + out["opt_bytes"] + out["balance_bytes"]
    out["total_bytes"] = (out["state_bytes"] + out["grads_bytes"] + out["grad_accum_bytes"]
                          + out["act_bytes"])

    # --- communication (bytes leaving/entering one device per step)
    ep, r_sz = sizes["expert"], sizes["replica"]
    t = act["tokens"]
    k, d = m.num_experts_per_tok, m.hidden_size
    fill = _fill(cfg, sizes)
    passes = 3 if m.remat_policy != "none" else 2                            # fwd, bwd (+ recompute)
    a2a_fwd = 2 * (ep - 1) / ep * t * k * fill * d * bc if ep > 1 else 0.0  # dispatch + return
    a2a_ragged = 2 * (ep - 1) / ep * t * k * d * bc if ep > 1 else 0.0
    out["a2a_bytes_per_moe_layer"] = a2a_fwd
    out["a2a_ragged_bytes_per_moe_layer"] = a2a_ragged
    out["a2a_bytes_step"] = a2a_fwd * passes * m.num_moe_layers * tr.microbatches
    gather = 0.0
    for r in params:                      # FSDP: gather the weights for fwd and bwd, scatter grads
        g = 1
        for entry in r["spec"]:
            for a in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
                if a == "fsdp" or (a == "expert" and not r["expert"]):
                    g *= sizes[a]
        if g > 1:
            gather += (g - 1) * r["per_device"]
    # per microbatch: weights all-gathered for forward and backward (cast to the compute dtype
    # before the gather), fp32 gradients reduce-scattered
    out["fsdp_bytes_step"] = gather * (2 * bc + 4) * tr.microbatches
    out["replica_bytes_step"] = 2 * (r_sz - 1) / r_sz * 4 * p_dev if r_sz > 1 else 0.0
    out["comm_bytes_step"] = out["a2a_bytes_step"] + out["fsdp_bytes_step"] + out["replica_bytes_step"]

    # --- FLOPs
    c = count_params(m)
    tokens_step = tr.batch_size * tr.seq_len
    model_flops = train_flops_per_token(m, tr.seq_len) * tokens_step / n_dev
    expert_fwd = 2 * 3 * d * m.moe_intermediate_size * k * m.num_moe_layers * tokens_step / n_dev
    extra = expert_fwd * 3 * (fill - 1)                                      # padding rows of the buffers
    if m.remat_policy == "full":
        extra += model_flops / 3
    elif m.remat_policy in ("save_dots", "save_dots_except_moe"):
        extra += expert_fwd * fill                                           # the MoE is recomputed
    out["counts"] = c
    out["model_flops_step"] = model_flops
    out["hw_flops_step"] = model_flops + extra
    out["compute_s"] = out["hw_flops_step"] / peak_flops
    a2a_bw = interconnect_bw
    if intra_node_bw and sizes["expert"] * sizes["tensor"] <= devices_per_node:
        a2a_bw = intra_node_bw
    out["comm_s"] = ((out["fsdp_bytes_step"] + out["replica_bytes_step"]) / interconnect_bw
                     + out["a2a_bytes_step"] / a2a_bw)
    out["step_lower_bound_s"] = max(out["compute_s"], out["comm_s"])
    out["step_serial_s"] = out["compute_s"] + out["comm_s"]
    out["tokens_per_s_bound"] = tokens_step / out["step_lower_bound_s"]
    out["peak_flops"], out["interconnect_bw"], out["a2a_bw"] = peak_flops, interconnect_bw, a2a_bw
    return out


def _b(x: float) -> str:
    return f"{x / GIB:,.2f} GiB" if x >= GIB / 100 else f"{x / 1024 ** 2:,.2f} MiB"


def _f(x: float) -> str:
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= div:
            return f"{x / div:,.2f} {unit}"
    return f"{x:,.0f} "


def format_plan(cfg: ExperimentConfig, mesh_sizes: Any, n_devices: Optional[int] = None,
                peak_flops: float = 989e12, interconnect_bw: float = 400e9,
                intra_node_bw: Optional[float] = None, devices_per_node: int = 8) -> str:
    """``plan`` as a printable table (what ``python -m trinity_jax plan --mesh ...`` shows)."""
    p = plan(cfg, mesh_sizes, n_devices, peak_flops, interconnect_bw, intra_node_bw,
             devices_per_node)
    m, tr, s = cfg.model, cfg.train, p["mesh"]
    c = p["counts"]
    mesh_txt = "×".join(str(s[a]) for a in AXES)
    rows = [
        ("mesh replica×fsdp×expert×tensor", f"{mesh_txt} = {p['devices']} devices"),
        ("parameters total / active", f"{c['total'] / 1e9:,.2f}B / {c['active'] / 1e9:,.2f}B"),
        ("batch × seq (microbatches)", f"{tr.batch_size} × {tr.seq_len} ({tr.microbatches}); "
                                        f"{p['act_tokens']} tokens/device/microbatch"),
        ("— memory per device —", ""),
        ("parameters (fp32 master)", _b(p["params_bytes"])),
        ("gradients (fp32)", _b(p["grads_bytes"])),
        ("optimizer (Muon 1×fp32, AdamW 2×fp32)", _b(p["opt_bytes"])),
        ("router bias + SMEBU momentum", _b(p["balance_bytes"])),
        ("gradient accumulator", _b(p["grad_accum_bytes"])),
        (f"activations saved ({m.remat_policy})", _b(p["act_saved_bytes"])),
        ("activations transient (1 layer + loss chunk)", _b(p["act_transient_bytes"])),
        ("total", _b(p["total_bytes"])),
        ("— communication per device —", ""),
        ("all-to-all per MoE layer, fwd (fixed buffers)", _b(p["a2a_bytes_per_moe_layer"])),
        ("all-to-all per MoE layer, fwd (ragged)", _b(p["a2a_ragged_bytes_per_moe_layer"])),
        ("all-to-all per step", _b(p["a2a_bytes_step"])),
        ("FSDP gathers + reduce-scatters per step", _b(p["fsdp_bytes_step"])),
        ("replica all-reduce per step", _b(p["replica_bytes_step"])),
        ("— time per step —", ""),
        ("model FLOPs / device", _f(p["model_flops_step"]) + "FLOP"),
        ("executed FLOPs / device (remat, buffer padding)", _f(p["hw_flops_step"]) + "FLOP"),
        (f"compute at {_f(peak_flops)}FLOP/s", f"{p['compute_s']:.3f} s"),
        (f"communication ({_f(interconnect_bw)}B/s, all-to-all {_f(p['a2a_bw'])}B/s)",
         f"{p['comm_s']:.3f} s"),
        ("step lower bound (perfect overlap)", f"{p['step_lower_bound_s']:.3f} s "
                                                f"({p['tokens_per_s_bound']:,.0f} tokens/s)"),
        ("step without overlap", f"{p['step_serial_s']:.3f} s"),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(w)}  {b}" if b else a for a, b in rows)


def main(argv=None) -> int:
    """``python -m trinity_jax.parallel.planner --config FILE --mesh a=n,... [--devices N]``."""
    import argparse
    from trinity_jax.config import from_config_dict, load_config_file
    ap = argparse.ArgumentParser(prog="trinity plan")
    ap.add_argument("--config", required=True)
    ap.add_argument("--mesh", required=True, help="e.g. replica=16,fsdp=16,expert=8")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--peak-flops", type=float, default=989e12)
    ap.add_argument("--bandwidth", type=float, default=400e9, help="bytes/s per device between nodes")
    ap.add_argument("--intra-node-bandwidth", type=float, default=None,
                    help="bytes/s per device inside a node (expert all-to-all)")
    ap.add_argument("--config-override", action="append", default=[],
                    help="a.b=value, like the CLI's --config.a.b=value")
    a = ap.parse_args(argv)
    mesh = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in a.mesh.split(","))
    overrides = dict(o.split("=", 1) for o in a.config_override)
    cfg = from_config_dict(load_config_file(a.config, overrides))
    print(format_plan(cfg, mesh, a.devices, a.peak_flops, a.bandwidth, a.intra_node_bandwidth))
    return 0


if __name__ == "__main__":   # pragma: no cover
    raise SystemExit(main())
