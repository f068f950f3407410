"""Expert parallelism: token-slots travel to the devices that own their experts and back.

Inside ``jax.shard_map`` over the 4-axis mesh, each device holds its rows of the tokens
(split over replica×fsdp×expert), their routing (``weights, experts [T,k]``, computed
outside by the model's ``route``), and the experts ``[E/ep, d, Im/tp]`` of its ``expert``
(and ``tensor``) coordinate. Per device:

1. slot s = t*k + j goes to expert-axis peer ``experts[s] // (E/ep)``;
2. ``all_to_all`` over 'expert' of fixed-size buffers ``[ep, C, d]`` (plus the local expert
   id of each row). C = T*k (every local slot: nothing can drop, the default) or, with
   ``buffer_factor`` f > 0, C = ceil(f * T*k / ep) (f × the average per peer); slots past
   C for one peer are dropped in token order, deterministically, and counted;
3. the local experts run on the received rows through the model's MoE implementation
   registry (``local_impl``; padding rows get weight 0);
4. ``all_to_all`` back, combine with the gate weights in fp32; with ``tensor`` > 1 each
   device computed a slice of the expert width, so the partial outputs are ``psum``-ed.

``exchange='ragged'`` sends only the occupied rows with ``jax.lax.ragged_all_to_all``
(GPU/TPU; UNIMPLEMENTED on XLA:CPU). Its offset logic is tested on CPU through
``ragged_all_to_all_emulated``, a dense-``all_to_all`` emulation with the same semantics.

Gradients: everything is differentiable; expert-weight gradients are summed over the data
axes by shard_map's transpose (the weights are invariant over replica/fsdp inside it).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from trinity_jax.parallel.mesh import DATA_AXES

__all__ = ["expert_parallel_moe", "moe_dispatch", "ep_options", "buffer_rows",
           "ragged_all_to_all_emulated", "current_mesh"]

_BUFFER_FACTOR = contextvars.ContextVar("trinity_ep_buffer_factor", default=0.0)
_EXCHANGE = contextvars.ContextVar("trinity_ep_exchange", default="all_to_all")


@contextlib.contextmanager
def ep_options(buffer_factor: float = 0.0, exchange: str = "all_to_all"):
    """Defaults for ``moe_dispatch`` while tracing (set by ``rules.use_mesh`` from MeshConfig)."""
    if exchange not in ("all_to_all", "ragged", "ragged_emulated"):
        raise ValueError(f"exchange={exchange!r}: allowed all_to_all, ragged, ragged_emulated")
    t1, t2 = _BUFFER_FACTOR.set(float(buffer_factor)), _EXCHANGE.set(exchange)
    try:
        yield
    finally:
        _BUFFER_FACTOR.reset(t1)
        _EXCHANGE.reset(t2)


def current_mesh():
    """The mesh set by ``jax.set_mesh`` (the concrete one when available), or None."""
    try:
        m = jax.sharding.get_mesh()
        if m is not None and not m.empty:
            return m
    except Exception:  # pragma: no cover - only an abstract mesh is set
        pass
    m = jax.sharding.get_abstract_mesh()
    return None if m.empty else m


def buffer_rows(slots: int, ep: int, buffer_factor: float) -> int:
    """Rows per destination peer: all local slots (dropless) or ceil(f * slots / ep)."""
    if buffer_factor <= 0:
        return slots
    return max(1, min(slots, math.ceil(buffer_factor * slots / ep)))


def _resolve_impl(local_impl) -> Callable:
    if callable(local_impl):
        return local_impl
    from trinity_jax.model.moe import get_moe_impl   # lazy: model/ imports this module
    return get_moe_impl(local_impl or "auto")


def moe_dispatch(x, w, weights, experts, *, num_experts: int, impl: Union[str, Callable, None] = None,
                 capacity_factor: float = 0.0):
    """The model's hook: expert-parallel when a multi-device mesh is active, else ``impl`` directly.

    Same signature and result as a registry impl: ``(y [T,d], dropped fraction)``.
    """
    impl_fn = _resolve_impl(impl)
    mesh = current_mesh()
    if getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()):   # already inside a shard_map
        mesh = None
    if (mesh is None or mesh.size == 1 or "expert" not in mesh.axis_names
            or x.shape[0] % math.prod(mesh.shape[a] for a in DATA_AXES)):
        # no mesh, one device, or a token count the data axes don't divide (e.g. the
        # 1-sequence dummy batch of init): GSPMD runs the plain implementation.
        return impl_fn(x, w, weights, experts, num_experts=num_experts,
                       capacity_factor=capacity_factor)
    return expert_parallel_moe(x, w, weights, experts, num_experts=num_experts, mesh=mesh,
                               local_impl=impl_fn, buffer_factor=_BUFFER_FACTOR.get(),
                               capacity_factor=capacity_factor, exchange=_EXCHANGE.get())


def expert_parallel_moe(x, w, weights, experts, *, num_experts: int, mesh=None,
                        local_impl: Union[str, Callable, None] = None, buffer_factor: float = 0.0,
                        capacity_factor: float = 0.0, exchange: str = "all_to_all"):
    """Routed-expert output of ``x [T,d]`` with the experts split over the mesh 'expert' axis.

    ``w`` is an ``ExpertWeights(gate [E,d,Im], up [E,d,Im], down [E,Im,d])``; ``weights`` /
    ``experts [T,k]`` come from ``route``. Returns ``(y [T,d] fp32, dropped)`` where dropped
    is the global fraction of token-slots not computed (buffer overflow with
    ``buffer_factor`` > 0 or per-shard ``capacity_factor`` dropping; 0 by default).
    """
    mesh = mesh if mesh is not None else current_mesh()
    if mesh is None:
        raise ValueError("expert_parallel_moe needs a mesh: pass mesh= or use jax.set_mesh")
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    if num_experts % ep:
        raise ValueError(f"mesh.expert={ep} must divide model.num_experts={num_experts}")
    impl = _resolve_impl(local_impl)
    data = P(DATA_AXES, None)
    w_specs = type(w)(P("expert", None, "tensor"), P("expert", None, "tensor"),
                      P("expert", "tensor", None))
    body = _make_body(impl, num_experts, ep, tp, buffer_factor, capacity_factor, exchange)
    return jax.shard_map(body, mesh=mesh, in_specs=(data, w_specs, data, data),
                         out_specs=(data, P()), check_vma=True)(x, w, weights, experts)


def _make_body(impl, num_experts, ep, tp, buffer_factor, capacity_factor, exchange):
    e_loc = num_experts // ep

    def body(x, w, weights, experts):
        t, k = experts.shape
        d = x.shape[-1]
        n = t * k
        flat_e = experts.reshape(-1)
        send = jnp.ones((n,), bool)
        if capacity_factor and capacity_factor > 0:
            from trinity_jax.model.moe import capacity_keep
            send = capacity_keep(experts, num_experts, capacity_factor)[0].reshape(-1)
        if ep == 1 and exchange == "all_to_all":                  # no peers: run locally
            y, _ = impl(x, w, weights * send.reshape(t, k), experts, num_experts=e_loc,
                        capacity_factor=0.0)
            sent = send
        else:
            if exchange == "all_to_all":
                y_slots, sent = _exchange_dense(impl, x, w, flat_e, send, k, e_loc, ep,
                                                buffer_rows(n, ep, buffer_factor))
            else:
                a2a = (jax.lax.ragged_all_to_all if exchange == "ragged"
                       else ragged_all_to_all_emulated)
                y_slots, sent = _exchange_ragged(impl, x, w, flat_e, send, k, e_loc, ep,
                                                 buffer_factor, a2a)
            y = jnp.sum(y_slots.reshape(t, k, d).astype(jnp.float32)
                        * (weights * sent.reshape(t, k)).astype(jnp.float32)[..., None], axis=1)
        # tensor > 1: each device holds a slice of the expert width -> partial sums.
        # (size 1: marks y invariant over 'tensor' for shard_map's check_vma)
        y = jax.lax.psum(y.astype(jnp.float32), "tensor")
        dropped = 1.0 - jnp.mean(sent.astype(jnp.float32))
        dropped = jax.lax.pmean(dropped, DATA_AXES)
        return y, dropped

    return body


def _run_local(impl, rows, w, ids, valid, e_loc):
    """Local experts on rows [N,d] with local expert ids [N]; invalid rows give 0."""
    y, _ = impl(rows, w, valid.astype(jnp.float32)[:, None], jnp.where(valid, ids, 0)[:, None],
                num_experts=e_loc, capacity_factor=0.0)
    return y.astype(rows.dtype)     # weight 1 per valid row: exact in the compute dtype


def _exchange_dense(impl, x, w, flat_e, send, k, e_loc, ep, cap):
    """Fixed-size buffers [ep, cap, d] through all_to_all; returns (y per slot [N,d], sent [N])."""
    n, d = flat_e.shape[0], x.shape[-1]
    dst = flat_e // e_loc
    onehot = (dst[:, None] == jnp.arange(ep)[None, :]) & send[:, None]          # [N, ep]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0, dtype=jnp.int32), dst[:, None], 1)[:, 0] - 1
    sent = send & (rank < cap)
    pos = jnp.where(sent, dst * cap + rank, ep * cap)                             # buffer row of each slot
    src = jnp.full((ep * cap + 1,), n, jnp.int32).at[pos].set(jnp.arange(n, dtype=jnp.int32))[:-1]
    row_ok = src < n
    src_c = jnp.where(row_ok, src, 0)
    send_x = jnp.where(row_ok[:, None], x[src_c // k], 0).reshape(ep, cap, d)
    send_id = jnp.where(row_ok, flat_e[src_c] % e_loc, 0).reshape(ep, cap)
    a2a = lambda a: jax.lax.all_to_all(a, "expert", 0, 0, tiled=True)
    recv_x, recv_id, recv_ok = a2a(send_x), a2a(send_id), a2a(row_ok.reshape(ep, cap))
    y_rows = _run_local(impl, recv_x.reshape(ep * cap, d), w, recv_id.reshape(-1),
                        recv_ok.reshape(-1), e_loc)
    back = a2a(y_rows.reshape(ep, cap, d)).reshape(ep * cap, d)
    back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)], axis=0)
    return back[pos], sent


def _exchange_ragged(impl, x, w, flat_e, send, k, e_loc, ep, buffer_factor, a2a):
    """Only occupied rows travel (ragged_all_to_all); receive buffer ep*N rows or ceil(f*N)."""
    n, d = flat_e.shape[0], x.shape[-1]
    dst = jnp.where(send, flat_e // e_loc, ep)                                  # ep = not sent
    order = jnp.argsort(dst, stable=True).astype(jnp.int32)                     # slots grouped by peer
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    counts = jnp.zeros((ep + 1,), jnp.int32).at[dst].add(1)[:ep]                # [ep] rows per peer
    in_off = jnp.cumsum(counts) - counts                                         # where each peer's rows start
    r = ep * n if buffer_factor <= 0 else max(1, math.ceil(buffer_factor * n))   # receive rows
    all_counts = jax.lax.all_gather(counts, "expert")                            # [src, dst]
    before = jnp.cumsum(all_counts, axis=0) - all_counts                         # rows from earlier sources
    clipped = jnp.clip(r - before, 0, all_counts)                                # what fits at each receiver
    me = jax.lax.axis_index("expert")
    send_sizes, recv_sizes = clipped[me], clipped[:, me]
    out_off = jnp.minimum(before[me], r - 1)                                     # at each receiver
    rank = inverse - jnp.where(dst < ep, in_off[jnp.minimum(dst, ep - 1)], n)
    sent = send & (rank < send_sizes[jnp.minimum(dst, ep - 1)])
    xs = x[order // k]                                                           # [N, d] grouped by peer
    ids = (flat_e % e_loc)[order]
    recv_x = a2a(xs, jnp.zeros((r, d), x.dtype), in_off, send_sizes, out_off, recv_sizes,
                 axis_name="expert")
    recv_id = a2a(ids, jnp.zeros((r,), ids.dtype), in_off, send_sizes, out_off, recv_sizes,
                  axis_name="expert")
    recv_ok = jnp.arange(r) < jnp.sum(recv_sizes)
    y_rows = _run_local(impl, recv_x, w, recv_id, recv_ok, e_loc)                # [r, d]
    # send back: the transpose of the forward exchange
    back_in_off = jax.lax.all_to_all(out_off, "expert", 0, 0, tiled=True)
    back_out_off = jax.lax.all_to_all(in_off, "expert", 0, 0, tiled=True)
    back = a2a(y_rows, jnp.zeros((n, d), y_rows.dtype), back_in_off, recv_sizes, back_out_off,
               send_sizes, axis_name="expert")                                   # [N, d] grouped by peer
    return jnp.where(sent[:, None], back[inverse], 0), sent


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all`` semantics from a dense all_to_all (runs on XLA:CPU).

    One slice per peer (len(offsets) == axis size); each slice padded to operand rows.
    """
    n = operand.shape[0]
    m = output.shape[0]
    peers = input_offsets.shape[0]
    cmax = n
    ar = jnp.arange(cmax)
    idx = input_offsets[:, None] + ar[None, :]                                   # [peers, cmax]
    ok = ar[None, :] < send_sizes[:, None]
    tail = (1,) * (operand.ndim - 1)
    chunks = jnp.where(ok.reshape(ok.shape + tail), operand[jnp.clip(idx, 0, n - 1)], 0)
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)               # [src, cmax, ...]
    offs = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)       # where src writes here
    pos = offs[:, None] + ar[None, :]
    put = ar[None, :] < recv_sizes[:, None]
    pos = jnp.where(put, pos, m).reshape(-1)                                     # m = out of range
    covered = jnp.zeros((m,), bool).at[pos].set(True, mode="drop")
    base = jnp.where(covered.reshape((m,) + tail), jnp.zeros_like(output), output)
    return base.at[pos].add(recv.reshape((peers * cmax,) + operand.shape[1:]), mode="drop")
