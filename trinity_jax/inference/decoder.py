"""A functional AFMoE decoder over the model's own param tree, with a KV cache and probe hooks.

`forward` computes exactly what `Transformer.apply` computes (SPEC §1; tested equal in fp32),
but layer by layer (the stacked `[L, ...]` params are sliced per layer), so that it can

- read and extend a `KVCache` (prefill a chunk of tokens, or decode one token per row);
- collect intermediates for probing (residual stream, attention gates, router choices);
- apply interventions (`Hooks`): shift the selection bias (ban / force experts), scale the
  attention output gate, overwrite the residual stream at given positions.

Every piece of math is the model's: `rms_norm`, `rope_tables`/`apply_rope`,
`attention_mask`/`dot_product_attention`, `route` and the registered MoE implementations.
Without a cache the MoE uses `model.moe_impl` and `model.capacity_factor` as the model does;
with a cache it is always dropless and picks by the chunk's token-slots N = T·k against E
experts (`moe_path`): N < E/4 gathers each token's k experts (`moe_token_gather`), E/4 <= N <=
2E runs every expert as two plain matmuls over a pre-transposed layout (`moe_dense_matmul`,
`prepare_decode`; on XLA:CPU ~5x faster than the per-expert einsums for decode batches),
larger chunks use `model.moe_impl`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from trinity_jax.config import ModelConfig
from trinity_jax.inference.kv_cache import KVCache, ring_positions
from trinity_jax.model.attention import apply_rope, attention_mask, dot_product_attention, rope_tables
from trinity_jax.model.moe import ExpertWeights, get_moe_impl, route
from trinity_jax.model.norms import rms_norm
from trinity_jax.model.transformer import mup_embedding_scale

__all__ = ["Hooks", "forward", "layer_params", "moe_token_gather", "moe_dense_matmul", "moe_path",
           "prepare_decode", "head_logits"]


class Hooks(NamedTuple):
    """Interventions in array form (see `probe.Interventions` for the user-facing interface).

    bias_delta: [L_moe, E] f32 added to expert_bias for expert *selection* only (±1e6 bans/forces).
    gate_scale: [L] f32 multiplying sigmoid(gate) of each layer (0 silences a layer's attention).
    patches: {residual index i: (mask [S] bool, values [B, S, d])}; residual i enters layer i
      (i = num_hidden_layers: the input of the final norm); masked positions are overwritten.
    """

    bias_delta: Any = None
    gate_scale: Any = None
    patches: Any = None


def layer_params(variables: dict, cfg: ModelConfig, i: int) -> tuple[dict, jax.Array | None]:
    """Params of layer i (sliced from its scanned stack) and its expert_bias ([E], None if dense).

    Variables from `prepare_decode` hold the layers already split (and a MoE layer's `mlp` may
    carry the `decode` layout of its experts).
    """
    if "layers" in variables:
        return variables["layers"][i]
    nd = cfg.num_dense_layers
    if i < nd:
        return jax.tree_util.tree_map(lambda a: a[i], variables["params"]["dense_layers"]), None
    j = i - nd
    lp = jax.tree_util.tree_map(lambda a: a[j], variables["params"]["moe_layers"])
    return lp, variables["balance"]["moe_layers"]["mlp"]["expert_bias"][j]


def prepare_decode(variables: dict, cfg: ModelConfig, batch: int) -> dict:
    """Variables split per layer once, so that a decode loop does not slice the `[L, ...]` stacks
    at every step; MoE layers also get the `moe_dense_matmul` layout when decoding `batch` rows
    takes that path (a copy of the routed experts). Accepted by `forward` like the originals."""
    params = variables["params"]
    layers = []
    for i in range(cfg.num_hidden_layers):
        lp, bias = layer_params(variables, cfg, i)
        if bias is not None and moe_path(cfg, batch, True) == "dense_matmul":
            ex = lp["mlp"]["experts"]
            lp["mlp"] = dict(lp["mlp"], decode=_dense_layout(ex["gate_proj"], ex["up_proj"], ex["down_proj"]))
        layers.append((lp, bias))
    return {"params": {k: params[k] for k in ("embed_tokens", "norm", "lm_head")}, "layers": tuple(layers)}


def moe_path(cfg: ModelConfig, tokens: int, cached: bool) -> str:
    """Which routed-expert computation a chunk of `tokens` tokens uses (see the module docstring)."""
    if not cached:
        return "impl"
    slots, e = tokens * cfg.num_experts_per_tok, cfg.num_experts
    if 4 * slots < e:
        return "gather"
    return "dense_matmul" if slots <= 2 * e else "impl"


def _dense_layout(gate, up, down) -> dict:
    """gate/up [..., E, d, Im], down [..., E, Im, d] -> experts_in [..., d, 2·E·Im], experts_out [..., E·Im, d]."""
    *lead, e, d, im = gate.shape

    def to_in(w):
        return jnp.swapaxes(w, -3, -2).reshape(*lead, d, e * im)

    return {"experts_in": jnp.concatenate([to_in(gate), to_in(up)], -1), "experts_out": down.reshape(*lead, e * im, d)}


def _dot(x, kernel, dtype):
    """The model's `Linear`: x @ kernel in the compute dtype."""
    return jnp.dot(x.astype(dtype), kernel.astype(dtype))


def _swiglu(p: dict, x, dtype):
    """down(silu(gate(x)) * up(x)) (SPEC §1.5), as `model.mlp.SwiGLU`."""
    h = jax.nn.silu(_dot(x, p["gate_proj"]["kernel"], dtype)) * _dot(x, p["up_proj"]["kernel"], dtype)
    return _dot(h, p["down_proj"]["kernel"], dtype)


def moe_token_gather(x, w: ExpertWeights, weights, experts, *, num_experts=None, capacity_factor=0.0):
    """Dropless routed output by gathering each token's k experts' weights (decode fast path).

    x [T, d], weights/experts [T, k] -> (y [T, d] f32, 0.0). Cost ∝ T·k experts, not E.
    """
    dt = x.dtype
    g, u, dn = w.gate[experts].astype(dt), w.up[experts].astype(dt), w.down[experts].astype(dt)
    h = jax.nn.silu(jnp.einsum("td,tkdi->tki", x, g)) * jnp.einsum("td,tkdi->tki", x, u)
    y = jnp.einsum("tki,tkid->tkd", h, dn).astype(jnp.float32)
    return jnp.sum(y * weights[..., None].astype(jnp.float32), axis=1), jnp.float32(0.0)


def moe_dense_matmul(x, experts_in, experts_out, weights, experts, *, num_experts: int):
    """Every expert on every token as two plain matmuls (no per-expert batching or transposes).

    x [T, d]; experts_in [d, 2·E·Im] (all gate columns, then all up columns); experts_out
    [E·Im, d]; weights/experts [T, k] -> y [T, d] f32. The gate weights scale each expert's
    hidden units before the shared down-projection: Σ_e g_e · down_e(h_e) = down(g ⊙ h).
    """
    t, e = x.shape[0], num_experts
    dt = x.dtype
    gates = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], experts].add(weights)
    gu = jnp.dot(x, experts_in.astype(dt))                                   # [T, 2·E·Im]
    half = gu.shape[-1] // 2
    h = jax.nn.silu(gu[:, :half]) * gu[:, half:]                             # [T, E·Im]
    h = (h.reshape(t, e, -1).astype(jnp.float32) * gates[..., None]).reshape(t, half)
    return jnp.dot(h.astype(dt), experts_out.astype(dt), preferred_element_type=jnp.float32)


