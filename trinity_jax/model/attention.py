"""Gated GQA attention with QK-norm, RoPE on local layers and NoPE on global layers (SPEC §1.4)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from trinity_jax.config import ModelConfig
from trinity_jax.model.mlp import Linear, dot_rows, f32_result_dots, own_buffer, transposed
from trinity_jax.model.norms import RMSNorm

_NEG_INF = -1e30


def rope_frequencies(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim] for neox (rotate-half) RoPE over the full head_dim, in fp32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq            # [..., dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                           # [..., dh]
    return jnp.cos(emb), jnp.sin(emb)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """:func:`rope_frequencies`, evaluated once into buffers that every layer reads.

    XLA:CPU evaluates cos and sin with scalar libm calls (~10 ns an element, against ~0.3 ns
    for a multiply-add) and fuses them into their consumers — every layer's q and k RoPE,
    forward and backward, once per head — which cost ~6 ms per [8, 512, 4, 64] query rotation
    instead of ~0.5 ms. An `optimization_barrier` does not stop it (XLA:CPU drops barriers
    before fusion); a conditional's operands are never fused into it, so on CPU the tables go
    through one whose two branches return the same values (the first passes its operand
    through; the second, which only runs for negative positions, recomputes it). Other
    backends fuse cheap transcendentals well: the tables are returned as they are.
    """
    tables = rope_frequencies(positions, head_dim, theta)
    if jax.default_backend() != "cpu":
        return tables
    return jax.lax.cond(jnp.min(positions) >= 0, lambda t, p: t,
                        lambda t, p: rope_frequencies(p, head_dim, theta), tables, positions)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [b, s, h, dh] rotated by cos/sin [b, s, dh] (rotate-half convention, as HF), computed
    in fp32 and rounded once to x's dtype.

    Custom VJP: the backward is the transposed rotation g·cos + rotᵀ(g·sin), also in fp32 with
    one rounding. Autodiff in 16-bit rounded each of the rotation's steps (split, negate,
    concatenate, two products, a sum) and their transposes, and XLA:CPU ran that chain as one
    loop of bf16↔f32 conversions: 10.7 ms for one bench layer's q cotangent, against ~1 ms.
    """
    return _rope(x, cos, sin)


def _rotate_half(x: jax.Array, transpose: bool = False) -> jax.Array:
    """[x1, x2] -> [-x2, x1] (the rotation), or [x2, -x1] (its transpose)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x2, -x1] if transpose else [-x2, x1], axis=-1)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, transpose: bool = False) -> jax.Array:
    """x·cos + rot(x)·sin, or its transpose g·cos + rotᵀ(g·sin), in fp32 -> x's dtype."""
    f32 = jnp.float32
    xf, c, s = x.astype(f32), cos[:, :, None, :].astype(f32), sin[:, :, None, :].astype(f32)
    if transpose:
        return (xf * c + _rotate_half(xf * s, transpose=True)).astype(x.dtype)
    return (xf * c + _rotate_half(xf) * s).astype(x.dtype)


@jax.custom_vjp
def _rope(x, cos, sin):
    return _rotate(x, cos, sin)


def _rope_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rope_bwd(res, g):
    cos, sin = res
    return _rotate(g, cos, sin, transpose=True), None, None   # tables: functions of positions


_rope.defvjp(_rope_fwd, _rope_bwd)


