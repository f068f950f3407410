"""Grouped matrix multiplication (gmm / tgmm) in Pallas, with a custom VJP.

`gmm(lhs [M,K], rhs [G,K,N], group_sizes [G])` computes, for every group g, the rows of lhs
that belong to g (contiguous, group after group) times rhs[g]. Rows past sum(group_sizes)
(padding at the end) come out as 0 and get 0 gradient. `tgmm(lhs [M,K], grad [M,N],
group_sizes)` is the transposed product lhs[g-rows]^T @ grad[g-rows] -> [G,K,N] (the weight
gradient). Both accumulate in float32.

Design (megablox's idea, written for a GPU grid where programs run concurrently):
- A metadata precompute in plain JAX (`_gmm_metadata`) lists the *visits*: pairs
  (group, row tile) for every row tile a group overlaps, plus a "padding group" covering the
  rows past sum(group_sizes). There are at most M/tm + G visits; the grid has that many
  (unused ones are empty). Triton has no scalar prefetch, so the metadata are ordinary
  inputs read inside the kernel (`ref[i]`).
- gmm grid = (N tiles, visits): each program loads its row tile, loops over K with an f32
  accumulator (`lax.fori_loop` -> scf.for, software-pipelined by Triton) and stores only the
  rows of its group (masked store), so two programs sharing a tile never write the same
  row. N is the fastest grid axis so that programs running together share an lhs tile and
  rhs[g] stays in L2.
- tgmm grid = (N tiles, K tiles, G): each program loops over the row tiles of its group,
  loading rows outside the group as zeros (masked load), and writes one [tk, tn] block
  of out[g] (zeros for an empty group).
- Shapes are padded to multiples of the tiles in the wrapper (no-op when they divide), so
  the kernel body never reads out of bounds; this keeps interpret mode (whose dynamic
  slices clamp) and Triton (raw pointers) bit-for-bit the same program.

Only portable primitives are used (ref slicing with pl.ds, jnp.dot / lax.dot_general,
lax.fori_loop, program_id, and the Triton-module masked load/store, which interpret mode
also discharges), so the same body runs with `interpret=True` on CPU and lowers through Pallas
Triton on NVIDIA GPUs. Triton needs power-of-two tiles >= 16.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

DEFAULT_TILING = (128, 64, 128)   # (tm, tk, tn); scripts/bench_gpu.py sweeps others on GPU


def _resolve_interpret(interpret):
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _compiler_params(interpret: bool, num_warps: int | None, num_stages: int | None):
    """Triton launch parameters on GPU (this also selects the Triton lowering); none otherwise."""
    if interpret:
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _fit_tile(tile: int, dim: int) -> int:
    """Shrink a tile to the next power of two >= dim (min 16) when the dim is smaller."""
    if dim >= tile:
        return tile
    return max(16, pl.next_power_of_2(dim))


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads)


def _dot_precision(dtype):
    # Full fp32 products for fp32 inputs (Triton would otherwise use TF32); bf16/fp16 native.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _gmm_metadata(group_sizes: jax.Array, m: int, m_pad: int, tm: int):
    """Visits of the gmm grid.

    Returns (offsets [G+3], visit_group [V], visit_tile [V]) with V = m_pad/tm + G.
    Group g in [0, G) owns rows [offsets[g], offsets[g+1]); g = G is the padding group
    [sum(group_sizes), m_pad) (written with zeros); g = G+1 is an empty group used by
    unused visits.
    """
    num_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)          # [G]
    starts_all = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])          # [G+1] (+pad)
    ends_all = jnp.concatenate([ends, jnp.full((1,), m_pad, jnp.int32)])      # [G+1]
    sizes = ends_all - starts_all
    first = starts_all // tm
    last = (ends_all - 1) // tm
    tiles = jnp.where(sizes > 0, last - first + 1, 0)                         # [G+1]
    cum = jnp.cumsum(tiles)
    visit_start = cum - tiles
    num_visits = m_pad // tm + num_groups
    v = jnp.arange(num_visits, dtype=jnp.int32)
    gid = jnp.searchsorted(cum, v, side="right").astype(jnp.int32)            # [V] in [0, G+1]
    gclip = jnp.minimum(gid, num_groups)
    tile = jnp.where(gid <= num_groups, first[gclip] + v - visit_start[gclip], 0)
    offsets = jnp.concatenate([starts_all, jnp.full((2,), m_pad, jnp.int32)])  # [G+3]
    return offsets, gid, tile.astype(jnp.int32)


def _gmm_kernel(gid_ref, tile_ref, trip_ref, offsets_ref, lhs_ref, rhs_ref, out_ref, *,
                tm, tk, tn, num_groups, transpose_rhs, precision):
    n = pl.program_id(0)
    v = pl.program_id(1)
    g = gid_ref[v]
    row0 = pl.multiple_of(tile_ref[v] * tm, tm)
    col0 = pl.multiple_of(n * tn, tn)
    start = offsets_ref[g]
    end = offsets_ref[g + 1]
    rhs_g = jnp.minimum(g, num_groups - 1)
    # K iterations of this visit: 0 for the padding group and unused visits (accumulator 0).
    # Loaded, not computed here: jax 0.11's Triton lowering typed a kernel-side
    # `jnp.where(g < G, num_k, 0)` as i1, and Triton rejected the scf.for (seen on an H200).
    trip = trip_ref[v]

    def body(kk, acc):
        k0 = pl.multiple_of(kk * tk, tk)
        a = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]                  # [tm, tk]
        if transpose_rhs:
            b = rhs_ref[rhs_g, pl.ds(col0, tn), pl.ds(k0, tk)]       # [tn, tk]
            dims = (((1,), (1,)), ((), ()))
        else:
            b = rhs_ref[rhs_g, pl.ds(k0, tk), pl.ds(col0, tn)]       # [tk, tn]
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(a, b, dims, precision=precision,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, trip, body, jnp.zeros((tm, tn), jnp.float32))
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    mask = (rows >= start) & (rows < end)
    pltriton.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)],
                   acc.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "transpose_rhs",
                                             "interpret", "num_warps", "num_stages"))
def _gmm_impl(lhs, rhs, group_sizes, *, tiling, out_dtype, transpose_rhs, interpret,
              num_warps, num_stages):
    interpret = _resolve_interpret(interpret)
    m, kdim = lhs.shape
    n_out = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    num_groups = rhs.shape[0]
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    tm, tk, tn = tiling
    tm, tk, tn = _fit_tile(tm, m), _fit_tile(tk, kdim), _fit_tile(tn, n_out)
    m_pad, k_pad, n_pad = _round_up(m, tm), _round_up(kdim, tk), _round_up(n_out, tn)
    lhs = _pad_to(_pad_to(lhs, 0, m_pad), 1, k_pad)
    if transpose_rhs:
        rhs = _pad_to(_pad_to(rhs, 1, n_pad), 2, k_pad)
    else:
        rhs = _pad_to(_pad_to(rhs, 1, k_pad), 2, n_pad)
    offsets, gid, tile = _gmm_metadata(group_sizes, m, m_pad, tm)
    trip = jnp.where(gid < num_groups, k_pad // tk, 0).astype(jnp.int32)      # [V]
    kernel = functools.partial(
        _gmm_kernel, tm=tm, tk=tk, tn=tn, num_groups=num_groups,
        transpose_rhs=transpose_rhs, precision=_dot_precision(dtype))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
        grid=(n_pad // tn, gid.shape[0]),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="gmm",
    )(gid, tile, trip, offsets, lhs, rhs)
    return out[:m, :n_out]


def _tgmm_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn, precision):
    n = pl.program_id(0)
    kb = pl.program_id(1)
    g = pl.program_id(2)
    start = offsets_ref[g]
    end = offsets_ref[g + 1]
    k0 = pl.multiple_of(kb * tk, tk)
    col0 = pl.multiple_of(n * tn, tn)
    first = start // tm
    last = (end + tm - 1) // tm          # exclusive; first == last for an empty group

    def body(t, acc):
        row0 = pl.multiple_of(t * tm, tm)
        rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
        # Rows of other groups load as 0 (a masked load keeps Triton's async copy pipeline).
        a = pltriton.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                          mask=(rows >= start) & (rows < end), other=0)  # [tm, tk]
        b = grad_ref[pl.ds(row0, tm), pl.ds(col0, tn)]                   # [tm, tn]
        return acc + lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(first, jnp.maximum(first, last), body,
                        jnp.zeros((tk, tn), jnp.float32))
    out_ref[g, pl.ds(k0, tk), pl.ds(col0, tn)] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "preferred_element_type",
                                             "interpret", "num_warps", "num_stages"))
def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         tiling: tuple[int, int, int] = DEFAULT_TILING,
         preferred_element_type=jnp.float32, interpret: bool | None = None,
         num_warps: int | None = 4, num_stages: int | None = 3) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ grad[rows of g] for g < G: [M,K], [M,N], [G] -> [G,K,N].

    Rows past sum(group_sizes) are ignored; empty groups give 0. f32 accumulation; the
    output has `preferred_element_type`. `tiling` = (tm, tk, tn).
    """
    interpret = _resolve_interpret(interpret)
    m, kdim = lhs.shape
    n_out = grad.shape[1]
    num_groups = group_sizes.shape[0]
    dtype = jnp.result_type(lhs.dtype, grad.dtype)
    lhs, grad = lhs.astype(dtype), grad.astype(dtype)
    tm, tk, tn = tiling
    tm, tk, tn = _fit_tile(tm, m), _fit_tile(tk, kdim), _fit_tile(tn, n_out)
    m_pad, k_pad, n_pad = _round_up(m, tm), _round_up(kdim, tk), _round_up(n_out, tn)
    lhs = _pad_to(_pad_to(lhs, 0, m_pad), 1, k_pad)
    grad = _pad_to(_pad_to(grad, 0, m_pad), 1, n_pad)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])             # [G+1]
    kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn,
                               precision=_dot_precision(dtype))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k_pad, n_pad), preferred_element_type),
        grid=(n_pad // tn, k_pad // tk, num_groups),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="tgmm",
    )(offsets, lhs, grad)
    return out[:, :kdim, :n_out]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _gmm(lhs, rhs, group_sizes, tiling, out_dtype, transpose_rhs, interpret, num_warps,
         num_stages):
    return _gmm_impl(lhs, rhs, group_sizes, tiling=tiling, out_dtype=out_dtype,
                     transpose_rhs=transpose_rhs, interpret=interpret,
                     num_warps=num_warps, num_stages=num_stages)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, out_dtype, transpose_rhs, interpret,
             num_warps, num_stages):
    out = _gmm(lhs, rhs, group_sizes, tiling, out_dtype, transpose_rhs, interpret,
               num_warps, num_stages)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, out_dtype, transpose_rhs, interpret, num_warps, num_stages, res,
             grad):
    del out_dtype
    lhs, rhs, group_sizes = res
    # The cotangent is rounded to the compute dtype (bf16 in bf16 training, as megablox
    # does); accumulation stays f32.
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    grad = grad.astype(dtype)
    tm, tk, tn = tiling
    # d_lhs [M,K] = grad [M,N] @ rhs[g]^T: a gmm contracting over N.
    d_lhs = _gmm_impl(grad, rhs, group_sizes, tiling=(tm, tn, tk), out_dtype=lhs.dtype,
                      transpose_rhs=not transpose_rhs, interpret=interpret,
                      num_warps=num_warps, num_stages=num_stages)
    # d_rhs[g] = lhs[g-rows]^T @ grad[g-rows] ([G,K,N]; transposed when rhs is [G,N,K]).
    if transpose_rhs:
        d_rhs = tgmm(grad, lhs, group_sizes, tiling=(tm, tn, tk),
                     preferred_element_type=rhs.dtype, interpret=interpret,
                     num_warps=num_warps, num_stages=num_stages)
    else:
        d_rhs = tgmm(lhs, grad, group_sizes, tiling=tiling, preferred_element_type=rhs.dtype,
                     interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        tiling: tuple[int, int, int] = DEFAULT_TILING,
        preferred_element_type=jnp.float32, transpose_rhs: bool = False,
        interpret: bool | None = None, num_warps: int | None = 4,
        num_stages: int | None = 3) -> jax.Array:
    """Grouped matmul: out[r] = lhs[r] @ rhs[group(r)]; [M,K] x [G,K,N] -> [M,N].

    Rows of lhs are grouped by group, contiguously, in group order (group_sizes [G] int32);
    rows past sum(group_sizes) give 0 (and 0 gradient). With transpose_rhs, rhs is [G,N,K]
    and out[r] = lhs[r] @ rhs[group(r)]^T. Inputs bf16/fp16/fp32 (promoted to a common dtype),
    f32 accumulation, output dtype `preferred_element_type`. Differentiable in lhs and rhs
    (custom VJP: d_lhs by gmm with the transposed rhs, d_rhs by tgmm).
    `tiling` = (tm, tk, tn), powers of two >= 16 for Triton (shrunk for small dims);
    `interpret=None` means interpret on CPU only; num_warps / num_stages are Triton's.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"gmm expects lhs [M,K], rhs [G,K,N], group_sizes [G]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    kdim = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != kdim or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"gmm shape mismatch: lhs {lhs.shape}, rhs {rhs.shape} "
                         f"(transpose_rhs={transpose_rhs}), group_sizes {group_sizes.shape}")
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), tuple(tiling),
                jnp.dtype(preferred_element_type), bool(transpose_rhs), interpret,
                num_warps, num_stages)
