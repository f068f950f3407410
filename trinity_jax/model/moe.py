"""Mixture-of-Experts block (SPEC §1.6): sigmoid router, biased top-k selection, dropless dispatch.

The routed computation has several implementations behind one interface, chosen by
`model.moe_impl` (a registry, see `register_moe_impl`):

- `dense_reference`: every expert on every token, combined with the gate weights (the oracle);
- `ragged_dot`: sort token-slots by expert, `jax.lax.ragged_dot`, un-permute (GPU/TPU path);
- `block_sparse`: sort token-slots by expert into a padded row buffer and loop over fixed-size
  row blocks, one expert per block, with custom VJPs (fastest on XLA:CPU: the CPU default;
  `scripts/bench_moe.py` compares the implementations with a dense matmul of equal FLOPs);
- `pallas`: routing kernel + Pallas grouped matmul (registered by `moe_pallas.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from trinity_jax.config import ModelConfig
from trinity_jax.model.initializers import truncated_normal_3sigma
from trinity_jax.model.mlp import Linear, SwiGLU, dot_nn, dot_nt, dot_rows, f32_result_dots, is_16bit_float, transposed
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
    if n * max(num_experts, 1) < 2 ** 31:
        # One int32 key per slot, expert·N + slot: unique, so any sort is the stable one. XLA:CPU
        # sorts one key array ~4x faster than argsort's (key, index) pairs (16384 slots: 1.1-1.3
        # against 5.3 ms).
        order = jax.lax.sort(flat * n + jnp.arange(n, dtype=jnp.int32)) % n
    else:
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


# Row blocks of block_sparse. Loops run one block at a time and XLA:CPU multi-threads only
# large dots, so each expert's group is split into as few blocks as possible (binary
# decomposition, up to BLOCK_ROWS rows): measured on 2 cores at T=4096, d=256, f=128, k=4,
# E=64, fwd+bwd 212 / 166 / 142 ms with BLOCK_ROWS = 32 / 256 / 1024 (the dense MLP: 86 ms).
BLOCK_ROWS = 1024
# Each expert's group is padded to a multiple of PAD_ROWS (the smallest block): fewer, larger
# blocks for < PAD_ROWS wasted rows per expert. The bench's MoE layer fwd+bwd (scripts/ab_layer.py,
# session 10) against 8: 16, 32, 64 all 1.05x in bf16; 32: fp32 1.075x.
PAD_ROWS = 32


def padded_rows_bound(num_slots: int, num_experts: int, pad_rows: int = PAD_ROWS) -> int:
    """Static bound on the padded row count sum_e ceil(g_e / pad_rows) * pad_rows."""
    return -(-(num_slots + num_experts * (pad_rows - 1)) // pad_rows) * pad_rows


def block_rows_for(num_slots: int, num_experts: int, pad_rows: int = PAD_ROWS) -> int:
    """Largest row block of block_sparse: BLOCK_ROWS, clamped to the padded row buffer."""
    rows = padded_rows_bound(num_slots, num_experts, pad_rows)
    return int(max(pad_rows, min(BLOCK_ROWS, 2 ** int(math.floor(math.log2(rows))))))


class BlockPlan(NamedTuple):
    """Padded expert-major row layout of the token-slots and the row blocks that cover it.

    Slot s lives at row `dest[s]`; row r holds slot `src[r]` (N: a zero padding row). Each
    expert's rows start at a multiple of `pad_rows` and are covered, in order, by floor(g_p/B)
    blocks of B rows, then one block of each size B/2, ..., pad_rows whose bit is set in the
    padded group size g_p: fewer than `pad_rows` padding rows per expert, one expert per block.
    `tiers[i] = (start_row [L_i], expert [L_i], count)` for blocks of `sizes[i]` rows: the
    first `count` (a traced scalar) entries are used; L_i is a static bound.
    """

    dest: jax.Array
    src: jax.Array
    tiers: tuple
    sizes: tuple


def block_plan(experts: jax.Array, num_experts: int, block_rows: int | None = None,
               pad_rows: int = PAD_ROWS) -> BlockPlan:
    t, k = experts.shape
    n = t * k
    flat = experts.reshape(-1)
    rows = padded_rows_bound(n, num_experts, pad_rows)
    big = block_rows or block_rows_for(n, num_experts, pad_rows)
    if big < pad_rows or big & (big - 1) or pad_rows & (pad_rows - 1):
        raise ValueError(f"block_rows={big}, pad_rows={pad_rows}: powers of 2 with block_rows >= pad_rows")
    slots = sort_slots(experts, num_experts)
    psize = -(-slots.group_sizes // pad_rows) * pad_rows                     # [E] padded group sizes
    pend = jnp.cumsum(psize)
    pstart = pend - psize
    dest = (pstart[flat] + slots.rank).astype(jnp.int32)
    r = jnp.arange(rows, dtype=jnp.int32)
    e_r = jnp.clip(jnp.searchsorted(pend, r, side="right"), 0, num_experts - 1)
    p = r - pstart[e_r]
    real = (p < slots.group_sizes[e_r]) & (r < pend[-1])
    src = jnp.where(real, slots.order[jnp.clip(slots.offsets[e_r] + p, 0, n - 1)], n).astype(jnp.int32)
    tiers, sizes, s = [], [], big
    while s >= pad_rows:
        if s == big:
            cnt, off, bound = psize // s, jnp.zeros_like(psize), rows // s
        else:
            cnt, off, bound = (psize // s) % 2, psize - psize % (2 * s), min(num_experts, rows // s)
        cum = jnp.cumsum(cnt)
        j = jnp.arange(bound, dtype=jnp.int32)
        e = jnp.clip(jnp.searchsorted(cum, j, side="right"), 0, num_experts - 1).astype(jnp.int32)
        start = (pstart[e] + off[e] + (j - (cum[e] - cnt[e])) * s).astype(jnp.int32)
        tiers.append((start, e, cum[-1].astype(jnp.int32)))
        sizes.append(s)
        s //= 2
    return BlockPlan(dest, src, tuple(tiers), tuple(sizes))


# Inside shard_map (expert parallelism) values carry the set of mesh axes they vary over, and a
# custom VJP must return each cotangent varying exactly like its primal: where the forward mixed
# an input with values varying over more axes (e.g. tokens replicated over 'tensor' with weights
# split over it), the cotangent is summed over the extra axes, as autodiff's transpose would.

def _varying(a) -> frozenset:
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)            # jax 0.10; later: aval.vma
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _like_primal(ct, primal):
    extra, missing = _varying(ct) - _varying(primal), _varying(primal) - _varying(ct)
    if extra:
        ct = jax.lax.psum(ct, tuple(sorted(extra)))
    if missing:
        ct = jax.lax.pcast(ct, tuple(sorted(missing)), to="varying")
    return ct


# The two permutations have gather-only backward passes (XLA:CPU's scatter-add is slow); the
# pallas impl uses them too (src = the expert order, no padding rows).

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def to_rows(x, dest, src, k):
    """x [T, d] -> rows [R, d]: row r = x[src[r] // k], zero where src[r] == N."""
    n = dest.shape[0]
    x_ext = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
    return x_ext[jnp.where(src < n, src // k, x.shape[0])]


def _to_rows_fwd(x, dest, src, k):
    return to_rows(x, dest, src, k), (dest, x[:0])                         # x[:0]: x's type


def _to_rows_bwd(k, res, g):
    dest, x_probe = res
    t = dest.shape[0] // k
    dx = jnp.sum(g[dest].reshape(t, k, -1).astype(jnp.float32), axis=1)   # a token's k slots
    return _like_primal(dx.astype(x_probe.dtype), x_probe), None, None


to_rows.defvjp(_to_rows_fwd, _to_rows_bwd)


@jax.custom_vjp
def from_rows(ys, dest, src):
    """rows [R, d] -> slots [N, d]: slot s = ys[dest[s]]."""
    del src
    return ys[dest]


def _from_rows_fwd(ys, dest, src):
    return ys[dest], (src, ys[:0])


def _from_rows_bwd(res, g):
    src, ys_probe = res
    g_ext = jnp.concatenate([g, jnp.zeros((1, g.shape[1]), g.dtype)], axis=0)
    return _like_primal(g_ext[src].astype(ys_probe.dtype), ys_probe), None, None   # padding rows: 0


from_rows.defvjp(_from_rows_fwd, _from_rows_bwd)


def _zeros_varying_like(refs, *shapes_dtypes):
    """Loop-carry zeros with the union of the refs' varying manual axes (inside shard_map, the
    carry must vary like the loop body's outputs; elsewhere this is plain zeros)."""
    vma = frozenset().union(*(_varying(r) for r in jax.tree.leaves(refs)))
    zeros = tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes_dtypes)
    if not vma:
        return zeros
    return tuple(jax.lax.pcast(z, tuple(sorted(vma)), to="varying") for z in zeros)


def _bits_dtype(dtype):
    """Loop-carry storage for row buffers: 16-bit floats are carried as uint16 bit patterns.

    XLA:CPU has no bf16 dynamic-update-slice: it converts the whole carried buffer to f32 and
    back around each in-place row update, so every loop iteration copied the buffer (the bench
    model's bf16 step took 7.8 s, ~5 s of it in those copies). On bits the update is in place."""
    return jnp.dtype(jnp.uint16) if is_16bit_float(dtype) else jnp.dtype(dtype)


def _to_bits(a, dtype):
    """a as the carry storage of `dtype` rows (see _bits_dtype)."""
    a = a.astype(dtype)
    bits = _bits_dtype(dtype)
    return a if bits == a.dtype else jax.lax.bitcast_convert_type(a, bits)


def _from_bits(a, dtype):
    return a if a.dtype == jnp.dtype(dtype) else jax.lax.bitcast_convert_type(a, dtype)


def _block(a, start, size, axis, dtype):
    """Rows (axis 0) or columns (axis 1) [start, start + size) of carry storage `a`, as `dtype`."""
    return _from_bits(jax.lax.dynamic_slice_in_dim(a, start, size, axis), dtype)


def _unfused(a):
    """a, computed by kernels of its own: passed through the identity branch of a `cond` on a
    true that XLA cannot see (an optimization barrier's output); fusion does not cross a
    conditional. XLA fused `transposed` with the bitcast to the loops' uint16 storage into one
    generic loop kernel: 10-12 ms for a [16832, 256] buffer here against 1.6-1.9 ms for the bf16
    transpose alone (14 such per step of the bench model). Elsewhere the extra copy ate the
    gain: in place of all of `own_buffer` the bench step was ~9% slower (paired runs), and on
    the cotangents of attention's heads/rows moves it was even (0.98x, 1.01x)."""
    true = jax.lax.optimization_barrier(jnp.bool_(True))
    return jax.lax.cond(true, lambda v: v, jnp.zeros_like, a)


# The loops read every 16-bit buffer as bits (_to_bits), not only the ones they update: given a
# bf16 buffer, XLA:CPU moved the conversions of the loops' slices out to the whole buffer,
# carrying it as f32 (twice the bytes, and a full f32 conversion per buffer and layer), and it
# moved the rounding of the weights to bf16 into the loops (a conversion per block).

def _block_loops_fwd(xs, wg, wu, wd, tiers, sizes):
    """-> the row buffers (ys, hg, hu) as carry storage (see _bits_dtype)."""
    rows, d = xs.shape
    f = wg.shape[-1]
    dt, bits, f32 = xs.dtype, _bits_dtype(xs.dtype), jnp.float32
    carry = _zeros_varying_like((xs, wg, wu, wd, tiers), ((rows, d), bits), ((rows, f), bits), ((rows, f), bits))
    upd = jax.lax.dynamic_update_slice_in_dim
    xsb = _to_bits(xs, dt)
    wb = tuple(_to_bits(w, dt) for w in (wg, wu, wd))
    for s, (start, expert, count) in zip(sizes, tiers):
        def body(j, c, s=s, start=start, expert=expert):
            ys, hg, hu = c
            e, r = expert[j], start[j]
            xb = _block(xsb, r, s, 0, dt)
            wge, wue, wde = (_from_bits(w[e], dt) for w in wb)
            g, u = dot_nn(xb, wge).astype(dt), dot_nn(xb, wue).astype(dt)
            yb = dot_nn(_swiglu_experts(g.astype(f32), u.astype(f32)).astype(dt), wde)
            return tuple(upd(buf, _to_bits(v, dt), r, 0) for buf, v in ((ys, yb), (hg, g), (hu, u)))
        carry = jax.lax.fori_loop(0, count, body, carry)
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_swiglu(xs, wg, wu, wd, tiers, sizes):
    """Each block of rows [s, d] of expert e -> silu(rows @ wg[e]) * (rows @ wu[e]) @ wd[e].

    The products run in xs's dtype; the weights come in their master dtype, are rounded to
    xs's once, outside the loops, and get their gradients in the master dtype."""
    return _from_bits(_block_loops_fwd(xs, wg, wu, wd, tiers, sizes)[0], xs.dtype)


def _block_swiglu_fwd(xs, wg, wu, wd, tiers, sizes):
    ys, hg, hu = _block_loops_fwd(xs, wg, wu, wd, tiers, sizes)
    return _from_bits(ys, xs.dtype), (xs, wg, wu, wd, tiers, hg, hu)


def _block_swiglu_bwd(sizes, res, gy):
    xs, wg, wu, wd, tiers, hg, hu = res                                    # hg, hu: carry storage
    dt, f32 = xs.dtype, jnp.float32
    # The weight gradients contract the rows. In 16-bit on XLA:CPU a row-contracting dot is
    # upcast to an f32 dot (4-6x slower), so xs and gy are transposed once, outside the loops
    # (as floats: XLA:CPU transposes uint16 ~8x slower than bf16), and each block's dWg, dWu =
    # xbᵀ dg, xbᵀ du and dWdᵀ = dyᵀ h are [.., s] @ [s, ..] products of slices. In f32 the
    # per-block transposes of `dot_rows` were as fast and the up-front ones cost ~10 ms a layer.
    pre = f32_result_dots(dt)
    gyb = _to_bits(gy, dt)
    if pre:
        xst, gyt = (_to_bits(_unfused(transposed(a)), dt) for a in (xs, gy))   # [d, R]
    else:
        xsb = _to_bits(xs, dt)
    dwd_shape = wd.shape[:1] + wd.shape[:0:-1] if pre else wd.shape
    carry = _zeros_varying_like((xs, wg, wu, wd, tiers, hg, hu, gy), (xs.shape, _bits_dtype(dt)),
                                (wg.shape, f32), (wu.shape, f32), (dwd_shape, f32))
    wb = tuple(_to_bits(w, dt) for w in (wg, wu, wd))
    for s, (start, expert, count) in zip(sizes, tiers):
        def body(j, c, s=s, start=start, expert=expert):
            dxs, dwg, dwu, dwd = c
            e, r = expert[j], start[j]
            wge, wue, wde = (_from_bits(w[e], dt) for w in wb)
            g, u, dy = (_block(a, r, s, 0, dt) for a in (hg, hu, gyb))         # [s, ..]
            # the SwiGLU in fp32 from the stored (compute-dtype) g, u, as in the forward
            h, swiglu_vjp = jax.vjp(_swiglu_experts, g.astype(f32), u.astype(f32))
            h = h.astype(dt)
            dg, du = (t.astype(dt) for t in swiglu_vjp(dot_nt(dy, wde)))     # [s, f] each
            dxb = dot_nt(dg, wge) + dot_nt(du, wue)
            if pre:
                xbt, dyt = (_block(a, r, s, 1, dt) for a in (xst, gyt))        # [d, s]
                dw = dot_nn(xbt, dg), dot_nn(xbt, du), dot_nn(dyt, h)                 # dWd as [d, f]
            else:
                xb = _block(xsb, r, s, 0, dt)
                dw = dot_rows(xb, dg), dot_rows(xb, du), dot_rows(h, dy)
            dwg, dwu, dwd = (acc.at[e].add(v) for acc, v in zip((dwg, dwu, dwd), dw))
            return jax.lax.dynamic_update_slice_in_dim(dxs, _to_bits(dxb, dt), r, 0), dwg, dwu, dwd
        carry = jax.lax.fori_loop(0, count, body, carry)
    dxs, dwg, dwu, dwd = carry
    carry = (_from_bits(dxs, dt), dwg, dwu, jnp.swapaxes(dwd, 1, 2) if pre else dwd)
    grads = tuple(_like_primal(ct.astype(p.dtype), p) for ct, p in zip(carry, (xs, wg, wu, wd)))
    return (*grads, tuple((None, None, None) for _ in tiers))


_block_swiglu.defvjp(_block_swiglu_fwd, _block_swiglu_bwd)


@register_moe_impl("block_sparse")
def moe_block_sparse(x, w: ExpertWeights, weights, experts, *, num_experts, capacity_factor=0.0,
                     block_rows: int | None = None, pad_rows: int = PAD_ROWS):
    """Dropless grouped matmul as loops over fixed-size row blocks (the XLA:CPU path).

    Token-slots are sorted by expert into a padded row buffer (`block_plan`); `fori_loop`s over
    the blocks in use (a traced count, so padding costs < `pad_rows` rows per expert) run each
    block's SwiGLU with its expert's weights sliced in place: no [blocks, d, f] weight gather.
    Custom VJPs: the backward loops accumulate the weight gradients in place, and both
    permutations are gathers both ways (no scatter-add). `scripts/bench_moe.py` times it.
    """
    weights, dropped = _maybe_drop(weights, experts, num_experts, capacity_factor)
    k = experts.shape[1]
    plan = block_plan(experts, num_experts, block_rows, pad_rows)
    dt = x.dtype
    xs = to_rows(x, plan.dest, plan.src, k)                               # [R, d]
    ys = _block_swiglu(xs, w.gate, w.up, w.down, plan.tiers, plan.sizes)
    return _combine(from_rows(ys, plan.dest, plan.src), weights), dropped


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
