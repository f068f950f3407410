"""Our Flax AFMoE equals transformers' AfmoeForCausalLM (fp32 logits, max-abs 1e-4), both directions.

Tolerance 1e-4: both sides compute in fp32; differences come only from summation order in
matmuls/softmax over sequences of ~40 tokens (observed ~1e-6). Weights are re-randomised with
std 0.1-0.3 (HF's own init is 0.02 with a zero router, which would make parity nearly trivial)
and expert_bias is non-zero so that biased selection differs from unbiased scores.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import trinity_jax as tj  # noqa: E402
from trinity_jax.checkpoint import hf  # noqa: E402
from trinity_jax.config import model_config  # noqa: E402
from trinity_jax.model import init_variables  # noqa: E402

TOL = 1e-4
SEQ = 40  # longer than every sliding window below

CONFIGS = [
    # µP on, 1 dense, global every 2, GQA 2, k=2, shared 1, route_scale 2.826
    dict(num_hidden_layers=4, num_dense_layers=1, global_attn_every_n_layers=2, num_attention_heads=4,
         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
         route_scale=2.826, mup_enabled=True, sliding_window=8),
    # µP off, 2 dense, global every 3, GQA 1, k=1, no shared expert
    dict(num_hidden_layers=5, num_dense_layers=2, global_attn_every_n_layers=3, num_attention_heads=4,
         num_key_value_heads=4, num_experts=4, num_experts_per_tok=1, num_shared_experts=0,
         route_scale=1.0, mup_enabled=False, sliding_window=6),
    # µP on, 3 dense, global every 4, GQA 4, k=4, shared 1
    dict(num_hidden_layers=6, num_dense_layers=3, global_attn_every_n_layers=4, num_attention_heads=8,
         num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, num_shared_experts=1,
         route_scale=2.448, mup_enabled=True, sliding_window=12),
    # k=3 of 6, GQA 2, global every 4
    dict(num_hidden_layers=4, num_dense_layers=1, global_attn_every_n_layers=4, num_attention_heads=2,
         num_key_value_heads=1, num_experts=6, num_experts_per_tok=3, num_shared_experts=1,
         route_scale=1.5, mup_enabled=False, sliding_window=5),
]
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
            max_position_embeddings=128, tie_word_embeddings=False)


def _hf_model(kw: dict, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.AfmoeConfig(**BASE, **kw)
    model = transformers.AfmoeForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in model.named_parameters(remove_duplicate=False):
            pass
        for mod in model.modules():
            if hasattr(mod, "expert_bias"):
                mod.expert_bias.copy_(0.05 * torch.randn_like(mod.expert_bias))
    return model.eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("idx", range(len(CONFIGS)))
def test_import_hf_matches_transformers(tmp_path, idx):
    model = _hf_model(CONFIGS[idx], seed=idx)
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(idx).integers(0, BASE["vocab_size"], size=(2, SEQ))
    ours = tj.load(str(tmp_path / "hf"))
    assert ours.config.num_experts == CONFIGS[idx]["num_experts"]
    err = np.max(np.abs(ours.logits(tokens) - _hf_logits(model, tokens)))
    assert err < TOL, f"config {idx}: max-abs logit error {err:.2e}"


def test_import_fused_expert_layout(tmp_path):
    """The in-memory fused layout (gate_up_proj [E,2I,d], down_proj [E,d,I]) imports identically."""
    from safetensors.torch import save_file

    model = _hf_model(CONFIGS[0], seed=7)
    os.makedirs(tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fused/model.safetensors"),
              metadata={"format": "pt"})
    model.config.to_json_file(str(tmp_path / "fused/config.json"))
    assert any("experts.gate_up_proj" in k for k in model.state_dict())
    tokens = np.random.default_rng(0).integers(0, BASE["vocab_size"], size=(1, SEQ))
    err = np.max(np.abs(tj.load(str(tmp_path / "fused")).logits(tokens) - _hf_logits(model, tokens)))
    assert err < TOL


@pytest.mark.parametrize("idx", [0, 2])
def test_export_loads_in_transformers_with_same_logits(tmp_path, idx):
    kw = dict(BASE, **CONFIGS[idx])
    cfg = model_config(**kw)
    variables = jax.device_get(init_variables(cfg, jax.random.key(idx)))
    rng = np.random.default_rng(idx)
    bias = variables["balance"]["moe_layers"]["mlp"]["expert_bias"]
    variables["balance"]["moe_layers"]["mlp"]["expert_bias"] = (0.05 * rng.standard_normal(bias.shape)).astype(np.float32)
    ours = tj.LoadedModel(cfg, variables)
    out = tj.export_hf(ours, str(tmp_path / "exported"))
    model = transformers.AfmoeForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = rng.integers(0, cfg.vocab_size, size=(2, SEQ))
    err = np.max(np.abs(ours.logits(tokens) - _hf_logits(model, tokens)))
    assert err < TOL, f"export config {idx}: max-abs logit error {err:.2e}"
    # and back again: import of the export reproduces every parameter exactly
    back = tj.load(out)
    flat_a = jax.tree_util.tree_leaves_with_path(variables)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(back.variables))
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(leaf), err_msg=str(path))


# ----------------------------------------------------------------------------- bad input

def _saved(tmp_path, idx=0):
    model = _hf_model(CONFIGS[idx], seed=0)
    model.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_missing_key_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _saved(tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(hf.HFFormatError, match=r"missing key 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"):
        tj.load(str(src))


def test_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _saved(tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:-1]
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(hf.HFFormatError, match=r"q_proj\.weight' has shape \(31, 32\), expected \(32, 32\)"):
        tj.load(str(src))


@pytest.mark.parametrize("key,value", [("score_func", "softmax"), ("n_group", 2), ("topk_group", 4),
                                       ("route_norm", False)])
def test_unsupported_config_values_are_rejected(tmp_path, key, value):
    src = _saved(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.HFFormatError, match=key):
        tj.load(str(src))


def test_failed_conversion_writes_nothing(tmp_path):
    from trinity_jax.cli import main

    src = _saved(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["score_func"] = "softmax"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["convert-hf", "--hf", str(src), "--out", str(out)]) != 0
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_export_rejects_ablation_without_hf_equivalent(tmp_path):
    cfg = model_config(**BASE, **CONFIGS[0], attention_gate=False)
    m = tj.LoadedModel(cfg, init_variables(cfg, jax.random.key(0)))
    with pytest.raises(hf.HFFormatError, match="attention_gate"):
        tj.export_hf(m, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
