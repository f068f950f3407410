"""Chunked cross-entropy (train/losses.py): equals the full-logits loss, and never holds the
full [tokens, vocab] logits (XLA memory analysis)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trinity_jax.train.losses import chunked_cross_entropy, combine_losses, cross_entropy_reference


def _case(b=2, s=40, d=16, v=96, seed=0):
    r = np.random.default_rng(seed)
    h = jnp.asarray(r.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(r.normal(size=(d, v)) * 0.5, jnp.float32)
    t = jnp.asarray(r.integers(0, v, (b, s)), jnp.int32)
    m = jnp.asarray(r.random((b, s)) > 0.2, jnp.float32)
    return h, w, t, m


def _mean_loss(fn, **kw):
    def f(h, w, t, m):
        s = fn(h, w, t, m, z_loss_weight=1e-3, **kw)
        return s.objective / s.count
    return f


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_loss_and_grad_equal_full_logits(chunk):
    """chunk 16 over seq 40 (3 chunks, last one padded) and 64 (one chunk): the fused gradient
    (computed in the forward pass) equals autodiff of the full-logits loss, value and grads
    within 1e-5 rel (fp32, different summation order)."""
    h, w, t, m = _case()
    ref = jax.jit(jax.value_and_grad(_mean_loss(cross_entropy_reference), argnums=(0, 1)))(h, w, t, m)
    got = jax.jit(jax.value_and_grad(_mean_loss(chunked_cross_entropy, chunk_size=chunk),
                                     argnums=(0, 1)))(h, w, t, m)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    s_ref = cross_entropy_reference(h, w, t, m)
    s = chunked_cross_entropy(h, w, t, m, chunk_size=chunk)
    assert float(s.count) == float(m.sum())
    np.testing.assert_allclose(s.objective, s.ce + s.z, rtol=1e-6)
    np.testing.assert_allclose(s.ce, s_ref.ce, rtol=1e-5)
    np.testing.assert_allclose(s.logit_max, s_ref.logit_max, rtol=1e-6)
    np.testing.assert_allclose(s.logit_mean, s_ref.logit_mean, rtol=1e-5)


def test_only_the_objective_carries_gradient():
    """ce, z and the logit statistics are reported without gradient (the fused VJP covers the
    objective ce + z only): d ce / d h is exactly zero, d objective / d h is not."""
    h, w, t, m = _case(s=8)
    g_ce = jax.grad(lambda h: chunked_cross_entropy(h, w, t, m, chunk_size=4).ce)(h)
    g_obj = jax.grad(lambda h: chunked_cross_entropy(h, w, t, m, chunk_size=4).objective)(h)
    assert float(jnp.abs(g_ce).max()) == 0.0
    assert float(jnp.abs(g_obj).max()) > 1e-3


def test_loss_values_match_numpy():
    """CE = lse − logit[target], z = w·lse², masked tokens excluded."""
    h, w, t, m = _case(b=1, s=8, d=4, v=6, seed=1)
    logits = np.asarray(h)[0] @ np.asarray(w)
    lse = np.log(np.exp(logits).sum(-1))
    ce = lse - logits[np.arange(8), np.asarray(t)[0]]
    mask = np.asarray(m)[0]
    s = chunked_cross_entropy(h, w, t, m, chunk_size=3, z_loss_weight=1e-2)
    np.testing.assert_allclose(s.ce, (ce * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(s.z, (1e-2 * lse ** 2 * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(s.logit_max, logits[mask > 0].max(), rtol=1e-6)
    loss, parts = combine_losses(s, jnp.array([0.5, 1.5]), num_tokens=s.count, balance_loss_weight=1e-2)
    np.testing.assert_allclose(parts["balance_loss"], 2e-2, rtol=1e-6)
    np.testing.assert_allclose(loss, (s.ce + s.z) / s.count + 2e-2, rtol=1e-6)


def test_peak_memory_is_an_eighth_of_full_logits():
    """seq 8192 × vocab 32768 × d 64 (proportional to the real 8192 × 200192): loss+grad peak
    temp memory ≤ 1/8 of the 1 GiB fp32 logits (measured ~0.07 with chunk 256)."""
    b, s, v, d = 1, 8192, 32768, 64
    f = jax.value_and_grad(_mean_loss(chunked_cross_entropy, chunk_size=256), argnums=(0, 1))
    args = (jax.ShapeDtypeStruct((b, s, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, s), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.float32))
    mem = jax.jit(f).lower(*args).compile().memory_analysis()
    full = b * s * v * 4
    assert mem.temp_size_in_bytes <= full / 8, (mem.temp_size_in_bytes, full)
