"""pallas_kernels.gmm / tgmm (interpret mode on CPU) against the pure-JAX reference and
jax.lax.ragged_dot: forward, gradients, empty groups, padding rows, ragged shapes.

Tolerances (relative to max |reference|):
- fp32 inputs: 1e-5. Both sides accumulate in fp32 (the kernel with full-precision dots);
  only the summation order differs, giving ~1e-7 relative error. ragged_dot is asked for
  HIGHEST precision: its default for fp32 on a GPU is TF32 (3e-4 to 3e-3 from the kernel on
  an H200, session 9).
- bf16 inputs: 1e-2. Products are exact in fp32, but bf16 outputs / bf16 gradients are
  rounded to bf16 (8 bits of mantissa: ~4e-3 relative), as in any bf16 training step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gmm, gmm_reference, tgmm, tgmm_reference

TILE = (16, 16, 16)
HIGHEST = jax.lax.Precision.HIGHEST


def _rel_err(x, ref):
    x = np.asarray(x, np.float32)
    ref = np.asarray(ref, np.float32)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def _tol(dtype):
    return 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-2


def _inputs(seed, m, k, n, sizes, dtype):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


# (M, K, N, group_sizes, dtype, tiling): each case names the edge it covers.
CASES = {
    # empty group in the middle, 12 padding rows, M/K/N not multiples of the tile
    "ragged_fp32": (70, 40, 24, [10, 0, 25, 3, 20], jnp.float32, TILE),
    # one group gets every row (the others are empty, before and after it)
    "one_group_bf16": (64, 32, 48, [0, 0, 64, 0], jnp.bfloat16, TILE),
    # half the groups empty, groups straddling tiles, sum(group_sizes) < M
    "half_empty_fp32": (100, 48, 40, [0, 17, 0, 30, 0, 9, 0, 21], jnp.float32, (32, 16, 32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gmm_forward_matches_reference_and_ragged_dot(name):
    m, k, n, sizes, dtype, tiling = CASES[name]
    lhs, rhs, gs = _inputs(0, m, k, n, sizes, dtype)
    out = gmm(lhs, rhs, gs, tiling=tiling)
    ref = gmm_reference(lhs, rhs, gs)
    rd = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32, precision=HIGHEST)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5     # f32 accumulation on both sides
    assert _rel_err(out, rd) < 1e-5
    np.testing.assert_array_equal(np.asarray(out[sum(sizes):]), 0.0)   # padding rows


@pytest.mark.parametrize("name", list(CASES))
def test_gmm_gradients_match_reference(name):
    m, k, n, sizes, dtype, tiling = CASES[name]
    lhs, rhs, gs = _inputs(1, m, k, n, sizes, dtype)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((m, n)), jnp.float32)
    loss = lambda a, b: jnp.sum(gmm(a, b, gs, tiling=tiling) * cot)
    loss_ref = lambda a, b: jnp.sum(gmm_reference(a, b, gs) * cot)
    # Not jitted as a whole: the jitted kernels stay cached for the tests that follow.
    d_lhs, d_rhs = jax.grad(loss, (0, 1))(lhs, rhs)
    r_lhs, r_rhs = jax.jit(jax.grad(loss_ref, (0, 1)))(lhs, rhs)
    assert d_lhs.dtype == lhs.dtype and d_rhs.dtype == rhs.dtype
    assert _rel_err(d_lhs, r_lhs) < _tol(dtype)
    assert _rel_err(d_rhs, r_rhs) < _tol(dtype)
    np.testing.assert_array_equal(np.asarray(d_lhs[sum(sizes):], np.float32), 0.0)
    for g, size in enumerate(sizes):       # empty groups get exactly zero weight gradient
        if size == 0:
            np.testing.assert_array_equal(np.asarray(d_rhs[g], np.float32), 0.0)


def test_gmm_gradients_match_ragged_dot():
    lhs, rhs, gs = _inputs(3, 70, 40, 24, [10, 0, 25, 3, 20], jnp.float32)
    loss = lambda a, b: jnp.sum(jnp.sin(gmm(a, b, gs, tiling=TILE)))
    loss_rd = lambda a, b: jnp.sum(jnp.sin(jax.lax.ragged_dot(a, b, gs, precision=HIGHEST)))
    grads = jax.grad(loss, (0, 1))(lhs, rhs)
    for got, want in zip(grads, jax.jit(jax.grad(loss_rd, (0, 1)))(lhs, rhs)):
        assert _rel_err(got, want) < 1e-5


def test_gmm_bf16_output_and_transpose_rhs():
    lhs, rhs, gs = _inputs(4, 70, 40, 24, [10, 0, 25, 3, 20], jnp.bfloat16)
    ref = gmm_reference(lhs, rhs, gs)
    out = gmm(lhs, rhs, gs, tiling=TILE, preferred_element_type=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and _rel_err(out, ref) < 1e-2   # bf16 output rounding
    out_t = gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, tiling=TILE, transpose_rhs=True)
    assert _rel_err(out_t, ref) < 1e-5   # same bf16 products, f32 accumulation


def test_gmm_all_groups_empty_gives_zeros():
    lhs, rhs, gs = _inputs(5, 70, 40, 24, [0, 0, 0, 0, 0], jnp.float32)   # all rows padding
    np.testing.assert_array_equal(np.asarray(gmm(lhs, rhs, gs, tiling=TILE)), 0.0)


@pytest.mark.parametrize("seed", [0])
def test_gmm_random_shapes(seed):
    rng = np.random.default_rng(100 + seed)
    g = int(rng.integers(1, 7))
    m, k, n = (int(x) for x in rng.integers(17, 90, size=3))
    cuts = np.sort(rng.integers(0, m + 1, size=g))           # sum(sizes) = cuts[-1] <= m
    sizes = np.diff(np.concatenate([[0], cuts])).tolist()
    lhs, rhs, gs = _inputs(seed, m, k, n, sizes, jnp.float32)
    out = gmm(lhs, rhs, gs, tiling=(32, 16, 16))
    assert _rel_err(out, gmm_reference(lhs, rhs, gs)) < 1e-5
    assert _rel_err(out, jax.lax.ragged_dot(lhs, rhs, gs, precision=HIGHEST)) < 1e-5


def test_tgmm_matches_reference():
    # Same shapes as the "ragged_fp32" weight gradient (jit cache); bf16 tgmm is covered by
    # the bf16 gradient test.
    sizes = [0, 23, 0, 31, 9]                                   # empty groups, 7 padding rows
    rng = np.random.default_rng(6)
    lhs = jnp.asarray(rng.standard_normal((70, 40)), jnp.float32)
    grad = jnp.asarray(rng.standard_normal((70, 24)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out = tgmm(lhs, grad, gs, tiling=TILE)
    assert out.shape == (5, 40, 24) and out.dtype == jnp.float32
    assert _rel_err(out, tgmm_reference(lhs, grad, gs)) < 1e-5   # f32 accumulation
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)


def test_kernels_lower_to_triton_for_cuda():
    """Cross-lowering for 'cuda' on this CPU host: every kernel (fwd, d_lhs, d_rhs) goes
    through the Pallas Triton lowering (power-of-two blocks, supported primitives only)."""
    lhs = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((8, 256, 384), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((8,), jnp.int32)

    def fwd_bwd(a, b, g):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, g, interpret=False), a, b)
        return out, vjp(out)

    lowered = jax.jit(fwd_bwd).trace(lhs, rhs, gs).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 3   # gmm, gmm(rhs^T), tgmm


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (Pallas "
                    "Triton); run with JAX_PLATFORMS=cuda")
def test_gmm_compiled_on_gpu():
    lhs, rhs, gs = _inputs(7, 1000, 256, 384, [0, 300, 0, 250, 200, 0, 150, 40], jnp.bfloat16)
    out = gmm(lhs, rhs, gs)                                   # default tiling, compiled
    assert _rel_err(out, gmm_reference(lhs, rhs, gs)) < 1e-5  # f32 accumulation both sides
    np.testing.assert_array_equal(np.asarray(out[940:]), 0.0)
    grad = jnp.asarray(np.random.default_rng(8).standard_normal((1000, 384)), jnp.bfloat16)
    assert _rel_err(tgmm(lhs, grad, gs), tgmm_reference(lhs, grad, gs)) < 1e-5
