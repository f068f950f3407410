"""The functional decoder and its KV cache equal `Transformer.apply` (fp32).

Tolerances: max-abs logit error 1e-4 (observed ~1e-6; both sides are fp32 and differ only in
summation order: cached attention sums over the ring/full buffer instead of the sequence).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trinity_jax as tj
from trinity_jax.config import model_config
from trinity_jax.inference import kv_cache
from trinity_jax.inference.decoder import forward, moe_token_gather
from trinity_jax.model import ExpertWeights, Transformer, abstract_variables, get_moe_impl

TOL = 1e-4
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
            max_position_embeddings=128)
# global every 2 -> layers 1, 3 global; window 5 so that 24 positions wrap the ring several times
CFG = dict(BASE, num_hidden_layers=4, num_dense_layers=1, global_attn_every_n_layers=2, num_attention_heads=4,
           num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, sliding_window=5, route_scale=2.826)


@functools.partial(jax.jit, static_argnames=("cfg",))
def jit_forward(variables, tokens, *, cfg, cache=None, valid_len=None):
    return forward(variables, cfg, tokens, cache=cache, valid_len=valid_len)


@functools.partial(jax.jit, static_argnames=("cfg",))
def reference_logits(variables, tokens, *, cfg):
    return Transformer(cfg).apply(variables, tokens)[0]


def _variables(cfg, seed=0, std=0.15):
    """Re-randomised weights (init std is small) and a non-zero expert_bias."""
    v = abstract_variables(cfg)             # shapes only: eager init is slow on a busy CPU
    rng = np.random.default_rng(seed)
    v["params"] = jax.tree_util.tree_map(lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32)
                                         if len(a.shape) > 1 else
                                         (1 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                                         v["params"])
    if "balance" in v:
        v["balance"] = jax.tree_util.tree_map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                                              v["balance"])
    return v


@functools.lru_cache(maxsize=None)
def _model(**kw):
    cfg = model_config(**kw)
    return cfg, _variables(cfg)


@pytest.mark.parametrize("kw", [
    CFG,
    # no µP, all layers dense, RoPE everywhere, no sandwich norm / gate / qk-norm (ablation switches)
    dict(BASE, num_hidden_layers=3, num_dense_layers=3, global_attn_every_n_layers=3, num_attention_heads=2,
         num_key_value_heads=1, sliding_window=4, mup_enabled=False, nope_global=False, sandwich_norm=False,
         attention_gate=False, qk_norm=False),
    # no shared expert, k=1, all MoE
    dict(BASE, num_hidden_layers=3, num_dense_layers=0, global_attn_every_n_layers=3, num_attention_heads=4,
         num_key_value_heads=4, num_experts=4, num_experts_per_tok=1, num_shared_experts=0, sliding_window=6),
], ids=["trinity", "dense_ablations", "moe_only"])
def test_full_forward_equals_transformer_apply(kw):
    cfg = model_config(**kw)
    v = _variables(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    ref = np.asarray(reference_logits(v, tokens, cfg=cfg))
    ours = np.asarray(jit_forward(v, jnp.asarray(tokens), cfg=cfg)[0])
    assert np.max(np.abs(ours - ref)) < TOL


def test_cached_decoding_equals_full_forward_at_every_position():
    """Prefill 7 real tokens padded to 12 with junk (> window 5), a 6-token chunk (> ring, ring
    already full), then 11 single tokens: 24 positions, the local rings wrap 4 times; every
    position's logits equal the full forward, and the junk padding never leaks into the cache."""
    cfg, v = _model(**CFG)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    ref = np.asarray(reference_logits(v, tokens, cfg=cfg))
    cache = kv_cache.init_cache(cfg, 2, 32)
    assert cache.k[0].shape == (2, 5, 2, 8) and cache.k[1].shape == (2, 32, 2, 8)   # ring vs full
    padded = np.concatenate([tokens[:, :7], rng.integers(0, cfg.vocab_size, (2, 5))], axis=1).astype(np.int32)
    logits, cache, _ = jit_forward(v, jnp.asarray(padded), cfg=cfg, cache=cache, valid_len=7)
    assert int(cache.length) == 7
    got = [np.asarray(logits)[:, :7]]
    for a, b in [(7, 13)] + [(i, i + 1) for i in range(13, 24)]:
        logits, cache, _ = jit_forward(v, jnp.asarray(tokens[:, a:b]), cfg=cfg, cache=cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert int(cache.length) == 24
    err = np.max(np.abs(got - ref), axis=(0, 2))
    assert err.max() < TOL, f"per-position errors {err}"


def test_ring_positions():
    np.testing.assert_array_equal(kv_cache.ring_positions(0, 4), [-4, -3, -2, -1])
    np.testing.assert_array_equal(kv_cache.ring_positions(2, 4), [0, 1, -2, -1])
    np.testing.assert_array_equal(kv_cache.ring_positions(7, 4), [4, 5, 6, 3])


def test_token_gather_equals_dense_reference():
    rng = np.random.default_rng(0)
    t, d, im, e, k = 3, 8, 4, 6, 2
    w = ExpertWeights(*(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                        [(e, d, im), (e, d, im), (e, im, d)]))
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    experts = jnp.asarray([[0, 5], [3, 1], [5, 2]], jnp.int32)
    weights = jnp.asarray(rng.random((t, k)), jnp.float32)
    ref, _ = get_moe_impl("dense_reference")(x, w, weights, experts, num_experts=e)
    got, _ = moe_token_gather(x, w, weights, experts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_generate_tokens_greedy_is_argmax_of_full_forward():
    """Greedy generation re-derived from full forwards of the growing sequence (crosses the window)."""
    cfg, v = _model(**CFG)
    m = tj.LoadedModel(cfg, v)
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 4)).astype(np.int32)
    out = m.generate_tokens(prompt, 8)
    assert out.shape == (2, 12) and (out[:, :4] == prompt).all()
    full = np.asarray(reference_logits(v, out, cfg=cfg))
    np.testing.assert_array_equal(out[:, 4:], full[:, 3:-1].argmax(-1))


