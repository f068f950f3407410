"""Muon / AdamW assignment and the Muon update (train/optimizer.py, SPEC §4)."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hlo import computations, dot_operand_dtypes

from trinity_jax.config import ConfigError, OptimConfig, from_config_dict, model_config
from trinity_jax.model import abstract_variables
from trinity_jax.train.optimizer import format_table, make_optimizer, newton_schulz, param_rules
from trinity_jax.train.schedules import group_schedules

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, num_experts=4, num_experts_per_tok=2, sliding_window=8,
            max_position_embeddings=64)


def _expected(path, shape):
    """The SPEC §4 assignment, written out independently of the implementation."""
    leaf = path.split("/")[-1]
    if path.startswith(("embed_tokens", "lm_head")):
        return "adam", 1.0, True
    if leaf == "scale":                                   # norm gains, stacked [L, d] or [d]
        return "adam", 1.0, False
    return "muon", math.sqrt(max(1.0, shape[-1] / shape[-2])), True


def _tiny_experiment_params():
    """Abstract params of experiments/tiny.py's model (1 dense + 3 MoE layers, 16 experts)."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny_experiment", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return abstract_variables(from_config_dict(mod.get_config()).model)["params"]


def test_every_parameter_of_the_tiny_model_is_assigned():
    params = _tiny_experiment_params()
    rules = param_rules(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    seen = {"muon": 0, "adam": 0}
    for path, x in flat:
        p = "/".join(k.key for k in path)
        r = _lookup(rules, path)
        assert (r.group, r.lr_scale, r.decay) == _expected(p, x.shape), p
        seen[r.group] += 1
    assert len(flat) == 35 and seen == {"muon": 20, "adam": 15}
    # the 4-D expert tensors and the stacked 3-D kernels are on Muon, stacked [L, d] gains on AdamW
    assert _lookup(rules, ("moe_layers", "mlp", "experts", "down_proj")).lr_scale == math.sqrt(128 / 64)
    assert _lookup(rules, ("moe_layers", "input_layernorm", "scale")).group == "adam"
    table = format_table(params)
    row = next(line.split() for line in table.splitlines()
               if line.startswith("moe_layers/mlp/experts/down_proj"))
    assert row == ["moe_layers/mlp/experts/down_proj", "3×16×64×128", "muon", "1.41", "yes"]
    assert len(table.splitlines()) == 2 + 35


def test_router_on_adam_when_switched_off_and_the_adamw_ablation():
    params = abstract_variables(model_config(**TINY))["params"]
    r = _lookup(param_rules(params, router_on_muon=False), ("moe_layers", "mlp", "router", "kernel"))
    assert (r.group, r.decay) == ("adam", True)
    rules = jax.tree.leaves(param_rules(params, hidden_optimizer="adamw"),
                            is_leaf=lambda x: hasattr(x, "group"))
    assert {r.group for r in rules} == {"adam"}
    assert sum(r.decay for r in rules) == 22          # 20 matrices + embedding + lm_head


def _lookup(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", k)]
    return tree


def _newton_schulz(g, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Keller Jordan's quintic NS on one matrix, in numpy float64."""
    x = g.astype(np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def test_muon_update_of_a_4d_expert_leaf_is_per_matrix_newton_schulz():
    """[L=2, E=3, d=8, f=4]: each of the 6 matrices gets NS(g) · lr · √max(1, f/d) (first step,
    decay off; NS is scale-invariant so the Nesterov factor drops out)."""
    r = np.random.default_rng(0)
    params = {"moe_layers": {"mlp": {"experts": {"gate_proj": jnp.zeros((2, 3, 8, 4)),
                                                 "down_proj": jnp.zeros((2, 3, 4, 8))}}},
              "norm": {"scale": jnp.ones((8,))}}
    grads = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), jnp.float32), params)
    cfg = OptimConfig(muon_lr=0.1, warmup_steps=0, decay="none", weight_decay=0.0, clip_norm=0.0)
    opt = make_optimizer(cfg, params, group_schedules(cfg, total_steps=10))
    lrs = opt.learning_rates(0)
    upd, _ = jax.jit(opt.update)(grads, opt.init(params), params, lrs)
    for name, scale in (("gate_proj", 1.0), ("down_proj", math.sqrt(8 / 4))):
        g = np.asarray(grads["moe_layers"]["mlp"]["experts"][name])
        u = np.asarray(upd["moe_layers"]["mlp"]["experts"][name])
        for li in range(2):
            for e in range(3):
                want = -0.1 * scale * _newton_schulz(g[li, e])
                np.testing.assert_allclose(u[li, e], want, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_newton_schulz_in_cache_sized_chunks_is_per_matrix_newton_schulz(monkeypatch, dtype):
    """On CPU a batch of matrices larger than NS_CHUNK_BYTES runs as a loop over chunks (here 2
    matrices a chunk, 15 matrices: 7 chunks and a remainder of 1). Each matrix must come out as
    its own NS: equal to the unchunked batch (same per-matrix arithmetic: 1e-6 in fp32; bf16
    products: 1e-3, batch-size-dependent blocking of the library's bf16 dot; a matrix mixed up
    with another or left out would be O(0.1) off) and, in fp32, to the float64 reference
    (2e-3 relative, as above; bf16 against f32 is the test below)."""
    from trinity_jax.train import optimizer
    g = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3, 16, 8)), jnp.float32)
    whole = np.asarray(jax.jit(lambda g: newton_schulz(g, 5, dtype=dtype))(g))
    monkeypatch.setattr(optimizer, "NS_CHUNK_BYTES", 2 * 16 * 8 * 4)
    fn = jax.jit(lambda g: newton_schulz(g, 5, dtype=dtype))
    assert fn.lower(g).compile().as_text().count(" while(") > 1          # the chunk loop + NS steps
    chunked = np.asarray(fn(g))
    np.testing.assert_allclose(chunked, whole, atol=1e-6 if dtype == jnp.float32 else 1e-3)
    for i in range(5):
        for j in range(3 if dtype == jnp.float32 else 0):
            np.testing.assert_allclose(chunked[i, j], _newton_schulz(np.asarray(g[i, j])), rtol=2e-3, atol=2e-5)


