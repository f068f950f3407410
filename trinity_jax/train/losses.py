"""Next-token cross-entropy + z-loss computed in sequence chunks (SPEC §4), and the total loss.

The logits of a long sequence over a 200k vocabulary do not fit in memory (8192 × 200192 fp32
is 6.6 GB per sequence), so :func:`chunked_cross_entropy` walks over chunks of ``chunk_size``
sequence positions: each step computes fp32 logits ``[batch, chunk, vocab]`` from the final
hidden state and the ``lm_head`` kernel, reduces them to per-token CE and z-loss, and drops
them. The batch axis is kept whole inside a chunk, so a batch sharded over data-parallel
devices stays sharded.

Fused gradient. The differentiable output is one scalar, ``objective = Σ_t m_t (ce_t + w·lse_t²)``
(the step divides it by the token count). Its gradient with respect to the chunk's logits is
known as soon as the logits are, ``m_t ((1 + 2w·lse_t) softmax_t − onehot(target_t))``, so the
forward pass (under ``jax.grad``) computes ``d hidden`` and ``d kernel`` chunk by chunk right
there and keeps only those; the backward pass scales them by the incoming cotangent. That is
three matmuls per chunk and no ``[tokens, vocab]`` residual, against four (a recomputed chunk
under ``jax.checkpoint``) plus a scatter, a transposed copy and several vocab-sized passes for
autodiff. ``ce``, ``z`` and the logit statistics are reported without gradient.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from trinity_jax.model.mlp import dot_rows

__all__ = ["LossSums", "chunked_cross_entropy", "cross_entropy_reference", "combine_losses"]


class LossSums(NamedTuple):
    """Sums over the masked tokens of a (micro)batch; sums add across microbatches."""

    objective: jax.Array   # Σ_t m_t · (ce_t + z_t): the only field that carries a gradient
    ce: jax.Array          # Σ_t m_t · (lse_t − logit_t[target])
    z: jax.Array           # Σ_t m_t · w · lse_t²
    count: jax.Array       # Σ_t m_t
    logit_max: jax.Array   # max logit over masked tokens
    logit_sum: jax.Array   # Σ_t m_t · mean_v logit_tv

    @property
    def logit_mean(self) -> jax.Array:
        return self.logit_sum / jnp.maximum(self.count, 1.0)

    def __add__(self, other: "LossSums") -> "LossSums":  # accumulate chunks and microbatches
        return LossSums(self.objective + other.objective, self.ce + other.ce, self.z + other.z,
                        self.count + other.count, jnp.maximum(self.logit_max, other.logit_max),
                        self.logit_sum + other.logit_sum)

    @staticmethod
    def zeros() -> "LossSums":
        zero = jnp.zeros((), jnp.float32)
        return LossSums(zero, zero, zero, zero, jnp.full((), -jnp.inf, jnp.float32), zero)


def _chunk_sums(h, kernel, targets, mask, z_loss_weight, with_grad: bool):
    """One chunk: h [B,C,d], kernel [d,V], targets/mask [B,C] -> (LossSums, dh, dkernel).

    dh/dkernel (None unless ``with_grad``) are the gradients of Σ m (ce + z) for this chunk.
    The chunk's tokens are flattened to one axis [B·C, ...] so that ``dkernel`` is a dot with
    one contracting axis (over (B, C) XLA:CPU transposed h in a separate pass first)."""
    b, c, d = h.shape
    h, targets, mask = h.reshape(b * c, d), targets.reshape(b * c), mask.reshape(b * c)
    logits = jnp.einsum("td,dv->tv", h, kernel.astype(h.dtype),
                        preferred_element_type=jnp.float32)          # [B·C, V] fp32
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(l))[..., 0]                                     # [B·C]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    ce = jnp.sum((lse - target_logit) * mask)
    z = jnp.sum(z_loss_weight * jnp.square(lse) * mask)
    sums = LossSums(ce + z, ce, z, jnp.sum(mask), jnp.max(jnp.where(mask > 0, m[..., 0], -jnp.inf)),
                    jnp.sum(jnp.mean(logits, axis=-1) * mask))
    if not with_grad:
        return sums, None, None
    # d Σ m(ce + w lse²) / d logits = m ((1 + 2w lse) p − onehot(target)), p = e / l
    row = (mask * (1.0 + 2.0 * z_loss_weight * lse))[..., None] / l
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    dlogits = (row * e - jnp.where(onehot, mask[..., None], 0.0)).astype(h.dtype)
    dh = jnp.einsum("tv,dv->td", dlogits, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    dkernel = dot_rows(h, dlogits)
    return sums, dh.reshape(b, c, d), dkernel


def _pad_to_chunks(x, n, c):
    """[B, S, ...] -> [n, B, c, ...] (zero-padded to n·c positions)."""
    b, s = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, n * c - s)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((b, n, c) + x.shape[2:]), 0, 1)


def _losses(hidden, kernel, targets, loss_mask, chunk_size, z_loss_weight, with_grad):
    """All chunks: (LossSums, dhidden [B,S,d] | None, dkernel [d,V] | None)."""
    b, s, d = hidden.shape
    c = min(chunk_size, s)
    n = -(-s // c)
    if n == 1:
        return _chunk_sums(hidden, kernel, targets, loss_mask, z_loss_weight, with_grad)
    chunks = tuple(_pad_to_chunks(x, n, c) for x in (hidden, targets, loss_mask))

    def step(carry, xs):
        acc, dk = carry
        h, t, m = xs
        sums, dh, dkc = _chunk_sums(h, kernel, t, m, z_loss_weight, with_grad)
        return (acc + sums, dk if dkc is None else dk + dkc), dh

    init = (LossSums.zeros(), jnp.zeros(kernel.shape, jnp.float32) if with_grad else None)
    (sums, dkernel), dh = jax.lax.scan(step, init, chunks)
    if with_grad:
        dh = jnp.swapaxes(dh, 0, 1).reshape(b, n * c, d)[:, :s]
    return sums, dh, dkernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(hidden, kernel, targets, loss_mask, chunk_size, z_loss_weight):
    return _losses(hidden, kernel, targets, loss_mask, chunk_size, z_loss_weight, False)[0]


def _fused_fwd(hidden, kernel, targets, loss_mask, chunk_size, z_loss_weight):
    sums, dh, dk = _losses(hidden, kernel, targets, loss_mask, chunk_size, z_loss_weight, True)
    return sums, (dh.astype(hidden.dtype), dk.astype(kernel.dtype))


def _fused_bwd(chunk_size, z_loss_weight, res, ct: LossSums):
    dh, dk = res
    g = ct.objective              # the statistics carry no gradient: their cotangents are dropped
    return (g * dh).astype(dh.dtype), (g * dk).astype(dk.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                          loss_mask: jax.Array, *, chunk_size: int = 1024,
                          z_loss_weight: float = 1e-6) -> LossSums:
    """CE and z-loss sums of ``hidden [B,S,d] @ kernel [d,V]`` without materialising [B,S,V].

    ``chunk_size`` is the number of sequence positions per chunk (a chunk holds
    ``B × chunk_size`` tokens); S is zero-padded (with mask 0) to a multiple of it. Only
    ``objective`` (= ce + z) is differentiable, with the fused gradient described above.
    """
    return _fused(hidden, kernel, targets, loss_mask, int(chunk_size), float(z_loss_weight))


def cross_entropy_reference(hidden, kernel, targets, loss_mask, *, z_loss_weight=1e-6) -> LossSums:
    """The naive full-logits version by plain autodiff (every field differentiable): the oracle
    :func:`chunked_cross_entropy` is tested against."""
    logits = jnp.einsum("bsd,dv->bsv", hidden, kernel.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    ce = jnp.sum((lse - target_logit) * mask)
    z = jnp.sum(z_loss_weight * jnp.square(lse) * mask)
    sg = jax.lax.stop_gradient(logits)
    return LossSums(ce + z, ce, z, jnp.sum(mask), jnp.max(jnp.where(mask[..., None] > 0, sg, -jnp.inf)),
                    jnp.sum(jnp.mean(sg, axis=-1) * mask))


def combine_losses(sums: LossSums, balance: jax.Array, *, num_tokens: jax.Array,
                   balance_loss_weight: float, balance_scale: float = 1.0):
    """Total loss = Σce/N + Σz/N + α·Σ_layers balance (SPEC §4).

    ``num_tokens`` is the masked-token count of the *whole* step's batch, so microbatch
    losses add up to the full-batch loss; ``balance_scale`` is 1/microbatches for the same
    reason (the balance loss is an average over sequences). Returns (loss, parts dict).
    """
    n = jnp.maximum(num_tokens, 1.0)
    bal = balance_loss_weight * jnp.sum(balance) * balance_scale
    return sums.objective / n + bal, {"ce": sums.ce / n, "z_loss": sums.z / n, "balance_loss": bal}