def attention_mask(q_index: jax.Array, k_index: jax.Array, q_segment: jax.Array, k_segment: jax.Array,
                   window: jax.Array | int | None) -> jax.Array:
    """Boolean [..., q, k]: causal, same document, and (if `window`) t − w < s ≤ t (SPEC §1.2).

    `window` may be a traced scalar; a value <= 0 means no window (global layer).
    """
    qi, ki = q_index[..., :, None], k_index[..., None, :]
    mask = (ki <= qi) & (q_segment[..., :, None] == k_segment[..., None, :])
    if window is not None:
        w = jnp.asarray(window)
        mask &= (w <= 0) | (ki > qi - w)
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [b, t, hq, dh], k/v [b, s, hkv, dh], mask [..., t, s] -> [b, t, hq, dh]; softmax in fp32.

    Query head i reads kv head i // (hq / hkv) (GQA). Leading axes of q/k/v/mask beyond the
    first broadcast like the batch axis.

    Layout: the g = hq / hkv query heads that share a kv head are folded into the query rows,
    q -> [..., hkv, t·g, dh] and k/v -> [..., hkv, s, dh], so every product of the forward and
    the backward is a plain batched matmul (batch ..., hkv) and nothing of score size
    [t·g, s] is ever transposed (an einsum over [..., hkv, g, t, s] made XLA:CPU transpose the
    score-sized gradient for dK — a third of the attention time).

    Custom VJP (memory-efficient attention): the forward keeps only q, k, v, the mask, the
    output and the fp32 log-sum-exp per row; the backward recomputes the probabilities from
    them. Autodiff would keep the fp32 scores, probabilities and a broadcast mask per head and
    layer — under `nn.scan` stacked over layers, and under `lax.cond` (local_blocks) for both
    branches — which dominated the step time on CPU.
    """
    *lead, t, hq, dh = q.shape
    n = len(lead)
    out = _attention(_rows(q, k.shape[-2]), jnp.moveaxis(k, n + 1, n), jnp.moveaxis(v, n + 1, n),
                     mask[..., None, :, :])[0]                               # [..., hkv, t·g, dh]
    return _unrows(out, t)


def _rows(q: jax.Array, hkv: int) -> jax.Array:
    """q [..., t, hq, dh] -> [..., hkv, t·g, dh]: the g query heads of a kv head become rows."""
    *lead, t, hq, dh = q.shape
    n = len(lead)
    return jnp.moveaxis(q.reshape(*lead, t, hkv, hq // hkv, dh), n + 1, n).reshape(
        *lead, hkv, t * (hq // hkv), dh)


def _unrows(out: jax.Array, t: int) -> jax.Array:
    """Inverse of :func:`_rows`: [..., hkv, t·g, dh] -> [..., t, hq, dh]."""
    *lead, hkv, r, dh = out.shape
    n = len(lead)
    return jnp.moveaxis(out.reshape(*lead, hkv, t, r // t, dh), n, n + 1).reshape(
        *lead, t, hkv * (r // t), dh)


def _probs(q, k, mask, lse=None):
    """Scaled masked scores of q [..., hkv, t·g, dh] and k [..., hkv, s, dh] under mask
    [..., 1 | hkv, t, s] (rows are (t, g) pairs). Forward (no `lse`): (exp(scores − rowmax),
    row sums, lse [..., hkv, t·g]); backward (given `lse`): the probabilities, fp32."""
    *lead, h, r, dh = q.shape
    t, s = mask.shape[-2:]
    scores = jnp.einsum("...rd,...sd->...rs", q, k, preferred_element_type=jnp.float32) * (dh ** -0.5)
    scores = scores.reshape(*lead, h, t, r // t, s)                        # a bitcast: rows are (t, g)
    scores = jnp.where(mask[..., :, None, :], scores, _NEG_INF).reshape(*lead, h, r, s)
    if lse is None:   # forward: unnormalised exp(s - max) and the row sums
        m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        e = jnp.exp(scores - m)
        l = jnp.sum(e, axis=-1, keepdims=True)
        return e, l, (m + jnp.log(l))[..., 0]
    return jnp.exp(scores - lse[..., None])


def _attention(q, k, v, mask):
    """Masked softmax attention of q [..., r, dh] on k, v [..., s, dh] -> (out, lse); see
    `_attention_core`. In 16-bit on XLA:CPU q, k and v first get buffers of their own:
    they arrive with their heads moved before the rows (and the causal blocks' last key range
    is all of k), and XLA folds such a transpose into the products, which then contract a
    non-minor axis and are upcast to f32 dots."""
    if f32_result_dots(q.dtype):
        q, k, v = (own_buffer(a) for a in (q, k, v))
    return _attention_core(q, k, v, mask)


@jax.custom_vjp
def _attention_core(q, k, v, mask):
    e, l, lse = _probs(q, k, mask)
    # normalise the [.., t·g, dh] output rather than the [.., t·g, s] probabilities: one pass less
    out = jnp.einsum("...rs,...sd->...rd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / l).astype(v.dtype), lse


def _attention_fwd(q, k, v, mask):
    out, lse = _attention_core(q, k, v, mask)
    return (out, lse), (q, k, v, mask, out, lse)


def _attention_bwd(res, cts):
    q, k, v, mask, out, lse = res
    dout = cts[0]                      # the lse output is internal: its cotangent is ignored
    dh = q.shape[-1]
    f32 = jnp.float32
    probs = _probs(q, k, mask, lse)
    dp = jnp.einsum("...rd,...sd->...rs", dout, v, preferred_element_type=f32)
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    # dS without the softmax scale: it goes on dQ and dK ([.., dh]-sized). On the scores,
    # XLA:CPU materialised it as a score-sized fp32 constant for the library's fused kernel.
    ds = (probs * (dp - delta)).astype(q.dtype)
    dq = jnp.einsum("...rs,...sd->...rd", ds, k, preferred_element_type=f32) * (dh ** -0.5)
    p = probs.astype(v.dtype)
    if f32_result_dots(q.dtype):
        # dV = Pᵀ dO and dK = dSᵀ Q contract the rows, which XLA:CPU upcasts to f32 dots in
        # bf16; as dVᵀ = dOᵀ P and dKᵀ = Qᵀ dS only [.., r | s, dh]-sized arrays are transposed
        # (through `transposed` both ways: XLA folds a plain transpose of the result back too).
        dv, dk = (transposed(dot_rows(a, b)) for a, b in ((dout, p), (q, ds)))
    else:
        dv = jnp.einsum("...rs,...rd->...sd", p, dout, preferred_element_type=f32)
        dk = jnp.einsum("...rs,...rd->...sd", ds, q, preferred_element_type=f32)
    return dq.astype(q.dtype), (dk * (dh ** -0.5)).astype(k.dtype), dv.astype(v.dtype), None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


def local_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                          window: int, split: int | None = None) -> jax.Array:
    """Sliding-window self-attention in query blocks of c = w / `split` rows: O(t·(w + c)).

    Row t attends to t − w < s ≤ t, so a query block [i·c, (i+1)·c) needs only key blocks
    i − split, ..., i (w + c keys). The default `split` is 2 for w ≥ 128 (1.5w scores a row
    instead of 2w: 15% faster forward+backward at w = 128 on CPU, where 4 was no better) and 1
    below (smaller blocks cost more compile time than they save). The
    sequence is padded to a multiple of c (padding rows are their own document and are
    dropped); the missing blocks before block 0 are a document of their own (segment -2), so
    `attention_mask` on the blocks' own indices gives the same mask as on the whole sequence.
    """
    b, t, hq, dh = q.shape
    w = int(window)
    split = max(1, min(int(split if split is not None else (2 if w >= 128 else 1)), w))
    while w % split:
        split -= 1
    c = w // split
    pad = -t % c
    if pad:
        padt = lambda a, value=0: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),  # noqa: E731
                                          constant_values=value)
        q, k, v, segment_ids = padt(q), padt(k), padt(v), padt(segment_ids, -1)
    n = (t + pad) // c
    hkv = k.shape[2]
    # heads-first, then blocks: q [b, hkv, n, c·g, dh], k/v [b, hkv, n, w+c, dh], mask [b, 1, n, c, w+c]
    qb = _rows(q, hkv).reshape(b, hkv, n, -1, dh)
    kv_blocks = lambda a: _kv_windows(jnp.moveaxis(a, 2, 1).reshape(b, hkv, n, c, dh), split)  # noqa: E731
    index = jnp.broadcast_to(jnp.arange(n * c, dtype=jnp.int32), (b, n * c)).reshape(b, n, c)
    qseg = segment_ids.reshape(b, n, c)
    mask = attention_mask(index, _with_previous(index, 1, split), qseg,
                          _with_previous(qseg, 1, split, -2), w)
    out = _attention(qb, kv_blocks(k), kv_blocks(v), mask[:, None])[0]       # [b, hkv, n, c·g, dh]
    return _unrows(out.reshape(b, hkv, -1, dh), n * c)[:, :t]


def _with_previous(a: jax.Array, axis: int, split: int, fill=0) -> jax.Array:
    """Blocks on `axis` -> for each block i, blocks i − split, ..., i side by side on axis + 1
    (`fill` before block 0)."""
    n = a.shape[axis]
    lead = jnp.full_like(jax.lax.slice_in_dim(a, 0, 1, axis=axis), fill)
    padded = jnp.concatenate([lead] * split + [a], axis=axis)
    return jnp.concatenate([jax.lax.slice_in_dim(padded, j, j + n, axis=axis)
                            for j in range(split + 1)], axis=axis + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _kv_windows(a: jax.Array, split: int) -> jax.Array:
    """Key/value blocks [b, h, n, c, dh] -> windows [b, h, n, (split+1)·c, dh] (`_with_previous`
    on the block axis, zeros before block 0).

    Custom VJP: each block's cotangent is the sum of its split + 1 copies, added in fp32 and
    rounded once. Autodiff added them in the compute dtype, rounding after every pad and sum,
    and XLA:CPU ran that chain of conversions as one loop with the heads' transpose."""
    return _with_previous(a, 2, split)