def test_stream_equals_loop_and_stop_tokens_pad():
    cfg, v = _model(**CFG)
    m = tj.LoadedModel(cfg, v)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 3)).astype(np.int32)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=5)
    out = m.generate_tokens(prompt, 8, **kw)
    from trinity_jax.inference.generate import stream_tokens
    steps = np.stack(list(stream_tokens(m, prompt, 8, **kw)), axis=1)
    np.testing.assert_array_equal(steps, out[:, 3:])
    # stop at the token row 0 produced third: row 0 keeps it and is padded after
    stop = int(out[0, 5])
    stopped = m.generate_tokens(prompt, 8, stop_tokens=[stop], **kw)
    first = 3 + int(np.argmax(out[0, 3:] == stop)) + 1
    assert stopped[0, first - 1] == stop and (stopped[0, first:] == cfg.pad_token_id).all()


def test_bad_generation_input_is_named():
    cfg, v = _model(**CFG)
    m = tj.LoadedModel(cfg, v)
    with pytest.raises(ValueError, match="vocab_size=97"):
        m.generate_tokens([[1, 200]], 2)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        m.generate_tokens([[1, 2]], 127)
    with pytest.raises(ValueError, match="top_p"):
        m.generate_tokens([[1, 2]], 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        m.generate_tokens([1, 2], 2)
    with pytest.raises(ValueError, match="no tokenizer"):
        m.generate("hello")


def test_kv_cache_bytes_per_token():
    """Nano: 2 kv heads × 128 dims × 2 (k, v) × 2 bytes = 1 KiB per layer; 14 global + 42 local layers."""
    nano = model_config(hidden_size=1024, num_hidden_layers=56, num_dense_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=128, sliding_window=2048, num_experts=128,
                        num_experts_per_tok=8, intermediate_size=3072, moe_intermediate_size=256)
    b = kv_cache.bytes_per_token(nano, "bfloat16")
    assert (b["global"], b["local"], b["global_layers"], b["local_layers"]) == (14 * 1024, 42 * 1024, 14, 42)
    assert kv_cache.cache_bytes(nano, 4096, dtype="bfloat16") == 14 * 1024 * 4096 + 42 * 1024 * 2048
    rows = dict(kv_cache.plan_rows(nano, 4096))
    assert rows["KV cache / token (bfloat16)"].startswith("14.0 KiB global (14 layers")


@pytest.mark.parametrize("path", ["gather", "dense_matmul", "impl"])
def test_every_decode_moe_path_and_prepared_variables_agree(path, monkeypatch):
    """Cached single-token steps through each routed-expert path, with `prepare_decode` variables,
    equal the full forward (the path is normally picked by moe_path from T·k vs E)."""
    from trinity_jax.inference import decoder

    cfg, v = _model(**CFG)
    real = decoder.moe_path
    monkeypatch.setattr(decoder, "moe_path", lambda c, t, cached: path if cached else real(c, t, cached))
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    ref = np.asarray(reference_logits(v, tokens, cfg=cfg))
    prepared = decoder.prepare_decode(jax.tree_util.tree_map(jnp.asarray, v), cfg, 2)
    assert ("decode" in prepared["layers"][1][0]["mlp"]) == (path == "dense_matmul")
    step = jax.jit(lambda p, t, c: forward(p, cfg, t, cache=c)[:2])
    cache, got = kv_cache.init_cache(cfg, 2, 16), []
    for i in range(9):
        logits, cache = step(prepared, jnp.asarray(tokens[:, i:i + 1]), cache)
        got.append(np.asarray(logits))
    assert np.max(np.abs(np.concatenate(got, 1) - ref)) < TOL