def test_our_muon_transform_equals_optax_scale_by_muon_over_steps():
    """Our scale_by_muon (tall-oriented NS for XLA:CPU) against optax.contrib.scale_by_muon
    with per-matrix dimension numbers: 3 steps of momentum + NS, Nesterov on and off, on a
    wide 2-D, a tall 2-D, a square and a 4-D expert leaf. Tolerance 2e-5 absolute on entries
    of size ~1/√min(in,out) ≈ 0.1–0.35: both run 5 fp32 NS steps in a different product order,
    whose rounding differences measure ≤ 2e-6; a wrong orientation, coefficient or
    bias correction is off by > 1e-2."""
    from optax.contrib import MuonDimensionNumbers
    from optax.contrib import scale_by_muon as optax_muon
    from trinity_jax.train.optimizer import NS_COEFFS, scale_by_muon

    r = np.random.default_rng(1)
    shapes = {"wide": (6, 20), "tall": (24, 5), "square": (8, 8), "experts": (2, 3, 16, 8)}
    params = {k: jnp.zeros(v, jnp.float32) for k, v in shapes.items()}
    dims = {k: MuonDimensionNumbers(reduction_axis=-2, output_axis=-1) for k in shapes}
    for nesterov in (True, False):
        ours = scale_by_muon(5, 0.95, nesterov)
        ref = optax_muon(ns_coeffs=(NS_COEFFS,) * 5, ns_steps=5, beta=0.95, nesterov=nesterov,
                         weight_dimension_numbers=dims)
        s_ours, s_ref = ours.init(params), ref.init(params)
        for _ in range(3):
            g = {k: jnp.asarray(r.normal(size=v), jnp.float32) for k, v in shapes.items()}
            u_ours, s_ours = jax.jit(ours.update)(g, s_ours)
            u_ref, s_ref = jax.jit(ref.update)(g, s_ref)
            for k in shapes:
                np.testing.assert_allclose(u_ours[k], u_ref[k], rtol=0, atol=2e-5,
                                           err_msg=f"{k} nesterov={nesterov}")
                np.testing.assert_allclose(s_ours.mu[k], s_ref.mu[k], rtol=1e-6, atol=1e-7)


def test_weight_decay_on_matrices_and_embeddings_not_on_norms():
    """Zero gradients: the update is −lr·0.1·p for Muon matrices (the plain LR: the √(6/4)
    fan-out scale is for the orthogonalised update only, as in the Muon reference) and the
    embedding, 0 for gains."""
    params = {"embed_tokens": {"embedding": jnp.ones((8, 4))},
              "dense_layers": {"mlp": {"up_proj": {"kernel": jnp.ones((1, 4, 6))}},
                               "input_layernorm": {"scale": jnp.ones((1, 4))}},
              "norm": {"scale": jnp.ones((4,))}}
    cfg = OptimConfig(muon_lr=1e-2, adam_lr=1e-3, warmup_steps=0, decay="none")
    opt = make_optimizer(cfg, params, group_schedules(cfg, total_steps=10))
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = jax.jit(opt.update)(zeros, opt.init(params), params, opt.learning_rates(0))
    np.testing.assert_allclose(upd["embed_tokens"]["embedding"], -1e-3 * 0.1, rtol=1e-5)
    np.testing.assert_allclose(upd["dense_layers"]["mlp"]["up_proj"]["kernel"],
                               -1e-2 * 0.1, rtol=1e-5)
    assert float(jnp.abs(upd["dense_layers"]["input_layernorm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(upd["norm"]["scale"]).max()) == 0.0


def test_newton_schulz_with_bf16_products_orthogonalises_like_f32():
    """``optim.ns_dtype=bfloat16``: the products take bf16 operands (f32 results, f32 iterate).
    On XLA:CPU every product of the compiled iteration is (bf16, bf16) (the Gram through a
    materialised Yᵀ). Its result stays within 6% (of the largest entry) of the f32 iteration's
    (measured ~3%: 8-bit mantissas in 5 steps) and its singular values stay in the quintic's
    band [0.6, 1.2] (a wrong transpose or scale leaves that band), like the f32 ones."""
    g = jnp.asarray(np.random.default_rng(3).standard_normal((6, 64, 32)), jnp.float32)
    f32 = newton_schulz(g, 5)
    ns16 = jax.jit(lambda g: newton_schulz(g, 5, dtype=jnp.bfloat16))
    bf = ns16(g)
    assert bf.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(bf - f32))) <= 0.06 * float(jnp.max(jnp.abs(f32)))
    for y in (f32, bf):
        sv = np.linalg.svd(np.asarray(y, np.float64), compute_uv=False)
        assert 0.6 <= sv.min() and sv.max() <= 1.2, (sv.min(), sv.max())
    hlo = ns16.lower(g).compile().as_text()
    dots = dot_operand_dtypes(computations(hlo))
    assert len(dots) >= 3 and set(dots) == {("bf16", "bf16")}, dots


def test_ns_dtype_is_validated():
    with pytest.raises(ConfigError, match=r"optim\.ns_dtype='float16': allowed values are"):
        from_config_dict({"optim": {"ns_dtype": "float16"}})