def _kv_windows_fwd(a, split):
    return _kv_windows(a, split), None


def _kv_windows_bwd(split, _, g):
    c = g.shape[3] // (split + 1)
    zeros = [(0, 0)] * g.ndim
    da = None
    for j in range(split + 1):          # part j of window i is block i - (split - j)
        shift = split - j
        part = g[:, :, shift:, j * c:(j + 1) * c].astype(jnp.float32)
        part = jnp.pad(part, zeros[:2] + [(0, shift)] + zeros[3:]) if shift else part
        da = part if da is None else da + part
    return (da.astype(g.dtype),)


_kv_windows.defvjp(_kv_windows_fwd, _kv_windows_bwd)


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                           blocks: int = 8, min_rows: int = 128) -> jax.Array:
    """Global (causal, document-masked) self-attention in n ≤ `blocks` query blocks of at least
    `min_rows` rows: block i attends only to keys [0, end of block i), so the fully masked upper
    triangle is skipped — (n+1)/(2n) of the full matrix's work (5/8 at n = 4: forward+backward
    82 -> 54 ms at t = 512 on CPU). Same result as the full masked matrix (window 0). Below
    n = 4 (a saving under 3/8) the extra ops cost more compile time than they save, so it is
    one block: the full matrix.
    """
    b, t, hq, dh = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    n = min(blocks, t // max(1, min_rows))
    n = n if n >= 4 else 1
    c = -(-t // n)
    qr, kh, vh = _rows(q, hkv), jnp.moveaxis(k, 2, 1), jnp.moveaxis(v, 2, 1)
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    outs = []
    for lo in range(0, t, c):
        hi = min(t, lo + c)
        mask = attention_mask(index[:, lo:hi], index[:, :hi], segment_ids[:, lo:hi],
                              segment_ids[:, :hi], None)                         # [b, hi-lo, hi]
        outs.append(_attention(qr[:, :, lo * g:hi * g], kh[:, :, :hi], vh[:, :, :hi],
                               mask[:, None])[0])
    return _unrows(jnp.concatenate(outs, axis=2), t)


def resolve_attention_impl(impl: str, seq_len: int, window: int) -> str:
    """`model.attention_impl` for a sequence length: auto -> local_blocks when the window is at
    most half the sequence (blocks then skip work), else xla (the full masked matrix)."""
    if impl == "auto":
        return "local_blocks" if 0 < window and 2 * window <= seq_len else "xla"
    return impl


def self_attention(q, k, v, segment_ids, is_global, window: int, impl: str) -> jax.Array:
    """Masked self-attention of one layer; `is_global` (traced) picks global vs sliding window.

    impl: `xla` (full masked matrix), `local_blocks` (local layers in blocks of w, global ones
    in causal query blocks; `lax.cond` on the layer's flag), `dot_product_attention`
    (`jax.nn.dot_product_attention`: cuDNN on GPU).
    """
    b, s = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    impl = resolve_attention_impl(impl, s, window)

    def full(q, k, v, segment_ids, w):
        mask = attention_mask(index, index, segment_ids, segment_ids, w)
        if impl == "dot_product_attention":
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
        return dot_product_attention(q, k, v, mask)

    if impl == "local_blocks" and window > 0:
        return jax.lax.cond(is_global, causal_block_attention,
                            lambda q, k, v, seg: local_block_attention(q, k, v, seg, window),
                            q, k, v, segment_ids)
    return full(q, k, v, segment_ids, jnp.where(is_global, 0, window))


class Attention(nn.Module):
    """Gated GQA attention: o = Wo(attn(x) * sigmoid(Wg x)); QK-norm before RoPE."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, is_global: jax.Array, rope: tuple[jax.Array, jax.Array],
                 segment_ids: jax.Array) -> jax.Array:
        """`rope` = ``rope_frequencies(positions, head_dim, rope_theta)``, computed once per
        forward by the caller rather than in every layer."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, s, _ = x.shape
        hq, hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.sigma
        q = Linear(hq * dh, ("embed", "q_heads"), std, dtype, name="q_proj")(x).reshape(b, s, hq, dh)
        k = Linear(hkv * dh, ("embed", "kv_heads"), std, dtype, name="k_proj")(x).reshape(b, s, hkv, dh)
        v = Linear(hkv * dh, ("embed", "kv_heads"), std, dtype, name="v_proj")(x).reshape(b, s, hkv, dh)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, axis_name="head_dim", name="k_norm")(k)
        # RoPE only on local layers (NoPE on global) unless the ablation puts RoPE everywhere.
        # NoPE is the identity rotation (cos 1, sin 0: exact in fp32), chosen on the [b, s, dh]
        # tables rather than by a select over q and k and, in the backward, their cotangents.
        cos, sin = rope
        if cfg.nope_global:
            cos, sin = jnp.where(is_global, 1.0, cos), jnp.where(is_global, 0.0, sin)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", None))
        k = nn.with_logical_constraint(k, ("act_batch", "act_seq", "act_kv_heads", None))
        out = self_attention(q, k, v, segment_ids, is_global, cfg.sliding_window,
                             cfg.attention_impl).reshape(b, s, hq * dh)
        out = checkpoint_name(out, "attn_out")
        if cfg.attention_gate:
            gate = Linear(hq * dh, ("embed", "q_heads"), std, dtype, name="gate_proj")(x)
            out = out * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(out.dtype)
        return Linear(cfg.hidden_size, ("q_heads", "embed"), std, dtype, name="o_proj")(out)
