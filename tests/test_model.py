"""The forward pass follows SPEC §1-3: norms, layer pattern, masks, packing, init, dtype, remat, ablations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trinity_jax.config import model_config
from trinity_jax.model import Transformer, init_variables
from trinity_jax.model.attention import attention_mask
from trinity_jax.model.norms import rms_norm

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
          num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
          num_experts_per_tok=2, sliding_window=4, global_attn_every_n_layers=2, moe_impl="dense_reference")


def test_rms_norm_equation():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    w = np.arange(1, 6, dtype=np.float32)
    want = w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5), want, rtol=1e-6)


def test_layer_pattern_globals_every_n():
    cfg = model_config(**dict(KW, num_hidden_layers=12, global_attn_every_n_layers=4))
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [3, 7, 11]


def test_sliding_window_mask_is_t_minus_w_lt_s_le_t():
    idx = jnp.arange(8)[None]
    seg = jnp.ones((1, 8), jnp.int32)
    m = np.asarray(attention_mask(idx, idx, seg, seg, 3))[0]
    for t in range(8):
        for s in range(8):
            assert m[t, s] == (t - 3 < s <= t)
    g = np.asarray(attention_mask(idx, idx, seg, seg, 0))[0]        # window 0 = global
    assert (g == np.tril(np.ones((8, 8), bool))).all()


def test_packed_documents_do_not_see_each_other():
    """Doc B inside a packed row (restarted positions, own segment) gives the same logits as B alone."""
    cfg = model_config(**KW)
    v = init_variables(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, 64, 7), rng.integers(3, 64, 9)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    pos = jnp.asarray(np.concatenate([np.arange(7), np.arange(9)])[None])
    seg = jnp.asarray(np.array([1] * 7 + [2] * 9)[None])
    model = Transformer(cfg)
    lp, _ = model.apply(v, packed, pos, seg)
    lb, _ = model.apply(v, jnp.asarray(b[None]))
    la, _ = model.apply(v, jnp.asarray(a[None]))
    np.testing.assert_allclose(lp[0, 7:], lb[0], atol=2e-5)
    np.testing.assert_allclose(lp[0, :7], la[0], atol=2e-5)


def test_padding_is_excluded_from_router_counts():
    cfg = model_config(**KW)
    v = init_variables(cfg, jax.random.key(0))
    tokens = jnp.ones((2, 10), jnp.int32)
    seg = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4])
    _, aux = Transformer(cfg).apply(v, tokens, None, seg)
    np.testing.assert_allclose(aux["counts"].sum(1), 16 * cfg.num_experts_per_tok)


def test_init_follows_spec():
    cfg = model_config(**dict(KW, hidden_size=64, intermediate_size=64))
    p = init_variables(cfg, jax.random.key(0))["params"]
    sigma = 0.5 / math.sqrt(64)
    for name in ("post_attention_layernorm", "post_mlp_layernorm"):
        np.testing.assert_allclose(p["moe_layers"][name]["scale"], 1 / math.sqrt(cfg.num_hidden_layers))
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        np.testing.assert_allclose(p["moe_layers"][name]["scale"], 1.0)
    w = np.asarray(p["moe_layers"]["mlp"]["experts"]["gate_proj"]).ravel()
    assert abs(w.std() / sigma - 1) < 0.05          # truncation at 3σ shrinks std by ~1.3%
    assert np.abs(w).max() <= 3 * sigma + 1e-7
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))


def test_bf16_compute_close_to_fp32():
    v = init_variables(model_config(**KW), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    l32, _ = Transformer(model_config(**KW)).apply(v, tokens)
    l16, _ = Transformer(model_config(**dict(KW, dtype="bfloat16"))).apply(v, tokens)
    assert l16.dtype == jnp.float32
    # bf16 has 8 mantissa bits; logits are O(1): allow 0.1 absolute
    assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_except_moe"])
def test_remat_policies_keep_gradients(policy):
    v = init_variables(model_config(**KW), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)

    def grads(cfg):
        f = lambda p: jnp.mean(Transformer(cfg).apply({"params": p, "balance": v["balance"]}, tokens)[0] ** 2)
        return jax.jit(jax.grad(f))(v["params"])        # one compile instead of op-by-op dispatch

    g0, g1 = grads(model_config(**KW)), grads(model_config(**dict(KW, remat_policy=policy)))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_ablation_switches_change_the_parameter_tree():
    p = init_variables(model_config(**dict(KW, attention_gate=False, qk_norm=False, sandwich_norm=False)),
                       jax.random.key(0))["params"]["moe_layers"]
    assert "gate_proj" not in p["self_attn"] and "q_norm" not in p["self_attn"]
    assert "post_attention_layernorm" not in p and "post_mlp_layernorm" not in p


def test_nope_global_switch_only_matters_with_global_layers():
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 64)

    def logits(**kw):
        cfg = model_config(**dict(KW, **kw))
        return jax.jit(lambda v: Transformer(cfg).apply(v, tokens)[0])(init_variables(cfg, jax.random.key(0)))

    assert float(jnp.max(jnp.abs(logits(nope_global=True) - logits(nope_global=False)))) > 1e-3
    # with no global layer in the stack (period > layers), the switch is a no-op
    same = dict(global_attn_every_n_layers=8)
    np.testing.assert_allclose(logits(nope_global=True, **same), logits(nope_global=False, **same), atol=1e-6)


def test_scan_unroll_auto_unrolls_16bit_stacks_on_cpu():
    """model.scan_unroll=0 (auto, the default): the whole stack for bf16 on CPU, 1 for fp32;
    an explicit value is kept (capped at the stack). Scanned, a bf16 model's gradient stacks
    its residuals with bf16 dynamic-update-slices, which XLA:CPU runs as whole-stack f32
    round trips (`dynamic-update-slice_convert` fusions: 46 in this 3-layer model scanned; the
    bench's bf16 step 2.97 s scanned, 1.84 s unrolled); with the default there are none."""
    import re

    from trinity_jax.model.transformer import scan_unroll
    assert scan_unroll(model_config(dtype="bfloat16"), 5) == 5
    assert scan_unroll(model_config(dtype="float32"), 5) == 1
    assert scan_unroll(model_config(dtype="bfloat16", scan_unroll=2), 5) == 2
    assert scan_unroll(model_config(dtype="float32", scan_unroll=8), 5) == 5
    cfg = model_config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=3, num_dense_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, sliding_window=4, global_attn_every_n_layers=2, dtype="bfloat16")
    v = init_variables(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)

    def loss(params):
        logits, _ = Transformer(cfg).apply({**v, "params": params}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])
    hlo = jax.jit(jax.grad(loss)).lower(v["params"]).compile().as_text()
    assert not re.findall(r"dynamic-update-slice_convert", hlo)


def test_mup_embedding_scale_rounds_once_from_the_exact_product():
    """bf16 embeddings times √3072 (Large's d): one rounding of the fp32 product with the exact
    constant, as transformers computes it (torch's bf16 × float scalar); a bf16 constant (55.5
    for 55.43) put ~a quarter of the elements one bf16 step off."""
    from trinity_jax.model.transformer import mup_embedding_scale
    x = jnp.asarray(np.random.default_rng(0).standard_normal(4096) * 0.01, jnp.bfloat16)
    got = np.asarray(mup_embedding_scale(x, 3072).astype(jnp.float32))
    want = np.asarray(jnp.asarray(np.asarray(x, np.float64) * math.sqrt(3072), jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    naive = np.asarray((x * jnp.asarray(math.sqrt(3072), jnp.bfloat16)).astype(jnp.float32))
    assert np.mean(naive != want) > 0.1
    assert mup_embedding_scale(x, 3072).dtype == jnp.bfloat16