def _cached_keys(kv_k, kv_v, k, v, length, valid, is_global: bool):
    """Keys/values/positions a chunk attends to, and the cache after writing the chunk.

    k, v: [B, T, hkv, dh] of the chunk at positions length .. length+T-1, of which the first
    `valid` are real (the rest is padding: written to a global buffer, where later tokens
    overwrite it before any query can see it, but never to a ring).
    Global: write into the full buffer, attend over it. Local: attend over ring ∪ chunk, then
    write the chunk's last min(valid, ring) real positions into slots p % ring.
    """
    if is_global:
        kv_k = jax.lax.dynamic_update_slice(kv_k, k.astype(kv_k.dtype), (0, length, 0, 0))
        kv_v = jax.lax.dynamic_update_slice(kv_v, v.astype(kv_v.dtype), (0, length, 0, 0))
        key_pos = jnp.arange(kv_k.shape[1], dtype=jnp.int32)
        return kv_k, kv_v, key_pos, kv_k, kv_v
    t, size = k.shape[1], kv_k.shape[1]
    chunk_pos = length + jnp.arange(t, dtype=jnp.int32)
    key_pos = jnp.concatenate([ring_positions(length, size), chunk_pos])
    keys = jnp.concatenate([kv_k, k.astype(kv_k.dtype)], axis=1)
    values = jnp.concatenate([kv_v, v.astype(kv_v.dtype)], axis=1)
    end = length + valid
    write = (chunk_pos < end) & (chunk_pos >= end - size)       # distinct slots: no duplicate writes
    slots = jnp.where(write, jnp.mod(chunk_pos, size), size)    # `size` is out of bounds: dropped
    kv_k = kv_k.at[:, slots].set(k.astype(kv_k.dtype), mode="drop")
    kv_v = kv_v.at[:, slots].set(v.astype(kv_v.dtype), mode="drop")
    return keys, values, key_pos, kv_k, kv_v


