"""Sigmoid top-k routing and the expert-grouping permutation in Pallas (SPEC §1.6).

`route(logits [T,E], bias [E], k, route_scale)` returns a `RouteResult`:
- scores = sigmoid(logits) (fp32), experts = top-k of scores + bias, best first, **ties
  broken toward the lowest expert index** (the same order as `jax.lax.top_k`);
- weights = route_scale * s_sel / (sum_j s_sel + 1e-20) from the *unbiased* scores;
- a stable counting sort of the T*k slots (slot = t*k + j) by expert: `dest[slot]` is the
  slot's row in expert-sorted order (slots of one expert keep slot order), `group_sizes`
  [E] the slots per expert (= token counts), `group_offsets` [E] their exclusive prefix sum.
  `x_sorted = zeros.at[dest].set(repeat(x, k))` is the gmm input layout.

Two pallas_calls, each tiled over token blocks of `block_tokens` rows:
1. per block: scores, iterative top-k (k rounds of max, lowest index among ties, mask),
   weights, and for each slot its rank among the block's earlier slots with the same expert
   (an exclusive cumsum over tokens of the one-hot choices, plus earlier choices of the
   same token: none for top-k, whose k experts are distinct), and the block's counts [E];
2. plain JAX on the tiny [blocks, E] table: group sizes, offsets, and each block's base row
   per expert (offset + counts of earlier blocks);
3. per block: dest = base[block, expert] + rank.
E is padded to a power of two (bias -inf, never selected) and T to a multiple of the block
(rows masked out of the counts), as Triton needs power-of-two shapes.
`group_slots(experts, E)` runs the same counting sort for expert choices made elsewhere
(the MoE layer receives experts, not logits).

Gradients: `weights` and `scores` are differentiable w.r.t. logits through a custom VJP
whose backward recomputes them in plain JAX from the selected experts (selection itself
has no gradient; bias gets none, as in SPEC: it only selects).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.reference import RouteResult


def _resolve_interpret(interpret):
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _compiler_params(interpret: bool):
    if interpret:
        return None
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _block_ranks(cols, valid, eidx):
    """Stable counting-sort ranks inside one token block.

    cols: k arrays [bt, 1] int32 (expert of slot t*k+j); valid [bt, Ep] bool (real tokens);
    eidx [bt, Ep] expert iota. Returns (ranks: k arrays [bt] = number of the block's earlier
    slots with the same expert, counts [Ep] = the block's slots per expert).
    """
    onehot_sum = jnp.zeros(eidx.shape, jnp.int32)
    for c in cols:
        onehot_sum = onehot_sum + jnp.where((eidx == c) & valid, 1, 0)
    before = jnp.cumsum(onehot_sum, axis=0) - onehot_sum        # earlier tokens, [bt, Ep]
    ranks = []
    for j, c in enumerate(cols):
        r = jnp.sum(jnp.where(eidx == c, before, 0), axis=1)      # [bt]
        for c_prev in cols[:j]:                                   # same token, earlier choice
            r = r + jnp.where(c_prev[:, 0] == c[:, 0], 1, 0)        # (never, for top-k choices)
        ranks.append(r)
    return ranks, jnp.sum(onehot_sum, axis=0)


def _topk_kernel(logits_ref, bias_ref, scores_ref, weights_ref, experts_ref, rank_ref,
                 counts_ref, *, k, route_scale, num_tokens, bt, e_pad):
    b = pl.program_id(0)
    logits = logits_ref[...].astype(jnp.float32)                    # [bt, Ep]
    s = 1.0 / (1.0 + jnp.exp(-logits))                              # sigmoid, [bt, Ep]
    scores_ref[...] = s
    biased = s + bias_ref[...][None, :]                             # [bt, Ep]
    eidx = lax.broadcasted_iota(jnp.int32, (bt, e_pad), 1)
    tok = b * bt + lax.broadcasted_iota(jnp.int32, (bt, e_pad), 0)
    valid = tok < num_tokens                                        # padding rows
    cols, sels = [], []
    for _ in range(k):
        best = jnp.max(biased, axis=1, keepdims=True)                 # [bt, 1]
        idx = jnp.min(jnp.where(biased == best, eidx, e_pad), axis=1, keepdims=True)
        hit = eidx == idx                                             # [bt, Ep] one-hot
        cols.append(idx)
        sels.append(jnp.sum(jnp.where(hit, s, 0.0), axis=1))
        biased = jnp.where(hit, -jnp.inf, biased)
    total = sels[0]
    for sel in sels[1:]:
        total = total + sel
    scale = route_scale / (total + 1e-20)                           # [bt]
    ranks, counts = _block_ranks(cols, valid, eidx)
    counts_ref[...] = counts                                        # [Ep]
    for j in range(k):
        experts_ref[:, j] = cols[j][:, 0]
        weights_ref[:, j] = sels[j] * scale
        rank_ref[:, j] = ranks[j]


def _slot_rank_kernel(experts_ref, rank_ref, counts_ref, *, k, num_tokens, bt, e_pad):
    b = pl.program_id(0)
    eidx = lax.broadcasted_iota(jnp.int32, (bt, e_pad), 1)
    tok = b * bt + lax.broadcasted_iota(jnp.int32, (bt, e_pad), 0)
    cols = [experts_ref[:, j][:, None] for j in range(k)]
    ranks, counts = _block_ranks(cols, tok < num_tokens, eidx)
    counts_ref[...] = counts
    for j in range(k):
        rank_ref[:, j] = ranks[j]


def _dest_kernel(experts_ref, rank_ref, base_ref, dest_ref, *, k, bt, e_pad):
    base = base_ref[...]                                            # [Ep]
    eidx = lax.broadcasted_iota(jnp.int32, (bt, e_pad), 1)
    for j in range(k):
        e = experts_ref[:, j]                                         # [bt]
        row = jnp.sum(jnp.where(eidx == e[:, None], base[None, :], 0), axis=1)
        dest_ref[:, j] = row + rank_ref[:, j]


def _default_block(num_tokens: int, e_pad: int) -> int:
    # Keep a [block, E] f32 tile around 16k elements (registers on GPU), 16..128 rows.
    bt = max(16, min(128, 16384 // e_pad))
    return min(bt, max(16, pl.next_power_of_2(num_tokens)))


def _geometry(num_tokens, num_experts, block_tokens):
    e_pad = max(16, pl.next_power_of_2(num_experts))
    bt = block_tokens or _default_block(num_tokens, e_pad)
    nb = -(-num_tokens // bt)
    return e_pad, bt, nb


def _dest_pass(experts, rank, block_counts, *, k, bt, e_pad, interpret):
    """Pass 2 (+ the tiny [blocks, E] prefix sums): dest [T_pad, k], sizes, offsets [Ep]."""
    nb = block_counts.shape[0]
    group_sizes = jnp.sum(block_counts, axis=0)                                   # [Ep]
    group_offsets = jnp.cumsum(group_sizes) - group_sizes
    base = group_offsets[None, :] + jnp.cumsum(block_counts, axis=0) - block_counts  # [nb, Ep]
    tk_spec = pl.BlockSpec((bt, k), lambda b: (b, 0))
    dest = pl.pallas_call(
        functools.partial(_dest_kernel, k=k, bt=bt, e_pad=e_pad),
        grid=(nb,),
        in_specs=[tk_spec, tk_spec, pl.BlockSpec((pl.squeezed, e_pad), lambda b: (b, 0))],
        out_specs=tk_spec,
        out_shape=jax.ShapeDtypeStruct((nb * bt, k), jnp.int32),
        interpret=interpret, compiler_params=_compiler_params(interpret), name="route_dest",
    )(experts, rank, base.astype(jnp.int32))
    return dest, group_sizes.astype(jnp.int32), group_offsets.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _route_impl(logits, bias, k, route_scale, block_tokens, interpret):
    interpret = _resolve_interpret(interpret)
    num_tokens, num_experts = logits.shape
    e_pad, bt, nb = _geometry(num_tokens, num_experts, block_tokens)
    t_pad = nb * bt
    logits_p = jnp.pad(logits.astype(jnp.float32),
                       ((0, t_pad - num_tokens), (0, e_pad - num_experts)))
    bias_p = jnp.pad(bias.astype(jnp.float32), (0, e_pad - num_experts),
                     constant_values=-jnp.inf)
    tk_spec = pl.BlockSpec((bt, k), lambda b: (b, 0))
    scores, weights, experts, rank, block_counts = pl.pallas_call(
        functools.partial(_topk_kernel, k=k, route_scale=float(route_scale),
                          num_tokens=num_tokens, bt=bt, e_pad=e_pad),
        grid=(nb,),
        in_specs=[pl.BlockSpec((bt, e_pad), lambda b: (b, 0)),
                  pl.BlockSpec((e_pad,), lambda b: (0,))],
        out_specs=[pl.BlockSpec((bt, e_pad), lambda b: (b, 0)), tk_spec, tk_spec, tk_spec,
                   pl.BlockSpec((pl.squeezed, e_pad), lambda b: (b, 0))],
        out_shape=[jax.ShapeDtypeStruct((t_pad, e_pad), jnp.float32),
                   jax.ShapeDtypeStruct((t_pad, k), jnp.float32),
                   jax.ShapeDtypeStruct((t_pad, k), jnp.int32),
                   jax.ShapeDtypeStruct((t_pad, k), jnp.int32),
                   jax.ShapeDtypeStruct((nb, e_pad), jnp.int32)],
        interpret=interpret, compiler_params=_compiler_params(interpret), name="route_topk",
    )(logits_p, bias_p)
    dest, group_sizes, group_offsets = _dest_pass(experts, rank, block_counts, k=k, bt=bt,
                                                  e_pad=e_pad, interpret=interpret)
    return RouteResult(
        weights=weights[:num_tokens], experts=experts[:num_tokens],
        scores=scores[:num_tokens, :num_experts],
        dest=dest[:num_tokens].reshape(-1),
        group_sizes=group_sizes[:num_experts], group_offsets=group_offsets[:num_experts])


class SlotGroups(NamedTuple):
    """Stable grouping of the T*k slots (slot = t*k + j) by expert."""
    dest: jax.Array           # [T*k] int32: row of each slot in expert-sorted order
    group_sizes: jax.Array    # [E] int32
    group_offsets: jax.Array  # [E] int32, exclusive prefix sum


@functools.partial(jax.jit, static_argnames=("num_experts", "block_tokens", "interpret"))
def group_slots(experts: jax.Array, num_experts: int, *, block_tokens: int | None = None,
                interpret: bool | None = None) -> SlotGroups:
    """The counting-sort half of `route` for given choices experts [T, k] (int, < num_experts).

    Same two passes (per-block ranks and counts, then dest = base + rank); equals
    `argsort(experts.reshape(-1), stable=True)` inverted. Experts need not be distinct per token.
    """
    interpret = _resolve_interpret(interpret)
    num_tokens, k = experts.shape
    e_pad, bt, nb = _geometry(num_tokens, num_experts, block_tokens)
    experts_p = jnp.pad(experts.astype(jnp.int32), ((0, nb * bt - num_tokens), (0, 0)))
    tk_spec = pl.BlockSpec((bt, k), lambda b: (b, 0))
    rank, block_counts = pl.pallas_call(
        functools.partial(_slot_rank_kernel, k=k, num_tokens=num_tokens, bt=bt, e_pad=e_pad),
        grid=(nb,),
        in_specs=[tk_spec],
        out_specs=[tk_spec, pl.BlockSpec((pl.squeezed, e_pad), lambda b: (b, 0))],
        out_shape=[jax.ShapeDtypeStruct((nb * bt, k), jnp.int32),
                   jax.ShapeDtypeStruct((nb, e_pad), jnp.int32)],
        interpret=interpret, compiler_params=_compiler_params(interpret), name="slot_rank",
    )(experts_p)
    dest, group_sizes, group_offsets = _dest_pass(experts_p, rank, block_counts, k=k, bt=bt,
                                                  e_pad=e_pad, interpret=interpret)
    return SlotGroups(dest[:num_tokens].reshape(-1), group_sizes[:num_experts],
                      group_offsets[:num_experts])


def _differentiable_outputs(logits, experts, route_scale):
    """weights and scores as plain-JAX functions of logits, for fixed expert choices."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    sel = jnp.take_along_axis(scores, experts, axis=1)
    weights = sel / (sel.sum(axis=1, keepdims=True) + 1e-20) * route_scale
    return weights, scores


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _route(logits, bias, k, route_scale, block_tokens, interpret):
    return _route_impl(logits, bias, k, route_scale, block_tokens, interpret)


def _route_fwd(logits, bias, k, route_scale, block_tokens, interpret):
    out = _route_impl(logits, bias, k, route_scale, block_tokens, interpret)
    return out, (logits, bias, out.experts)


def _route_bwd(k, route_scale, block_tokens, interpret, res, ct):
    del k, block_tokens, interpret
    logits, bias, experts = res
    _, vjp = jax.vjp(lambda x: _differentiable_outputs(x, experts, route_scale), logits)
    (d_logits,) = vjp((ct.weights, ct.scores))
    return d_logits.astype(logits.dtype), jnp.zeros_like(bias)


_route.defvjp(_route_fwd, _route_bwd)


def route(logits: jax.Array, bias: jax.Array, k: int, route_scale: float = 1.0, *,
          block_tokens: int | None = None, interpret: bool | None = None) -> RouteResult:
    """SPEC §1.6 routing + stable expert grouping of the T*k slots (see module docstring).

    logits [T, E] (taken to fp32), bias [E] fp32 (selection only), k <= E static,
    route_scale static. `block_tokens` (power of two >= 16) tiles T; default keeps a
    [block, E] tile near 16k elements. `interpret=None`: interpret mode on CPU only.
    """
    if logits.ndim != 2 or bias.shape != (logits.shape[1],):
        raise ValueError(f"route expects logits [T,E] and bias [E]; got {logits.shape}, "
                         f"{bias.shape}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"route: k={k} must be in [1, E={logits.shape[1]}]")
    if block_tokens is not None and (block_tokens < 1 or block_tokens & (block_tokens - 1)):
        raise ValueError(f"route: block_tokens={block_tokens} must be a power of two")
    return _route(logits, bias, int(k), float(route_scale), block_tokens, interpret)
