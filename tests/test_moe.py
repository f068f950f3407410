"""Every MoE implementation equals `dense_reference` (outputs and gradients), and routing follows SPEC §1.6.

Tolerances: fp32 throughout; the paths differ only in summation order, so 1e-5 absolute on
O(1) outputs and 1e-4 relative on gradients.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hlo import computations, dot_operand_dtypes, loop_computations, while_bodies

from trinity_jax.config import model_config
from trinity_jax.model import Transformer, init_variables
from trinity_jax.model.moe import (ExpertWeights, available_moe_impls, block_plan, capacity_keep, get_moe_impl,
                                   route, sequence_balance, sort_slots)

# pallas (interpret mode, slow on CPU) is covered by tests/test_moe_pallas.py
IMPLS = [n for n in available_moe_impls() if n not in ("dense_reference", "pallas")]


def _problem(t=37, d=16, im=8, e=8, k=3, seed=0, bias=None):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (t, d))
    w = ExpertWeights(0.3 * jax.random.normal(ks[1], (e, d, im)), 0.3 * jax.random.normal(ks[2], (e, d, im)),
                      0.3 * jax.random.normal(ks[3], (e, im, d)))
    logits = jax.random.normal(ks[4], (t, e))
    bias = jnp.zeros((e,)) if bias is None else bias
    return x, w, logits, bias


def _run(name, x, w, logits, bias, k, e, cf=0.0):
    weights, experts, _ = route(logits, bias, k, 2.0)
    return get_moe_impl(name)(x, w, weights, experts, num_experts=e, capacity_factor=cf)[0]


def _loss(name, k, e):
    def f(x, w, logits, bias):
        return jnp.sum(jnp.sin(_run(name, x, w, logits, bias, k, e)))
    return jax.grad(f, argnums=(0, 1, 2))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["random", "all_on_one", "half_empty"])
def test_impl_equals_dense_reference(impl, case):
    e, k = 8, 3
    bias = None
    if case == "all_on_one":     # a huge bias sends every token to experts 0..k-1; the rest get none
        bias = jnp.array([100.0, 90.0, 80.0] + [0.0] * 5)
    elif case == "half_empty":
        bias = jnp.array([0.0] * 4 + [-100.0] * 4)
    x, w, logits, bias = _problem(e=e, k=k, bias=bias)
    if case == "half_empty":
        _, experts, _ = route(logits, bias, k, 1.0)
        assert int(jnp.max(experts)) < 4
    ref = _run("dense_reference", x, w, logits, bias, k, e)
    out = _run(impl, x, w, logits, bias, k, e)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    g_ref = _loss("dense_reference", k, e)(x, w, logits, bias)
    g = _loss(impl, k, e)(x, w, logits, bias)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_route_matches_spec_equations():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    weights, experts, scores = route(jnp.asarray(logits), jnp.asarray(bias), 2, 2.5)
    s = 1 / (1 + np.exp(-logits))
    sel = np.argsort(-(s + bias), axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(np.sort(experts, 1), np.sort(sel, 1))
    s_sel = np.take_along_axis(s, np.asarray(experts), 1)
    np.testing.assert_allclose(weights, s_sel / s_sel.sum(1, keepdims=True) * 2.5, rtol=1e-6)
    np.testing.assert_allclose(scores, s, rtol=1e-6)


def test_bias_changes_selection_but_not_weights_formula():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    w0, e0, _ = route(logits, jnp.zeros(4), 1, 1.0)
    w1, e1, _ = route(logits, jnp.array([0.0, 0.0, 0.0, 5.0]), 1, 1.0)
    assert int(e0[0, 0]) == 0 and int(e1[0, 0]) == 3
    np.testing.assert_allclose(w1, [[1.0]])              # normalised unbiased score of the chosen expert


def test_sort_slots_is_numpys_stable_argsort_on_both_paths():
    """The slots grouped by expert, ties in slot order: numpy's stable argsort, on the one-key
    sort path (expert·N + slot fits int32) and on the argsort fallback; ranks and group sizes
    from the same order."""
    experts = jax.random.randint(jax.random.key(3), (97, 4), 0, 13).astype(jnp.int32)
    flat = np.asarray(experts).reshape(-1)
    want = np.argsort(flat, kind="stable")
    one_key = sort_slots(experts, 13)
    fallback = sort_slots(experts, 2 ** 31 // flat.size + 1)     # expert·N + slot would overflow
    for got in (one_key, fallback):
        np.testing.assert_array_equal(got.order, want)
        np.testing.assert_array_equal(np.asarray(got.order)[got.inverse], np.arange(flat.size))
    np.testing.assert_array_equal(one_key.group_sizes, np.bincount(flat, minlength=13))
    ranks = np.empty_like(flat)
    for e in range(13):
        ranks[flat == e] = np.arange((flat == e).sum())
    np.testing.assert_array_equal(one_key.rank, ranks)


def test_capacity_drops_deterministically_and_reports_fraction():
    experts = jnp.array([[0], [0], [0], [1], [0], [1]])   # E=2, k=1, capacity = ceil(1.0 * 6 / 2) = 3
    keep, dropped = capacity_keep(experts, 2, 1.0)
    np.testing.assert_array_equal(keep[:, 0], [True, True, True, True, False, True])
    assert float(dropped) == pytest.approx(1 / 6)


def test_sequence_balance_loss_numpy():
    rng = np.random.default_rng(1)
    b, s, e, k = 2, 5, 4, 2
    scores = rng.uniform(0.1, 0.9, (b, s, e)).astype(np.float32)
    experts = np.argsort(-scores, -1)[..., :k]
    valid = np.ones((b, s), bool)
    valid[1, 3:] = False
    want = []
    for i in range(b):
        t = valid[i].sum()
        f = np.zeros(e)
        for tt in range(s):
            if valid[i, tt]:
                f[experts[i, tt]] += 1
        f *= e / (k * t)
        p = (scores[i] / scores[i].sum(-1, keepdims=True))[valid[i]].sum(0) / t
        want.append((f * p).sum())
    got = sequence_balance(jnp.asarray(scores), jnp.asarray(experts), jnp.asarray(valid), k)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_full_model_impls_agree(impl):
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
              num_experts_per_tok=2, sliding_window=4, global_attn_every_n_layers=2)
    ref_cfg, cfg = model_config(**kw, moe_impl="dense_reference"), model_config(**kw, moe_impl=impl)
    v = init_variables(ref_cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)

    def loss(params, c):
        logits, aux = Transformer(c).apply({"params": params, "balance": v["balance"]}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.sum(aux["balance"]), (logits, aux["counts"])

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)    # one compile per config
    (l0, (lg0, c0)), g0 = vg(v["params"], ref_cfg)
    (l1, (lg1, c1)), g1 = vg(v["params"], cfg)
    np.testing.assert_allclose(lg1, lg0, atol=1e-5)
    np.testing.assert_array_equal(c1, c0)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_block_sparse_bf16_updates_rows_in_place_and_matches_fp32():
    """In bf16, the block loops read and write every 16-bit buffer as uint16 bits, and every
    product (forward and backward) is bf16 x bf16 -> f32, the only bf16 form XLA:CPU's library
    runs. Given bf16 buffers, XLA:CPU converted the whole buffer to f32 and back around every
    row update (12 such converts in this gradient's loops; the bench model's bf16 step: 7.8 s
    with them, 3.1 s without), carried the read-only buffers as f32, and upcast bf16-result
    dots and row-contracting dots to f32 dots (4-6x slower). Values against the fp32 reference
    on the same bf16-rounded inputs: each stored activation and cotangent is rounded to bf16
    (2^-8 relative) and the weight gradients sum such products over rows, so the bound is 3% of
    each result's largest magnitude (measured: 0.8% for dx, up to 1.7% for the weight
    gradients); a wrong bit pattern or transpose would be off by orders of magnitude."""
    t, d, f, e, k = 64, 16, 8, 4, 2
    x, w, logits, bias = _problem(t=t, d=d, im=f, e=e, k=k)
    x16 = x.astype(jnp.bfloat16)
    w16 = ExpertWeights(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in w))
    weights, experts, _ = route(logits, bias, k, 2.0)
    rows = block_plan(experts, e).src.shape[0]

    def loss(name, x, w):
        return jnp.sum(jnp.sin(get_moe_impl(name)(x, w, weights, experts, num_experts=e)[0].astype(jnp.float32)))

    grad = jax.jit(jax.grad(functools.partial(loss, "block_sparse"), argnums=(0, 1)))
    hlo = grad.lower(x16, w16).compile().as_text()
    whole_buffer_convert = re.compile(rf"= (?:f32|bf16)\[{rows},(?:{d}|{f})\]\S* convert\(")
    loops = while_bodies(hlo)
    assert not whole_buffer_convert.findall(loops)
    carried = re.findall(r"= \(([^)]*)\) while\(", hlo)                  # the loops' carry types
    assert carried and not any(re.search(rf"(?:f32|bf16)\[(?:{rows},(?:{d}|{f})|{d},{rows})\]", c) for c in carried)
    loop_dots = dot_operand_dtypes(loop_computations(hlo))
    assert len(loop_dots) >= 9 and set(loop_dots) == {("bf16", "bf16")}, loop_dots   # 3 forward, 6 backward
    # the backward's up-front transposes of xs and gy stay bf16 copies of their own: fused with
    # the bitcast to uint16 they ran as a generic loop kernel, ~6x slower ([16832, 256]: 10-12 ms)
    fused = [n for n, body in computations(hlo).items() if " transpose(" in body and "bitcast-convert(" in body]
    assert not fused, fused
    out = get_moe_impl("block_sparse")(x16, w16, weights, experts, num_experts=e)[0]
    ref = get_moe_impl("dense_reference")(x16.astype(jnp.float32), w16, weights, experts, num_experts=e)[0]
    g, g_ref = grad(x16, w16), jax.grad(functools.partial(loss, "dense_reference"), argnums=(0, 1))(
        x16.astype(jnp.float32), w16)
    for a, b in zip([out, *jax.tree_util.tree_leaves(g)], [ref, *jax.tree_util.tree_leaves(g_ref)]):
        assert np.max(np.abs(np.asarray(a, np.float32) - b)) <= 3e-2 * np.max(np.abs(b))