def _attention(p, x, cfg: ModelConfig, is_global: bool, positions, rope, kv, length, valid, gate_scale):
    """Gated GQA attention (SPEC §1.4) of x [B, T, d]; returns (out [B,T,d], (k, v) cache, sigmoid gate)."""
    dtype = jnp.dtype(cfg.dtype)
    b, t, _ = x.shape
    hq, hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = _dot(x, p["q_proj"]["kernel"], dtype).reshape(b, t, hq, dh)
    k = _dot(x, p["k_proj"]["kernel"], dtype).reshape(b, t, hkv, dh)
    v = _dot(x, p["v_proj"]["kernel"], dtype).reshape(b, t, hkv, dh)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"]["scale"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["scale"], cfg.rms_norm_eps)
    if not (is_global and cfg.nope_global):            # RoPE on local layers only (NoPE on global)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    window = None if is_global else cfg.sliding_window
    if kv is None:
        seg = jnp.ones((b, t), jnp.int32)
        mask = attention_mask(positions, positions, seg, seg, window)
        keys, values, new_kv = k, v, None
    else:
        keys, values, key_pos, kk, vv = _cached_keys(kv[0], kv[1], k, v, length, valid, is_global)
        q_pos = positions[0]                                                  # rows share positions
        mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] >= 0)
        if window is not None:
            mask &= key_pos[None, :] > q_pos[:, None] - window
        mask = jnp.broadcast_to(mask, (b, t, key_pos.shape[0]))
        new_kv = (kk, vv)
    out = dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask).reshape(b, t, hq * dh)
    gate = None
    if cfg.attention_gate:
        gate = jax.nn.sigmoid(_dot(x, p["gate_proj"]["kernel"], dtype).astype(jnp.float32))
        if gate_scale is not None:
            gate = gate * gate_scale
        out = out * gate.astype(out.dtype)
    return _dot(out, p["o_proj"]["kernel"], dtype), new_kv, gate


def _moe(p, bias, x, cfg: ModelConfig, bias_delta, cached: bool):
    """MoE block (SPEC §1.6) of x [B, T, d]; returns (y, (scores, experts, weights))."""
    dtype = jnp.dtype(cfg.dtype)
    b, t, d = x.shape
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    flat = x.reshape(b * t, d)
    logits = _dot(flat, p["router"]["kernel"], jnp.float32)                  # [T, E] fp32
    sel_bias = bias if bias_delta is None else bias + bias_delta
    weights, experts, scores = route(logits, sel_bias, k, cfg.route_scale)
    ew = ExpertWeights(p["experts"]["gate_proj"], p["experts"]["up_proj"], p["experts"]["down_proj"])
    path = moe_path(cfg, b * t, cached)
    if path == "dense_matmul":
        layout = p["decode"] if "decode" in p else _dense_layout(*ew)
        routed = moe_dense_matmul(flat.astype(dtype), layout["experts_in"], layout["experts_out"], weights, experts,
                                  num_experts=e)
    else:
        impl = moe_token_gather if path == "gather" else get_moe_impl(cfg.moe_impl)
        cf = cfg.capacity_factor if not cached else 0.0
        routed, _ = impl(flat.astype(dtype), ew, weights, experts, num_experts=e, capacity_factor=cf)
    y = routed.astype(dtype).reshape(b, t, d)
    if cfg.num_shared_experts > 0:
        y = y + _swiglu(p["shared_experts"], x, dtype)
    return y, (scores.reshape(b, t, e), experts.reshape(b, t, k), weights.reshape(b, t, k))


