"""Initialisers (SPEC §3): truncated normal at ±3σ with σ = 0.5/√d."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def truncated_normal_3sigma(std: float):
    """N(0, std²) truncated to ±3·std (no variance correction: σ is the report's σ)."""

    def init(key, shape, dtype=jnp.float32):
        if std == 0.0:
            return jnp.zeros(shape, dtype)
        return (std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)).astype(dtype)

    return init
