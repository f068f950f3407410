"""Pure-JAX references for the Pallas kernels (the oracles the tests compare against).

Each function here computes exactly what its kernel computes, with plain `jax.numpy` /
`jax.lax` ops, in float32 (or the input dtype with float32 accumulation for the matmuls).
"""
from __future__ import annotations

from typing import NamedTuple

import functools

import jax
import jax.numpy as jnp


class RouteResult(NamedTuple):
    """Routing of T tokens to k of E experts (SPEC §1.6) plus the slot permutation.

    A *slot* is one (token, choice) pair; slot index = t * k + j.
    """
    weights: jax.Array        # [T, k] f32: route_scale * s_sel / (sum s_sel + 1e-20)
    experts: jax.Array        # [T, k] int32: chosen experts, best biased score first
    scores: jax.Array         # [T, E] f32: sigmoid(logits) (unbiased)
    dest: jax.Array           # [T*k] int32: position of each slot in expert-sorted order
    group_sizes: jax.Array    # [E] int32: slots routed to each expert (= token counts)
    group_offsets: jax.Array  # [E] int32: exclusive prefix sum of group_sizes

    @property
    def counts(self) -> jax.Array:
        """Per-expert token counts [E] (the same numbers as group_sizes)."""
        return self.group_sizes


@functools.partial(jax.jit, static_argnums=(2, 3))
def route_reference(logits: jax.Array, bias: jax.Array, k: int,
                    route_scale: float) -> RouteResult:
    """SPEC §1.6 routing with jax.lax.top_k (ties -> lowest expert index) and a stable sort."""
    logits = logits.astype(jnp.float32)                       # [T, E]
    num_tokens, num_experts = logits.shape
    scores = jax.nn.sigmoid(logits)                           # [T, E]
    _, experts = jax.lax.top_k(scores + bias.astype(jnp.float32)[None, :], k)   # [T, k]
    experts = experts.astype(jnp.int32)
    selected = jnp.take_along_axis(scores, experts, axis=1)   # [T, k]
    weights = selected / (selected.sum(axis=1, keepdims=True) + 1e-20) * route_scale
    flat = experts.reshape(-1)                                # [T*k], slot order t*k+j
    order = jnp.argsort(flat, stable=True)                    # sorted position -> slot
    dest = jnp.zeros_like(flat).at[order].set(jnp.arange(flat.shape[0], dtype=jnp.int32))
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    group_offsets = (jnp.cumsum(group_sizes) - group_sizes).astype(jnp.int32)
    del num_tokens
    return RouteResult(weights, experts, scores, dest, group_sizes, group_offsets)


def _row_groups(group_sizes: jax.Array, m: int) -> jax.Array:
    """Group id of every row [m]; rows past sum(group_sizes) get id G (no group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "transpose_rhs"))
def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                  preferred_element_type=jnp.float32,
                  transpose_rhs: bool = False) -> jax.Array:
    """out[r] = lhs[r] @ rhs[group(r)] (rows past sum(group_sizes) -> 0), f32 accumulation.

    lhs [M, K]; rhs [G, K, N] (or [G, N, K] with transpose_rhs); out [M, N].
    A masked dense formulation: every row against every group, then a one-hot select.
    """
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    num_groups = rhs.shape[0]
    gid = _row_groups(group_sizes, lhs.shape[0])                          # [M]
    onehot = (gid[:, None] == jnp.arange(num_groups)[None, :])            # [M, G]
    all_out = jnp.einsum("mk,gkn->mgn", lhs, rhs,
                         preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)             # [M, G, N]
    out = jnp.einsum("mgn,mg->mn", all_out, onehot.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(preferred_element_type)


@functools.partial(jax.jit, static_argnames=("preferred_element_type",))
def tgmm_reference(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array,
                   preferred_element_type=jnp.float32) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ grad[rows of g]: lhs [M, K], grad [M, N] -> [G, K, N]."""
    num_groups = group_sizes.shape[0]
    gid = _row_groups(group_sizes, lhs.shape[0])
    onehot = (gid[:, None] == jnp.arange(num_groups)[None, :]).astype(jnp.float32)
    lhs_g = lhs.astype(jnp.float32)[:, None, :] * onehot[:, :, None]         # [M, G, K]
    out = jnp.einsum("mgk,mn->gkn", lhs_g, grad.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(preferred_element_type)
