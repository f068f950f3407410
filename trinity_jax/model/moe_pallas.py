"""The `pallas` MoE implementation: Pallas slot grouping + Pallas grouped matmuls (dropless).

token-slots (slot = t*k + j) -> stable counting sort by expert (`pallas_kernels.group_slots`)
-> gather rows into expert order -> gmm(gate), gmm(up) -> silu(gate) * up -> gmm(down)
-> back to slot order -> weighted sum over the k choices (fp32).

The two permutations have custom VJPs whose backward passes are gathers with the inverse
permutation (no scatter-add), as in MaxText's `_sort_activations`. Registered as 'pallas'
in the MoE registry of `trinity_jax.model.moe`; on CPU the kernels run in interpret mode
(correct but slow: `block_sparse` is the CPU default).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gmm, group_slots
from trinity_jax.model.moe import ExpertWeights, capacity_keep, from_rows, register_moe_impl, to_rows


@register_moe_impl("pallas")
def moe_pallas(x, w: ExpertWeights, weights, experts, *, num_experts, capacity_factor=0.0,
               tiling: tuple[int, int, int] | None = None):
    """Pallas routed experts: x [T,d], weights/experts [T,k] -> (y [T,d] f32, dropped fraction)."""
    if capacity_factor and capacity_factor > 0:
        keep, dropped = capacity_keep(experts, num_experts, capacity_factor)
        weights = jnp.where(keep, weights, 0.0)
    else:
        dropped = jnp.float32(0.0)
    t, k = experts.shape
    n = t * k
    groups = group_slots(experts.astype(jnp.int32), num_experts)
    order = jnp.zeros((n,), jnp.int32).at[groups.dest].set(jnp.arange(n, dtype=jnp.int32))
    dt = x.dtype
    mm = functools.partial(gmm, group_sizes=groups.group_sizes, preferred_element_type=dt,
                           **({"tiling": tiling} if tiling else {}))
    xs = to_rows(x, groups.dest, order, k)                                # [N, d]
    h = jax.nn.silu(mm(xs, w.gate.astype(dt))) * mm(xs, w.up.astype(dt))  # [N, Im]
    ys = mm(h, w.down.astype(dt))                                         # [N, d]
    y_slots = from_rows(ys, groups.dest, order).reshape(t, k, -1)         # [T, k, d]
    y = jnp.sum(y_slots.astype(jnp.float32) * weights[..., None].astype(jnp.float32), axis=1)
    return y, dropped
