"""Mixture-of-Experts block (SPEC §1.6): sigmoid router, biased top-k selection, dropless dispatch.

The routed computation has several implementations behind one interface, chosen by
`model.moe_impl` (a registry, see `register_moe_impl`):

- `dense_reference`: every expert on every token, combined with the gate weights (the oracle);
- `ragged_dot`: sort token-slots by expert, `jax.lax.ragged_dot`, un-permute (GPU/TPU path);
- `block_sparse`: sort token-slots by expert, pad each group to a multiple of a row block and
  run one batched matmul over fixed-size blocks (fastest on XLA:CPU);
- `pallas`: routing kernel + Pallas grouped matmul (registered by `moe_pallas.py`).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from trinity_jax.config import ModelConfig
from trinity_jax.model.initializers import truncated_normal_3sigma
from trinity_jax.model.mlp import Linear, SwiGLU
from trinity_jax.parallel.expert import moe_dispatch


class ExpertWeights(NamedTuple):
    gate: jax.Array   # [E, d, Im]
    up: jax.Array     # [E, d, Im]
    down: jax.Array   # [E, Im, d]


def route(logits: jax.Array, expert_bias: jax.Array, k: int, route_scale: float):
    """SPEC §1.6 routing. logits [T, E] fp32, expert_bias [E] -> (weights [T,k], experts [T,k], scores [T,E]).

    Selection uses sigmoid(logits) + bias; the weights use the unbiased scores of the selected
    experts, normalised to sum to one, times route_scale. Ties go to the lowest expert index.
    """
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(scores) + expert_bias.astype(jnp.float32), k)
    selected = jnp.take_along_axis(scores, experts, axis=-1)
    weights = selected / (jnp.sum(selected, axis=-1, keepdims=True) + 1e-20) * route_scale
    return weights, experts.astype(jnp.int32), scores


# ----------------------------------------------------------------------------- slot bookkeeping

class SlotOrder(NamedTuple):
    """Token-slots (slot = t * k + j) grouped by expert with a stable sort."""

    order: jax.Array        # [N] slot index at each sorted position
    inverse: jax.Array      # [N] sorted position of each slot
    group_sizes: jax.Array  # [E] int32
    offsets: jax.Array      # [E] int32, exclusive prefix sum
    rank: jax.Array         # [N] position of each slot inside its expert's group (slot order)


def sort_slots(experts: jax.Array, num_experts: int) -> SlotOrder:
    flat = experts.reshape(-1)
    n = flat.shape[0]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    offsets = jnp.cumsum(group_sizes) - group_sizes
    rank = inverse - offsets[flat]
    return SlotOrder(order, inverse, group_sizes, offsets, rank)


def capacity_keep(experts: jax.Array, num_experts: int, capacity_factor: float) -> tuple[jax.Array, jax.Array]:
    """Deterministic dropping: slot kept iff its rank (token order) inside its expert < capacity.

    capacity = ceil(capacity_factor * T * k / E). Returns (keep [T, k] bool, dropped fraction).
    """
    t, k = experts.shape
    capacity = max(1, math.ceil(capacity_factor * t * k / num_experts))
    keep = (sort_slots(experts, num_experts).rank < capacity).reshape(t, k)
    return keep, 1.0 - jnp.mean(keep.astype(jnp.float32))


def _swiglu_experts(h_gate: jax.Array, h_up: jax.Array) -> jax.Array:
    return jax.nn.silu(h_gate) * h_up


def _combine(y_slots: jax.Array, weights: jax.Array) -> jax.Array:
    """y_slots [T*k, d] in slot order, weights [T, k] -> [T, d] (weighted sum in fp32)."""
    t, k = weights.shape
    y = y_slots.reshape(t, k, -1).astype(jnp.float32) * weights[..., None].astype(jnp.float32)
    return jnp.sum(y, axis=1)


# ----------------------------------------------------------------------------- registry

MoEImpl = Callable[..., tuple[jax.Array, jax.Array]]
_MOE_IMPLS: dict[str, MoEImpl] = {}


def register_moe_impl(name: str):
    """Register `fn(x [T,d], w: ExpertWeights, weights [T,k], experts [T,k], *, num_experts,
    capacity_factor) -> (y [T,d], dropped_fraction)` under `name`."""

    def deco(fn: MoEImpl) -> MoEImpl:
        _MOE_IMPLS[name] = fn
        return fn

    return deco


def get_moe_impl(name: str) -> MoEImpl:
    if name == "auto":
        name = default_moe_impl()
    if name not in _MOE_IMPLS:
        raise ValueError(f"model.moe_impl={name!r} is not available; registered: {sorted(_MOE_IMPLS)}")
    return _MOE_IMPLS[name]


def available_moe_impls() -> list[str]:
    return sorted(_MOE_IMPLS)


def default_moe_impl() -> str:
    """Fastest measured path for the backend: block_sparse on CPU, pallas (if present) elsewhere."""
    if jax.default_backend() == "cpu":
        return "block_sparse"
    return "pallas" if "pallas" in _MOE_IMPLS else "ragged_dot"


def _maybe_drop(weights, experts, num_experts, capacity_factor):
    if capacity_factor and capacity_factor > 0:
        keep, dropped = capacity_keep(experts, num_experts, capacity_factor)
        return jnp.where(keep, weights, 0.0), dropped
    return weights, jnp.float32(0.0)


@register_moe_impl("dense_reference")
def moe_dense_reference(x, w: ExpertWeights, weights, experts, *, num_experts, capacity_factor=0.0):
    """Every expert on every token; the oracle the other implementations are tested against."""
    weights, dropped = _maybe_drop(weights, experts, num_experts, capacity_factor)
    h = _swiglu_experts(jnp.einsum("td,edi->tei", x, w.gate.astype(x.dtype)),
                        jnp.einsum("td,edi->tei", x, w.up.astype(x.dtype)))
    y_all = jnp.einsum("tei,eid->ted", h, w.down.astype(x.dtype))          # [T, E, d]
    t = x.shape[0]
    gates = jnp.zeros((t, num_experts), jnp.float32).at[jnp.arange(t)[:, None], experts].add(weights)
    return jnp.einsum("ted,te->td", y_all.astype(jnp.float32), gates), dropped


@register_moe_impl("ragged_dot")
def moe_ragged_dot(x, w: ExpertWeights, weights, experts, *, num_experts, capacity_factor=0.0):
    """Dropless sort -> jax.lax.ragged_dot grouped matmuls -> un-permute -> combine."""
    weights, dropped = _maybe_drop(weights, experts, num_experts, capacity_factor)
    k = experts.shape[1]
    slots = sort_slots(experts, num_experts)
    xs = x[slots.order // k]                                                # [N, d] sorted by expert
    dt = x.dtype
    h = _swiglu_experts(jax.lax.ragged_dot(xs, w.gate.astype(dt), slots.group_sizes),
                        jax.lax.ragged_dot(xs, w.up.astype(dt), slots.group_sizes))
    ys = jax.lax.ragged_dot(h, w.down.astype(dt), slots.group_sizes)        # [N, d]
    return _combine(ys[slots.inverse], weights), dropped


def block_rows_for(num_slots: int, num_experts: int) -> int:
    """Row-block size for block_sparse: about half the mean group size, a power of two in [8, 256]."""
    target = max(1, num_slots // (2 * num_experts))
    return int(min(256, max(8, 2 ** int(math.floor(math.log2(target))))))


@register_moe_impl("block_sparse")
def moe_block_sparse(x, w: ExpertWeights, weights, experts, *, num_experts, capacity_factor=0.0,
                     block_rows: int | None = None):
    """Dropless grouped matmul as a batched matmul over fixed-size row blocks.

    Token-slots are sorted by expert and each expert's group is padded to a multiple of
    `block_rows`; there are at most N/b + E blocks (a static bound), each owned by one expert.
    Block i multiplies its rows by the weights of its expert (gathered per block).
    """
    weights, dropped = _maybe_drop(weights, experts, num_experts, capacity_factor)
    t, k = experts.shape
    n, d = t * k, x.shape[1]
    b = block_rows or block_rows_for(n, num_experts)
    num_blocks = -(-n // b) + num_experts
    rows = num_blocks * b
    slots = sort_slots(experts, num_experts)
    padded_sizes = -(-slots.group_sizes // b) * b
    padded_offsets = jnp.cumsum(padded_sizes) - padded_sizes
    flat = experts.reshape(-1)
    dest = padded_offsets[flat] + slots.rank                                # [N] padded row of each slot
    src_slot = jnp.full((rows,), n, jnp.int32).at[dest].set(jnp.arange(n, dtype=jnp.int32))
    x_ext = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)
    token = jnp.where(src_slot < n, src_slot // k, t)
    xb = x_ext[token].reshape(num_blocks, b, d)                             # [nb, b, d]
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * b
    block_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(padded_sizes), block_start, side="right"),
                            0, num_experts - 1)
    dt = x.dtype
    wg, wu, wd = (w.gate.astype(dt)[block_expert], w.up.astype(dt)[block_expert],
                  w.down.astype(dt)[block_expert])
    h = _swiglu_experts(jnp.einsum("nbd,ndi->nbi", xb, wg), jnp.einsum("nbd,ndi->nbi", xb, wu))
    yb = jnp.einsum("nbi,nid->nbd", h, wd).reshape(rows, d)
    return _combine(yb[dest], weights), dropped


# ----------------------------------------------------------------------------- the block

def sequence_balance(scores: jax.Array, experts: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Σ_i f_i P_i of SPEC §4 per sequence, averaged over sequences (α not applied).

    scores [B, S, E] (sigmoid), experts [B, S, k], valid [B, S] (0 = padding).
    f_i = E/(k·T) Σ_t 1[i ∈ TopK_t], P_i = 1/T Σ_t s_it / Σ_j s_jt, T = valid tokens of the sequence.
    """
    e = scores.shape[-1]
    v = valid.astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(v, axis=1), 1.0)                            # [B]
    hits = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=2)  # [B, S, E]
    f = e / (k * n_tok[:, None]) * jnp.sum(hits * v[..., None], axis=1)    # [B, E]
    p_tok = scores / jnp.sum(scores, axis=-1, keepdims=True)
    p = jnp.sum(p_tok * v[..., None], axis=1) / n_tok[:, None]             # [B, E]
    per_seq = jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1)               # [B]
    has = (jnp.sum(v, axis=1) > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)


