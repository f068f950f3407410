"""SwiGLU feed-forward (SPEC §1.5): down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from trinity_jax.model.initializers import truncated_normal_3sigma


class Linear(nn.Module):
    """Bias-free projection with an fp32 `kernel` [in, out] and logical axis names."""

    features: int
    axes: tuple[str, str]
    std: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(truncated_normal_3sigma(self.std), self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        # Tokens flattened to one axis: the kernel's gradient is then a dot with one contracting
        # axis. With [b, s, d] it contracts (b, s), and XLA:CPU transposed the activation
        # gradient to [d, b·s] in a separate loop fusion first (~10 ms per projection per step
        # on the bench model).
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(*lead, self.features)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP of width `width`: [..., d] -> [..., d]."""

    width: int
    std: float
    dtype: jnp.dtype = jnp.float32
    name_prefix: str = "mlp"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        gate = Linear(self.width, ("embed", "mlp"), self.std, self.dtype, name="gate_proj")(x)
        up = Linear(self.width, ("embed", "mlp"), self.std, self.dtype, name="up_proj")(x)
        h = checkpoint_name(jax.nn.silu(gate) * up, f"{self.name_prefix}_hidden")
        return Linear(d, ("mlp", "embed"), self.std, self.dtype, name="down_proj")(h)
