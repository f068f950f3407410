"""Pallas kernels for Trinity MoE, each beside its pure-JAX reference (reference.py).

- `route`: sigmoid top-k routing + stable expert grouping of token slots (routing.py);
  `group_slots`: the grouping alone, for given expert choices.
- `gmm` / `tgmm`: grouped matmul and its transpose, differentiable (gmm.py).

Kernels run through Pallas Triton on NVIDIA GPUs and in interpret mode on CPU
(`interpret=None` picks by backend). This package imports nothing from trinity_jax.
"""
from pallas_kernels.gmm import gmm, tgmm
from pallas_kernels.reference import (RouteResult, gmm_reference, route_reference,
                                      tgmm_reference)
from pallas_kernels.routing import SlotGroups, group_slots, route

__all__ = ["RouteResult", "SlotGroups", "gmm", "gmm_reference", "group_slots", "route",
           "route_reference", "tgmm", "tgmm_reference"]
