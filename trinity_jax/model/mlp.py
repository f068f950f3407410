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
        return matmul(x.reshape(-1, x.shape[-1]), kernel, self.dtype).reshape(*lead, self.features)


def is_16bit_float(dtype) -> bool:
    dt = jnp.dtype(dtype)
    return jnp.issubdtype(dt, jnp.floating) and dt.itemsize == 2


def f32_result_dots(dtype) -> bool:
    """Whether products in `dtype` should be asked for an fp32 result and rounded after.

    True for 16-bit floats on XLA:CPU: its library (YNNPACK) multiplies bf16 matrices only as
    (bf16, bf16) -> f32; a dot with a bf16 result is upcast to an f32 dot, 4-7x slower
    (4096 x 256 x 256: 113 against 641 GFLOP/s). On GPU a bf16-result dot already accumulates
    in fp32 inside the GEMM, so the graph there stays the plain dot."""
    return is_16bit_float(dtype) and jax.default_backend() == "cpu"


def matmul(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """x [m, k] @ kernel [k, n] computed in `dtype` (fp32 accumulation) -> [m, n] in `dtype`."""
    if f32_result_dots(dtype):
        return _matmul16(x.astype(dtype), kernel)
    return jnp.dot(x.astype(dtype), kernel.astype(dtype))


@jax.custom_vjp
def _matmul16(x, kernel):
    """16-bit x @ kernel on XLA:CPU: every product of the forward and backward is
    (16-bit, 16-bit) -> fp32 (see f32_result_dots), each result rounded once to x's dtype;
    the kernel's gradient is returned in the kernel's own (master) dtype, unrounded."""
    return dot_nn(x, kernel.astype(x.dtype)).astype(x.dtype)


def _matmul16_fwd(x, kernel):
    return _matmul16(x, kernel), (x, kernel)


def _matmul16_bwd(res, g):
    x, kernel = res
    return dot_nt(g, kernel.astype(x.dtype)).astype(x.dtype), dot_rows(x, g).astype(kernel.dtype)


_matmul16.defvjp(_matmul16_fwd, _matmul16_bwd)


def own_buffer(a: jax.Array) -> jax.Array:
    """a, as a row-major array of its own that XLA:CPU does not fold into the dots reading it.

    XLA folds layout changes (transposes, moved axes) into the dot that consumes them, even
    across an `optimization_barrier`; a 16-bit dot whose contraction is then not on the lhs's
    last axis is upcast to an f32 dot on XLA:CPU (95-160 against 460-650 GFLOP/s here). Seen
    through a [..., n/2, 2] split of the last axis behind a barrier, the value is copied once
    into its own buffer instead. Odd last axes are returned as they are."""
    *lead, n = a.shape
    if n % 2:
        return a
    return jax.lax.optimization_barrier(a.reshape(*lead, n // 2, 2)).reshape(a.shape)


def transposed(a: jax.Array) -> jax.Array:
    """a [..., t, p] -> [..., p, t] (the last two axes swapped), in a buffer of its own
    (`own_buffer`). The barrier before the swap also keeps it out of the dot that produced
    `a`: folded there, it gave a bf16 dot that XLA:CPU cannot run (DotThunk BF16 x BF16 = F32)."""
    return own_buffer(jnp.swapaxes(jax.lax.optimization_barrier(a), -1, -2))


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b (batched over leading axes) in fp32: the library's form for 16-bit operands on
    XLA:CPU (see f32_result_dots); a 16-bit result made bf16 products 2-4x slower."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T: [s, p], [q, p] -> [s, q] in fp32 (the library's form, see f32_result_dots)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b per leading (batch) index, contracting the rows: [..., t, p], [..., t, q] ->
    [..., p, q] in fp32.

    For 16-bit operands on XLA:CPU through `transposed` (2.5-5x faster). In fp32 a plain
    transpose behind a barrier keeps the dot on the library path (XLA:CPU's f32 fallback
    handles the transposed lhs, so no [t/2, 2] view is needed)."""
    if f32_result_dots(a.dtype):
        at = transposed(a)
    else:
        at = jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2))
    return jnp.einsum("...pt,...tq->...pq", at, b, preferred_element_type=jnp.float32)


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
