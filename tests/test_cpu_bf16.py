"""bf16 products on XLA:CPU: every dot of a 16-bit projection's forward and backward runs as
bf16 x bf16 -> f32, the only bf16 form XLA:CPU's library (YNNPACK) multiplies; a bf16-result
dot or a dot contracting its lhs's rows is upcast to an f32 dot there (4-7x slower)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hlo import computations, dot_operand_dtypes

from trinity_jax.model.mlp import dot_rows, matmul, transposed
from trinity_jax.train.losses import chunked_cross_entropy


@pytest.mark.parametrize("t", [6, 7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_and_dot_rows_are_exact(t, dtype):
    """`transposed` moves values only (exact, both row parities); `dot_rows` is aᵀb accumulated
    in f32: on bf16 inputs (exact in f32) it matches float64 numpy to f32 rounding (1e-5)."""
    r = np.random.default_rng(t)
    a, b = (jnp.asarray(r.standard_normal(s), dtype) for s in [(t, 5), (t, 3)])
    np.testing.assert_array_equal(np.asarray(jax.jit(transposed)(a), np.float32), np.asarray(a, np.float32).T)
    got = jax.jit(dot_rows)(a, b)
    assert got.dtype == jnp.float32
    want = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _loss(fn, *args):
    return jnp.sum(jnp.sin(fn(*args).astype(jnp.float32)))


def test_bf16_matmul_gradient_runs_only_bf16_products_and_matches_fp32():
    """A bf16 projection (`mlp.matmul`, what every `Linear` calls): its compiled gradient holds
    exactly 3 dots (forward, dx, dkernel), all (bf16, bf16); the kernel's gradient comes back in
    the kernel's f32 (master) dtype. Values against the f32 product of the same bf16-rounded
    inputs: the output and the cotangents are rounded to bf16 once each (2^-8 relative), so
    2% of each result's largest magnitude bounds them; a transposed or missing term would not."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((64, 32)), jnp.bfloat16)
    kernel = jnp.asarray(r.standard_normal((32, 48)) * 0.2, jnp.bfloat16).astype(jnp.float32)
    grad = jax.jit(jax.grad(functools.partial(_loss, lambda x, k: matmul(x, k, jnp.bfloat16)), argnums=(0, 1)))
    dots = dot_operand_dtypes(computations(grad.lower(x, kernel).compile().as_text()))
    assert dots == [("bf16", "bf16")] * 3, dots
    gx, gk = grad(x, kernel)
    assert (gx.dtype, gk.dtype) == (jnp.bfloat16, jnp.float32)
    ref = jax.grad(functools.partial(_loss, jnp.dot), argnums=(0, 1))(x.astype(jnp.float32), kernel)
    for got, want in zip((gx, gk), ref):
        assert np.max(np.abs(np.asarray(got, np.float32) - want)) <= 2e-2 * np.max(np.abs(want))


def test_bf16_cross_entropy_gradient_runs_only_bf16_products():
    """The chunked CE on bf16 hidden states: the logits, dh and dkernel products are all
    (bf16, bf16) (dkernel contracts the tokens: through `dot_rows`), and the loss matches the
    f32 computation on the same bf16-rounded inputs to 1e-3 relative (f32 accumulation)."""
    r = np.random.default_rng(1)
    h = jnp.asarray(r.standard_normal((2, 16, 32)), jnp.bfloat16)
    kernel = jnp.asarray(r.standard_normal((32, 64)) * 0.2, jnp.bfloat16).astype(jnp.float32)
    targets = jnp.asarray(r.integers(0, 64, (2, 16)), jnp.int32)
    mask = jnp.ones((2, 16), jnp.float32)

    def loss(h, k):
        return chunked_cross_entropy(h, k, targets, mask, chunk_size=8).objective

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    dots = dot_operand_dtypes(computations(grad.lower(h, kernel).compile().as_text()))
    assert len(dots) >= 3 and set(dots) == {("bf16", "bf16")}, dots
    np.testing.assert_allclose(float(loss(h, kernel)), float(loss(h.astype(jnp.float32), kernel)), rtol=1e-3)


@pytest.mark.parametrize("is_global", [False, True])
def test_bf16_attention_gradient_runs_only_bf16_products_and_matches_fp32(is_global):
    """Local (blocks of the window) and global (causal query blocks) attention in bf16: every
    product of the gradient is (bf16, bf16), dV and dK included (computed as dOᵀP and Qᵀ dS
    on transposed [r, dh] operands, so no score-sized array is transposed). Against the f32
    computation on the same bf16-rounded q, k, v: the probabilities and dS are rounded to bf16
    before their products, so 3% of each gradient's largest magnitude bounds the difference."""
    from trinity_jax.model.attention import self_attention
    r = np.random.default_rng(2)
    b, s, hq, hkv, dh = 2, 64, 4, 2, 16
    q, k, v, ct = (jnp.asarray(r.standard_normal(sh), jnp.bfloat16)
                   for sh in [(b, s, hq, dh), (b, s, hkv, dh), (b, s, hkv, dh), (b, s, hq, dh)])
    seg = jnp.ones((b, s), jnp.int32)

    def loss(q, k, v):
        out = self_attention(q, k, v, seg, jnp.bool_(is_global), 16, "local_blocks")
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    dots = dot_operand_dtypes(computations(grad.lower(q, k, v).compile().as_text()))
    assert len(dots) >= 5 and set(dots) == {("bf16", "bf16")}, dots
    got = grad(q, k, v)
    want = jax.grad(loss, argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q, k, v)))
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        assert np.max(np.abs(np.asarray(g, np.float32) - w)) <= 3e-2 * np.max(np.abs(w))
