"""RMSNorm (SPEC §1.3): w * x / sqrt(mean(x^2) + eps), computed in fp32, gain w (not 1 + w)."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Normalise the last axis of `x` in fp32 and apply the gain; returns x's dtype (as HF)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * xf).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with an fp32 gain `scale` of shape [features]; `init_value` sets the initial gain."""

    eps: float = 1e-5
    init_value: float = 1.0
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init: Callable = nn.initializers.constant(self.init_value)
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        return rms_norm(x, scale, self.eps)
