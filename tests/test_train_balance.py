"""Router balancing (train/balance.py): SMEBU / sign equal SPEC §4's equations; SMEBU balances a
skewed router, `none` does not; load metrics."""
import jax
import jax.numpy as jnp
import numpy as np

from trinity_jax.train.balance import load_metrics, sign_update, smebu_update


def _np_smebu(b, m, n, lam, beta, kappa):
    nbar = n.mean(-1, keepdims=True)
    v = (nbar - n) / nbar
    db = lam * np.tanh(kappa * v)
    db = db - db.mean(-1, keepdims=True)
    m = beta * m + (1 - beta) * db
    return b + m, m


def test_smebu_matches_spec_equations():
    r = np.random.default_rng(0)
    b, m = r.normal(size=(3, 8)) * 1e-3, r.normal(size=(3, 8)) * 1e-4
    for _ in range(3):
        n = r.integers(0, 100, (3, 8)).astype(np.float64)
        got = smebu_update(jnp.asarray(b, jnp.float32), jnp.asarray(m, jnp.float32),
                           jnp.asarray(n, jnp.float32), lam=5e-4, beta=0.5, kappa=2.0)
        b, m = _np_smebu(b, m, n, 5e-4, 0.5, 2.0)
        np.testing.assert_allclose(got[0], b, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got[1], m, rtol=1e-5, atol=1e-9)


def test_sign_rule_matches_spec_equations():
    r = np.random.default_rng(1)
    b = r.normal(size=(2, 6)) * 1e-3
    n = np.array([[5, 5, 5, 5, 5, 5], [0, 1, 2, 9, 9, 9]], np.float64)
    want = b + 1e-3 * np.sign(n.mean(-1, keepdims=True) - n)
    want -= want.mean(-1, keepdims=True)
    got = sign_update(jnp.asarray(b, jnp.float32), jnp.asarray(n, jnp.float32), gamma=1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_load_metrics():
    n = jnp.array([[10.0, 10, 10, 10], [0, 0, 20, 20]])
    out = load_metrics(n, jnp.ones((2, 4)))
    np.testing.assert_allclose(out["max_vio_layers"], [0.0, 1.0])
    assert float(out["max_vio"]) == 1.0
    assert float(out["dead_frac"]) == 2 / 8
    np.testing.assert_allclose(out["bias_norm"], np.sqrt(8.0), rtol=1e-6)


def _simulate(rule, steps, t=1024, d=32, e=16, k=4, layers=2):
    """Fixed token features, router logits x@W + skew; counts from top-k of sigmoid + bias."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
    w = jnp.asarray(r.normal(size=(layers, d, e)) / np.sqrt(d), jnp.float32)
    skew = jnp.linspace(-1.5, 1.5, e)
    scores = jax.nn.sigmoid(jnp.einsum("td,lde->lte", x, w) + skew)

    def body(carry, _):
        b, m = carry
        _, idx = jax.lax.top_k(scores + b[:, None, :], k)
        n = jax.nn.one_hot(idx, e).sum((1, 2))
        if rule == "smebu":
            b, m = smebu_update(b, m, n)     # SPEC defaults λ=5e-4, β=0.5, κ=2
        return (b, m), load_metrics(n)["max_vio"]

    zeros = jnp.zeros((layers, e))
    _, vio = jax.jit(lambda: jax.lax.scan(body, (zeros, zeros), None, length=steps))()
    return np.asarray(vio)


def test_smebu_balances_a_skewed_router_and_none_does_not():
    """Start MaxVio ≈ 2; SMEBU (SPEC defaults) gets below 0.2 within 700 steps and stays there."""
    smebu, none = _simulate("smebu", 800), _simulate("none", 800)
    assert smebu[0] > 1.5 and none[0] > 1.5
    first = int(np.argmax(smebu < 0.2))
    assert smebu[first] < 0.2 and first <= 700, first
    assert smebu[-50:].max() < 0.2
    assert none.min() > 1.5
