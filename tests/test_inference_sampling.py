"""Sampling filters keep exactly the right token sets on hand-made distributions (transformers' rules)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trinity_jax.inference.sampling import PREVIEW_DEFAULTS, filter_logits, sample, sampling_params

# probabilities 0.40, 0.25, 0.15, 0.10, 0.06, 0.04 on tokens 3, 0, 5, 1, 4, 2 (no ties)
PROBS = np.array([0.25, 0.10, 0.04, 0.40, 0.06, 0.15])
LOGITS = jnp.asarray(np.log(PROBS)[None], jnp.float32)


def kept(top_k=0, top_p=1.0, min_p=0.0, logits=LOGITS) -> set[int]:
    out = np.asarray(filter_logits(logits, jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p)))[0]
    return set(np.flatnonzero(np.isfinite(out)).tolist())


@pytest.mark.parametrize("k,want", [(1, {3}), (2, {3, 0}), (4, {3, 0, 5, 1}), (0, set(range(6))), (99, set(range(6)))])
def test_top_k(k, want):
    assert kept(top_k=k) == want


@pytest.mark.parametrize("p,want", [
    # mass strictly above each token (descending): 3: 0, 0: 0.40, 5: 0.65, 1: 0.80, 4: 0.90, 2: 0.96
    (0.30, {3}), (0.60, {3, 0}), (0.66, {3, 0, 5}), (0.85, {3, 0, 5, 1}), (0.95, {3, 0, 5, 1, 4}),
    (1.00, set(range(6))),
])
def test_top_p(p, want):
    assert kept(top_p=p) == want


@pytest.mark.parametrize("m,want", [(0.5, {3, 0}), (0.3, {3, 0, 5}), (0.12, {3, 0, 5, 1, 4}),
                                    (0.0, set(range(6))), (1.0, {3})])
def test_min_p(m, want):
    # thresholds m * 0.40: 0.20 keeps 0.40, 0.25; 0.12 keeps 0.15; 0.048 keeps 0.06, not 0.04
    assert kept(min_p=m) == want


def test_filters_compose_in_transformers_order():
    """temperature -> top_k -> top_p -> min_p, each on the survivors of the previous one."""
    # top_p=0.85 alone keeps token 1 (0.80 above it); after top_k=4 the survivors renormalise to
    # 0.444, 0.278, 0.167, 0.111, the mass above token 1 becomes 0.889 >= 0.85 and it is dropped
    assert kept(top_p=0.85) == {3, 0, 5, 1}
    assert kept(top_k=4, top_p=0.85) == {3, 0, 5}
    # min_p=0.5 on {3, 0, 5} (0.5, 0.3125, 0.1875): threshold 0.25 keeps {3, 0}
    assert kept(top_k=4, top_p=0.85, min_p=0.5) == {3, 0}


def test_preview_defaults():
    assert PREVIEW_DEFAULTS == {"temperature": 0.15, "top_k": 50, "top_p": 0.75, "min_p": 0.06}


def test_sampling_respects_the_kept_set_and_frequencies():
    sp = sampling_params(temperature=1.0, top_k=3)
    keys = jax.random.split(jax.random.key(0), 4000)
    logits = jnp.broadcast_to(LOGITS, (4000, 6))
    toks = np.asarray(jax.vmap(lambda k, l: sample(k, l[None], sp)[0])(keys, logits))
    assert set(np.unique(toks).tolist()) == {3, 0, 5}
    freq = np.bincount(toks, minlength=6)[[3, 0, 5]] / 4000
    np.testing.assert_allclose(freq, np.array([0.40, 0.25, 0.15]) / 0.80, atol=0.03)


def test_temperature_zero_is_argmax_and_low_temperature_concentrates():
    logits = jnp.asarray([[0.0, 2.0, 1.9, -1.0]], jnp.float32)
    assert int(sample(jax.random.key(1), logits, sampling_params(0.0, 1, 0.1, 0.9))[0]) == 1
    sp = sampling_params(temperature=0.05)
    keys = jax.random.split(jax.random.key(2), 2000)
    toks = np.asarray(jax.vmap(lambda k: sample(k, logits, sp)[0])(keys))
    # at T = 0.05 only tokens 1 and 2 matter: p(1) = 1 / (1 + e^-2) = 0.881
    assert abs(np.mean(toks == 1) - 0.881) < 0.03 and set(np.unique(toks).tolist()) <= {1, 2}


@pytest.mark.parametrize("kw,name", [(dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                                     (dict(top_k=1.5), "top_k"), (dict(top_p=0.0), "top_p"),
                                     (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p")])
def test_bad_settings_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        sampling_params(**kw)