class Experts(nn.Module):
    """The routed experts' stacked SwiGLU weights (fp32 master copies)."""

    num_experts: int
    width: int
    std: float

    @nn.compact
    def __call__(self, d: int) -> ExpertWeights:
        e, im = self.num_experts, self.width

        def param(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(truncated_normal_3sigma(self.std), axes),
                              shape, jnp.float32)

        return ExpertWeights(param("gate_proj", (e, d, im), ("exp", "embed", "moe_mlp")),
                             param("up_proj", (e, d, im), ("exp", "embed", "moe_mlp")),
                             param("down_proj", (e, im, d), ("exp", "moe_mlp", "embed")))


class MoE(nn.Module):
    """Shared expert + routed experts (SPEC §1.6). Returns (y [B,S,d], aux dict)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, s, d = x.shape
        e, k, im = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        std = cfg.sigma
        router_std = cfg.router_init_std if cfg.router_init_std is not None else std
        bias = self.variable("balance", "expert_bias",
                             lambda: nn.LogicallyPartitioned(jnp.zeros((e,), jnp.float32), names=("exp",)))
        logits = Linear(e, ("embed", "router"), router_std, jnp.float32, name="router")(
            x.reshape(b * s, d).astype(jnp.float32))                        # [T, E] fp32
        weights, experts, scores = route(logits, nn.unbox(bias.value), k, cfg.route_scale)

        ew = Experts(e, im, std, name="experts")(d)
        # Expert parallelism when a mesh with expert > 1 is active, else the registry impl directly.
        routed, dropped = moe_dispatch(x.reshape(b * s, d).astype(dtype), ew, weights, experts,
                                       num_experts=e, impl=cfg.moe_impl, capacity_factor=cfg.capacity_factor)
        y = routed.astype(dtype).reshape(b, s, d)
        if cfg.num_shared_experts > 0:
            y = y + SwiGLU(im * cfg.num_shared_experts, std, dtype, "shared", name="shared_experts")(x)
        valid_flat = valid.reshape(-1).astype(jnp.float32)
        counts = jnp.zeros((e,), jnp.float32).at[experts.reshape(-1)].add(jnp.repeat(valid_flat, k))
        balance = sequence_balance(scores.reshape(b, s, e), experts.reshape(b, s, k), valid, k)
        self.sow("intermediates", "router_scores", scores.reshape(b, s, e))
        self.sow("intermediates", "router_experts", experts.reshape(b, s, k))
        self.sow("intermediates", "router_weights", weights.reshape(b, s, k))
        return y, {"counts": counts, "balance": balance, "dropped": dropped}
