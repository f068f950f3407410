"""Next-token cross-entropy + z-loss computed in sequence chunks (SPEC §4), and the total loss.

The logits of a long sequence over a 200k vocabulary do not fit in memory (8192 × 200192 fp32
is 6.6 GB per sequence), so :func:`chunked_cross_entropy` scans over chunks of
``chunk_size`` sequence positions: each step computes fp32 logits ``[batch, chunk, vocab]``
from the final hidden state and the ``lm_head`` kernel, reduces them to per-token CE and
z-loss, and drops them. The chunk body is wrapped in ``jax.checkpoint`` so the backward pass
recomputes each chunk's logits instead of saving them. The batch axis is kept whole inside a
chunk, so a batch sharded over data-parallel devices stays sharded.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LossSums", "chunked_cross_entropy", "cross_entropy_reference", "combine_losses"]


class LossSums(NamedTuple):
    """Sums over the masked tokens of a (micro)batch; sums add across microbatches."""

    ce: jax.Array          # Σ_t m_t · (lse_t − logit_t[target])
    z: jax.Array           # Σ_t m_t · w · lse_t²
    count: jax.Array       # Σ_t m_t
    logit_max: jax.Array   # max logit over masked tokens (no gradient)
    logit_sum: jax.Array   # Σ_t m_t · mean_v logit_tv (no gradient)

    @property
    def logit_mean(self) -> jax.Array:
        return self.logit_sum / jnp.maximum(self.count, 1.0)

    def __add__(self, other: "LossSums") -> "LossSums":  # accumulate microbatches
        return LossSums(self.ce + other.ce, self.z + other.z, self.count + other.count,
                        jnp.maximum(self.logit_max, other.logit_max),
                        self.logit_sum + other.logit_sum)


def _token_losses(h, kernel, targets, mask, z_loss_weight):
    """h [B,C,d], kernel [d,V], targets/mask [B,C] -> LossSums of this chunk (fp32 logits)."""
    logits = jnp.einsum("bcd,dv->bcv", h, kernel.astype(h.dtype),
                        preferred_element_type=jnp.float32)          # [B, C, V] fp32
    lse = jax.nn.logsumexp(logits, axis=-1)                            # [B, C]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    ce = jnp.sum((lse - target_logit) * mask)
    z = jnp.sum(z_loss_weight * jnp.square(lse) * mask)
    sg = jax.lax.stop_gradient(logits)
    lmax = jnp.max(jnp.where(mask[..., None] > 0, sg, -jnp.inf))
    lsum = jnp.sum(jnp.mean(sg, axis=-1) * mask)
    return LossSums(ce, z, jnp.sum(mask), lmax, lsum)


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                          loss_mask: jax.Array, *, chunk_size: int = 1024,
                          z_loss_weight: float = 1e-6) -> LossSums:
    """CE and z-loss sums of ``hidden [B,S,d] @ kernel [d,V]`` without materialising [B,S,V].

    ``chunk_size`` is the number of sequence positions per chunk (a chunk holds
    ``B × chunk_size`` tokens); S is zero-padded (with mask 0) to a multiple of it.
    """
    b, s, d = hidden.shape
    c = min(chunk_size, s)
    n = -(-s // c)
    pad = n * c - s
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    if n == 1:
        return _token_losses(hidden, kernel, targets, loss_mask, z_loss_weight)

    def to_chunks(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.swapaxes(x.reshape((b, n, c) + x.shape[2:]), 0, 1)

    body = jax.checkpoint(
        lambda h, t, m: _token_losses(h, kernel, t, m, z_loss_weight), prevent_cse=False)

    def step(acc, xs):
        return acc + body(*xs), None

    zero = jnp.zeros((), jnp.float32)
    init = LossSums(zero, zero, zero, jnp.full((), -jnp.inf, jnp.float32), zero)
    out, _ = jax.lax.scan(step, init, (to_chunks(hidden), to_chunks(targets), to_chunks(loss_mask)))
    return out


def cross_entropy_reference(hidden, kernel, targets, loss_mask, *, z_loss_weight=1e-6) -> LossSums:
    """The naive full-logits version of :func:`chunked_cross_entropy` (tests, small models)."""
    return _token_losses(hidden, kernel, targets, loss_mask, z_loss_weight)


def combine_losses(sums: LossSums, balance: jax.Array, *, num_tokens: jax.Array,
                   balance_loss_weight: float, balance_scale: float = 1.0):
    """Total loss = Σce/N + Σz/N + α·Σ_layers balance (SPEC §4).

    ``num_tokens`` is the masked-token count of the *whole* step's batch, so microbatch
    losses add up to the full-batch loss; ``balance_scale`` is 1/microbatches for the same
    reason (the balance loss is an average over sequences). Returns (loss, parts dict).
    """
    n = jnp.maximum(num_tokens, 1.0)
    ce = sums.ce / n
    z = sums.z / n
    bal = balance_loss_weight * jnp.sum(balance) * balance_scale
    return ce + z + bal, {"ce": ce, "z_loss": z, "balance_loss": bal}
