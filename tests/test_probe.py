"""Probing and interventions (trinity_jax.inference.probe), fp32.

Tolerances: 1e-4 max-abs against `Transformer.apply` (different programs, summation order);
the zero-gate and full-patch checks are exact up to 1e-6.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import trinity_jax as tj
from trinity_jax.config import model_config
from trinity_jax.inference import Interventions
from trinity_jax.model import Transformer, abstract_variables

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
           max_position_embeddings=128, num_hidden_layers=4, num_dense_layers=1, global_attn_every_n_layers=2,
           num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
           sliding_window=5, route_scale=2.826)
TOL = 1e-4


def _model(std=0.15, seed=0, **kw) -> tj.LoadedModel:
    cfg = model_config(**dict(CFG, **kw))
    rng = np.random.default_rng(seed)
    v = jax.tree_util.tree_map(lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32)
                               if len(a.shape) > 1 else (1 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                               abstract_variables(cfg))
    if "balance" in v:
        v["balance"] = jax.tree_util.tree_map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                                              v["balance"])
    return tj.LoadedModel(cfg, v)


@functools.lru_cache(maxsize=None)
def _trinity():
    return _model()


TOKENS = np.random.default_rng(1).integers(0, 97, (2, 12)).astype(np.int32)
OTHER = np.random.default_rng(2).integers(0, 97, (2, 12)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _base_probe():
    return _trinity().probe(TOKENS)


def _reference_logits(m, tokens):
    return np.asarray(jax.jit(lambda v, t: Transformer(m.config).apply(v, t)[0])(m.variables, tokens))


def _rms(x, w, eps=1e-5):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def test_logit_lens_of_last_layer_equals_model_logits_and_shapes():
    m, r = _trinity(), _base_probe()
    ref = _reference_logits(m, TOKENS)
    assert np.max(np.abs(r.logit_lens[-1] - ref)) < TOL
    assert np.max(np.abs(r.logits - ref)) < TOL
    c = m.config
    assert r.residuals.shape == (5, 2, 12, 32) and r.resid_mid.shape == (4, 2, 12, 32)
    assert r.attn_gate.shape == (4, 2, 12, 4, 8) and ((r.attn_gate > 0) & (r.attn_gate < 1)).all()
    assert r.router_scores.shape == (3, 2, 12, 8) and r.experts.shape == r.expert_weights.shape == (3, 2, 12, 2)
    assert r.logit_lens.shape == (5, 2, 12, 97) and r.moe_layers == (1, 2, 3)
    np.testing.assert_allclose(r.expert_weights.sum(-1), c.route_scale, rtol=1e-5)
    np.testing.assert_array_equal(r.expert_bias, m.variables["balance"]["moe_layers"]["mlp"]["expert_bias"])
    emb = m.params["embed_tokens"]["embedding"][TOKENS] * np.sqrt(32)
    np.testing.assert_allclose(r.residuals[0], emb, rtol=1e-6)
    # the chosen experts are the top-k of scores + bias
    biased = r.router_scores + r.expert_bias[:, None, None, :]
    top = np.sort(np.argsort(-biased, axis=-1)[..., :2], -1)
    np.testing.assert_array_equal(np.sort(r.experts, -1), top)


def test_banned_expert_is_never_chosen_and_output_changes():
    m, base = _trinity(), _base_probe()
    layer = 2
    e = int(np.bincount(base.experts[layer - 1].ravel(), minlength=8).argmax())   # the busiest expert
    r = m.probe(TOKENS, interventions=Interventions(ban_experts={layer: [e]}))
    assert not (r.experts[layer - 1] == e).any()
    assert (base.experts[layer - 1] == e).any()
    np.testing.assert_array_equal(r.experts[0], base.experts[0])              # earlier layer untouched
    np.testing.assert_allclose(r.residuals[:layer + 1], base.residuals[:layer + 1], atol=1e-6)
    assert np.max(np.abs(r.logits - base.logits)) > 1e-3


def test_forced_expert_is_always_chosen_with_its_unbiased_weight():
    m, base = _trinity(), _base_probe()
    layer, e = 3, int(np.bincount(base.experts[2].ravel(), minlength=8).argmin())  # the idlest expert
    r = m.probe(TOKENS, interventions={"force_experts": {layer: [e]}})
    chosen = r.experts[2]
    assert (chosen == e).any(-1).all()
    s = np.take_along_axis(r.router_scores[2], chosen, -1)
    np.testing.assert_allclose(r.expert_weights[2], s / s.sum(-1, keepdims=True) * m.config.route_scale, rtol=1e-5)
    assert np.max(np.abs(r.logits - base.logits)) > 1e-3


def test_zero_attention_gate_equals_hand_computation():
    """Gate 0 -> attention output 0 -> o_proj(0) = 0 -> post-attn RMSNorm(0) = 0: the residual is
    unchanged across attention; layer 0 (dense) then adds only its MLP, computed here in numpy."""
    m = _trinity()
    r = m.probe(TOKENS, interventions=Interventions(zero_attn_gate=[0, 3]))
    assert (r.attn_gate[0] == 0).all() and (r.attn_gate[3] == 0).all() and (r.attn_gate[1] > 0).all()
    np.testing.assert_array_equal(r.resid_mid[0], r.residuals[0])
    np.testing.assert_array_equal(r.resid_mid[3], r.residuals[3])
    p = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], m.params["dense_layers"])
    x = r.residuals[0]
    h = _rms(x, p["pre_mlp_layernorm"]["scale"])
    g, u = h @ p["mlp"]["gate_proj"]["kernel"], h @ p["mlp"]["up_proj"]["kernel"]
    mlp = (g / (1 + np.exp(-g)) * u) @ p["mlp"]["down_proj"]["kernel"]
    want = x + _rms(mlp, p["post_mlp_layernorm"]["scale"])
    np.testing.assert_allclose(r.residuals[1], want, atol=1e-5)


@pytest.mark.parametrize("index", [1, 3])
def test_patching_the_full_residual_from_run_b_gives_run_b_logits(index):
    m = _trinity()
    rb = m.probe(OTHER)
    ra = m.probe(TOKENS, interventions=Interventions(patch_residual=[(index, None, rb.residuals[index])]))
    np.testing.assert_allclose(ra.logits, rb.logits, atol=1e-6)
    np.testing.assert_allclose(ra.residuals[index:], rb.residuals[index:], atol=1e-6)
    assert np.max(np.abs(_base_probe().logits - rb.logits)) > 1e-2


def test_patching_some_positions_leaves_earlier_positions_alone():
    m, base = _trinity(), _base_probe()
    rb = m.probe(OTHER, logit_lens=False)
    ra = m.probe(TOKENS, interventions=Interventions(patch_residual=[(2, [5, 6], rb.residuals[2][:, 5:7])]))
    np.testing.assert_allclose(ra.logits[:, :5], base.logits[:, :5], atol=1e-6)
    np.testing.assert_allclose(ra.residuals[2][:, 5:7], rb.residuals[2][:, 5:7], atol=1e-6)
    assert np.max(np.abs(ra.logits[:, 5:] - base.logits[:, 5:])) > 1e-3


def test_bias_changed_counts_biased_choices():
    m = _model(seed=3)
    bias = np.zeros((3, 8), np.float32)
    bias[1, 4] = 10.0                     # expert 4 always chosen at layer 2, whatever its score
    m.variables["balance"]["moe_layers"]["mlp"]["expert_bias"] = bias
    r = m.probe(TOKENS, logit_lens=False)
    plain = r.unbiased_experts()
    np.testing.assert_array_equal(r.bias_changed()[[0, 2]], 0)
    np.testing.assert_array_equal(r.bias_changed()[1], (plain[1] != 4).all(-1).astype(int))


def test_generation_under_an_intervention_matches_probe():
    m = _trinity()
    iv = Interventions(ban_experts={1: [0, 1, 2]}, zero_attn_gate=[2])
    out = m.generate_tokens(TOKENS[:, :4], 5, interventions=iv)
    r = m.probe(out, interventions=iv, logit_lens=False)
    np.testing.assert_array_equal(r.logits[:, 3:-1].argmax(-1), out[:, 4:])
    assert not np.isin(r.experts[0], [0, 1, 2]).any()


@pytest.mark.parametrize("iv,match", [
    ({"ban_experts": {0: [1]}}, r"ban_experts: layer 0 is not a MoE layer; allowed: 1\.\.3"),
    ({"ban_experts": {2: [9]}}, r"expert 9 is not in \[0, 8\)"),
    ({"ban_experts": {2: list(range(7))}}, "fewer than num_experts_per_tok=2"),
    ({"force_experts": {2: [1, 2, 3]}}, "3 experts forced but only num_experts_per_tok=2"),
    ({"force_experts": {2: [1]}, "ban_experts": {2: [1]}}, "both banned and forced"),
    ({"zero_attn_gate": [4]}, r"zero_attn_gate: layer 4 is not in \[0, 4\)"),
    ({"patch_residual": [(5, None, 0.0)]}, r"residual index 5 is not in \[0, 4\]"),
    ({"patch_residual": [(1, [12], 0.0)]}, r"positions must be distinct and in \[0, 12\)"),
    ({"patch_residual": [(1, [0, 1], np.zeros((2, 3, 32)))]}, "do not broadcast"),
    ({"swap_experts": {}}, "unknown key 'swap_experts'"),
])
def test_bad_interventions_are_named(iv, match):
    with pytest.raises(ValueError, match=match):
        _trinity().probe(TOKENS, interventions=iv)


def test_probe_without_gate_and_without_moe_layers():
    m = _model(attention_gate=False, sandwich_norm=False, num_dense_layers=4)
    r = m.probe(TOKENS[:, :6])
    assert r.attn_gate is None and r.router_scores.shape == (0, 2, 6, 8) and r.moe_layers == ()
    assert np.max(np.abs(r.logit_lens[-1] - _reference_logits(m, TOKENS[:, :6]))) < TOL
    with pytest.raises(ValueError, match="attention_gate=True"):
        m.probe(TOKENS, interventions={"zero_attn_gate": [0]})
