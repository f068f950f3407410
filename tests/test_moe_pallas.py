"""The 'pallas' MoE implementation (trinity_jax/model/moe_pallas.py, kernels in interpret
mode on CPU) equals the registry's 'dense_reference': outputs and gradients w.r.t. x, the
expert weights and the router logits (through the routing weights).

Tolerance: fp32 throughout, full-precision dots on both sides; they differ only in summation
order: 1e-5 absolute/relative on O(1) outputs, 1e-4 relative on gradients (as test_moe.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trinity_jax.model.moe_pallas  # noqa: F401  (registers 'pallas')
from trinity_jax.model.moe import ExpertWeights, get_moe_impl, route

E, K = 8, 3


def _problem(t=37, d=16, im=16, seed=0):   # d == im: one kernel shape serves all 3 gmms
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (t, d))
    w = ExpertWeights(0.3 * jax.random.normal(ks[1], (E, d, im)),
                      0.3 * jax.random.normal(ks[2], (E, d, im)),
                      0.3 * jax.random.normal(ks[3], (E, im, d)))
    return x, w, jax.random.normal(ks[4], (t, E))


def _loss(impl, bias):
    def f(x, w, logits):
        weights, experts, _ = route(logits, bias, K, 2.0)
        y, _ = get_moe_impl(impl)(x, w, weights, experts, num_experts=E, capacity_factor=0.0)
        return jnp.sum(jnp.sin(y)), y
    return f


@pytest.mark.parametrize("bias", [
    jnp.zeros(E),                                    # random routing, T=37 (odd)
    jnp.array([0.0] * 4 + [-100.0] * 4),             # half the experts get no token
], ids=["random", "half_empty"])
def test_pallas_impl_equals_dense_reference(bias):
    x, w, logits = _problem()
    grad = lambda impl: jax.grad(_loss(impl, bias), argnums=(0, 1, 2), has_aux=True)
    g, y = grad("pallas")(x, w, logits)
    g_ref, y_ref = grad("dense_reference")(x, w, logits)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