def head_logits(params: dict, cfg: ModelConfig, x):
    """Final RMSNorm + untied lm_head: residual [..., d] -> logits [..., V] f32 (SPEC §1.7)."""
    dtype = jnp.dtype(cfg.dtype)
    h = rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps)
    return jnp.dot(h.astype(dtype), params["lm_head"]["kernel"].astype(dtype), preferred_element_type=jnp.float32)


def forward(variables: dict, cfg: ModelConfig, tokens, *, cache: KVCache | None = None,
            hooks: Hooks | None = None, collect: bool = False, last_only: bool = False,
            valid_len=None):
    """tokens [B, T] -> (logits [B, T|1, V] f32, new cache | None, intermediates | None).

    With `cache`, the tokens sit at positions cache.length .. cache.length+T-1 and the returned
    cache holds them too; without, positions are 0..T-1 (a full forward, as `Transformer.apply`).
    `last_only` applies the head to the last position only. With a cache, `valid_len` (traced
    int, default T) marks the chunk's first valid_len tokens as real and the rest as padding
    (so that prompts of different lengths share one compiled prefill): the cache advances by
    valid_len and `last_only` takes position valid_len - 1. `collect` returns a dict of
    per-layer lists: residual [L+1] (entering each layer; the last enters the final norm),
    resid_mid [L] (after attention), attn_gate [L] (sigmoid gate, [B,T,hq*dh]),
    router_scores / router_experts / router_weights [L_moe].
    """
    params = variables["params"]
    dtype = jnp.dtype(cfg.dtype)
    hooks = hooks or Hooks()
    b, t = tokens.shape
    length = cache.length if cache is not None else jnp.int32(0)
    valid = jnp.int32(t) if valid_len is None else jnp.asarray(valid_len, jnp.int32)
    positions = jnp.broadcast_to(length + jnp.arange(t, dtype=jnp.int32), (b, t))
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)      # once, shared by every layer
    x = jnp.take(params["embed_tokens"]["embedding"].astype(dtype), tokens, axis=0)   # [B, T, d]
    if cfg.mup_enabled:
        x = mup_embedding_scale(x, cfg.hidden_size)
    inter: dict[str, list] = {n: [] for n in ("residual", "resid_mid", "attn_gate", "router_scores",
                                               "router_experts", "router_weights")}
    patches = hooks.patches or {}

    def patch(i, x):
        if i in patches:
            mask, values = patches[i]
            x = jnp.where(mask[None, :, None], values.astype(x.dtype), x)
        if collect:
            inter["residual"].append(x)
        return x

    new_k, new_v = [], []
    for i in range(cfg.num_hidden_layers):
        x = patch(i, x)
        lp, bias = layer_params(variables, cfg, i)
        is_global = cfg.is_global_layer(i)
        kv = (cache.k[i], cache.v[i]) if cache is not None else None
        gscale = None if hooks.gate_scale is None else hooks.gate_scale[i]
        h = rms_norm(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
        h, kv, gate = _attention(lp["self_attn"], h, cfg, is_global, positions, rope, kv, length, valid,
                                 gscale)
        if cache is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
        if cfg.sandwich_norm:
            h = rms_norm(h, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
        x = x + h
        h = rms_norm(x, lp["pre_mlp_layernorm"]["scale"], cfg.rms_norm_eps)
        if bias is None:
            h = _swiglu(lp["mlp"], h, dtype)
        else:
            j = i - cfg.num_dense_layers
            delta = None if hooks.bias_delta is None else hooks.bias_delta[j]
            h, router = _moe(lp["mlp"], bias, h, cfg, delta, cache is not None)
            if collect:
                for name, val in zip(("router_scores", "router_experts", "router_weights"), router):
                    inter[name].append(val)
        if collect:
            inter["resid_mid"].append(x)
            inter["attn_gate"].append(gate)
        if cfg.sandwich_norm:
            h = rms_norm(h, lp["post_mlp_layernorm"]["scale"], cfg.rms_norm_eps)
        x = x + h
    x = patch(cfg.num_hidden_layers, x)
    if last_only:
        x = jax.lax.dynamic_slice_in_dim(x, valid - 1, 1, axis=1)
    logits = head_logits(params, cfg, x)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(tuple(new_k), tuple(new_v), length + valid)
    return logits, new_cache, (inter if collect else None)
