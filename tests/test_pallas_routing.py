"""pallas_kernels.route (interpret mode on CPU) against the pure-JAX reference
(jax.lax.top_k + stable argsort): SPEC §1.6 selection, weights, counts and the stable
expert grouping of the T*k slots, plus gradients of the weights w.r.t. the logits.

Tolerances: integer outputs (experts, dest, group sizes/offsets) must match exactly;
scores and weights are fp32 and must agree to 1e-6 relative (same formula, the sum of
k selected scores may be added in another order: a few ulp).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import group_slots, route, route_reference

RS = 2.448   # Trinity-Large route_scale; one value keeps the jit cache warm across tests
INT_FIELDS = ("experts", "dest", "group_sizes", "group_offsets")


def _check_matches_reference(logits, bias, k, route_scale, block_tokens=None):
    got = route(logits, bias, k, route_scale, block_tokens=block_tokens)
    want = route_reference(logits, bias, k, route_scale)
    for field in INT_FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                      np.asarray(getattr(want, field)), err_msg=field)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6, atol=1e-7)
    return got


def _logits(seed, t, e, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((t, e)) * scale,
                       jnp.float32)


@pytest.mark.parametrize("t,e,k,block", [
    # T=37 not divisible by the block (3 blocks, 11 padding rows); E=12 not a power of
    # two (padded to 16 with bias -inf: never selected); odd k
    (37, 12, 3, 16),
    (50, 256, 4, None),  # Trinity-Large routing: E=256, k=4
])
def test_route_matches_reference(t, e, k, block):
    bias = jnp.asarray(np.random.default_rng(1).standard_normal(e) * 0.1, jnp.float32)
    out = _check_matches_reference(_logits(0, t, e), bias, k, RS, block)
    assert out.weights.shape == (t, k) and out.dest.shape == (t * k,)
    np.testing.assert_allclose(out.weights.sum(axis=1), RS, rtol=1e-5)


def test_route_ties_go_to_lowest_expert_index():
    # Logits from {-1, 0, 1} and zero bias: most tokens have tied scores.
    logits = jnp.asarray(np.random.default_rng(2).integers(-1, 2, (40, 16)), jnp.float32)
    _check_matches_reference(logits, jnp.zeros(16), 4, RS, 16)
    # explicit: a row of all-equal scores picks experts 0..k-1 in order
    flat = route(jnp.zeros((40, 16)), jnp.zeros(16), 4, RS, block_tokens=16).experts
    np.testing.assert_array_equal(np.asarray(flat), np.tile(np.arange(4), (40, 1)))


def test_route_one_expert_gets_every_token():
    bias = jnp.zeros(16).at[3].set(10.0)       # bias dominates: expert 3 is everyone's first
    out = _check_matches_reference(_logits(3, 40, 16), bias, 4, RS, 16)
    np.testing.assert_array_equal(np.asarray(out.experts[:, 0]), 3)
    assert int(out.group_sizes[3]) == 40


def test_route_half_the_experts_get_none():
    bias = jnp.zeros(16).at[8:].set(-10.0)     # experts 8..15 are never selected
    out = _check_matches_reference(_logits(4, 40, 16), bias, 4, RS, 16)
    np.testing.assert_array_equal(np.asarray(out.group_sizes[8:]), 0)
    assert int(out.group_sizes.sum()) == 40 * 4


def test_route_weights_use_unbiased_scores():
    logits = _logits(5, 40, 16)
    bias = jnp.asarray(np.random.default_rng(6).standard_normal(16), jnp.float32)
    out = route(logits, bias, 4, RS, block_tokens=16)
    sel = np.take_along_axis(np.asarray(jax.nn.sigmoid(logits)), np.asarray(out.experts), 1)
    np.testing.assert_allclose(out.weights, RS * sel / sel.sum(1, keepdims=True), rtol=1e-6)


def test_route_dest_is_a_stable_grouping_permutation():
    t, e, k = 40, 16, 4
    out = route(_logits(7, t, e), jnp.zeros(e), k, RS, block_tokens=16)
    dest = np.asarray(out.dest)
    np.testing.assert_array_equal(np.sort(dest), np.arange(t * k))      # a permutation
    sorted_experts = np.empty(t * k, np.int64)
    sorted_experts[dest] = np.asarray(out.experts).reshape(-1)
    np.testing.assert_array_equal(sorted_experts, np.sort(sorted_experts))  # grouped
    slots_in_order = np.empty(t * k, np.int64)
    slots_in_order[dest] = np.arange(t * k)
    for ex in range(e):                                                 # stable
        rows = slots_in_order[sorted_experts == ex]
        assert np.all(np.diff(rows) > 0)
    starts = np.asarray(out.group_offsets)
    sizes = np.asarray(out.group_sizes)
    for ex in range(e):
        assert np.all(sorted_experts[starts[ex]:starts[ex] + sizes[ex]] == ex)


def test_route_gradients_match_reference():
    t, e, k = 40, 16, 4
    logits = _logits(8, t, e, scale=2.0)
    bias = jnp.asarray(np.random.default_rng(9).standard_normal(e) * 0.1, jnp.float32)
    rng = np.random.default_rng(10)
    cw = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
    cs = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)

    def loss(fn):
        return lambda x: jnp.sum(fn(x, bias, k, RS).weights * cw) + jnp.sum(
            fn(x, bias, k, RS).scores * cs)

    got = jax.jit(jax.grad(loss(lambda *a: route(*a, block_tokens=16))))(logits)
    want = jax.jit(jax.grad(loss(route_reference)))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)   # fp32, same formula
    assert float(jnp.abs(got).max()) > 0


def test_group_slots_matches_stable_argsort():
    # Expert choices made elsewhere (repeats within a token allowed), T=37 over 3 blocks.
    experts = jnp.asarray(np.random.default_rng(11).integers(0, 12, (37, 3)), jnp.int32)
    got = group_slots(experts, 12, block_tokens=16)
    flat = np.asarray(experts).reshape(-1)
    order = np.argsort(flat, kind="stable")
    want_dest = np.empty_like(order)
    want_dest[order] = np.arange(flat.size)
    np.testing.assert_array_equal(np.asarray(got.dest), want_dest)
    sizes = np.bincount(flat, minlength=12)
    np.testing.assert_array_equal(np.asarray(got.group_sizes), sizes)
    np.testing.assert_array_equal(np.asarray(got.group_offsets), np.cumsum(sizes) - sizes)


def test_kernels_lower_to_triton_for_cuda():
    """Cross-lowering for 'cuda' on this CPU host goes through the Pallas Triton lowering."""
    logits = jax.ShapeDtypeStruct((4096, 256), jnp.float32)
    bias = jax.ShapeDtypeStruct((256,), jnp.float32)
    lowered = jax.jit(lambda x, b: route(x, b, 4, RS, interpret=False)).trace(
        logits, bias).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2   # top-k + ranks, dest
    experts = jax.ShapeDtypeStruct((37, 3), jnp.int32)
    lowered = jax.jit(lambda e: group_slots(e, 12, interpret=False)).trace(
        experts).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (Pallas "
                    "Triton); run with JAX_PLATFORMS=cuda")
def test_route_compiled_on_gpu():
    bias = jnp.asarray(np.random.default_rng(12).standard_normal(256) * 0.1, jnp.float32)
    _check_matches_reference(_logits(13, 4133, 256), bias, 4, RS)
