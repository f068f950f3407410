"""Parameter and FLOP counts for any ModelConfig (both embeddings counted, as the report does)."""
from __future__ import annotations

from trinity_jax.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    d, dh = cfg.hidden_size, cfg.head_dim
    q = d * cfg.num_attention_heads * dh
    kv = 2 * d * cfg.num_key_value_heads * dh
    gate = q if cfg.attention_gate else 0
    o = cfg.num_attention_heads * dh * d
    norms = 2 * dh if cfg.qk_norm else 0
    return q + kv + gate + o + norms


def _layer_norm_params(cfg: ModelConfig) -> int:
    return (4 if cfg.sandwich_norm else 2) * cfg.hidden_size


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """total / active / embedding / per-part parameter counts (expert_bias excluded: not trained)."""
    d = cfg.hidden_size
    embedding = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    attn = cfg.num_hidden_layers * (_attention_params(cfg) + _layer_norm_params(cfg))
    dense = cfg.num_dense_layers * 3 * d * cfg.intermediate_size
    expert = 3 * d * cfg.moe_intermediate_size
    nm = cfg.num_moe_layers
    router = nm * d * cfg.num_experts
    shared = nm * expert * cfg.num_shared_experts
    routed_total = nm * expert * cfg.num_experts
    routed_active = nm * expert * cfg.num_experts_per_tok
    common = embedding + attn + dense + router + shared + d
    return {"total": common + routed_total, "active": common + routed_active, "embedding": embedding,
            "attention": attn, "dense_mlp": dense, "router": router, "shared_experts": shared,
            "routed_experts": routed_total, "routed_active": routed_active}


def mean_attended_keys(seq_len: int, window: int | None) -> float:
    """Average number of keys a causal query attends to over a sequence (window: sliding window)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # t = 0..S-1 attends min(t + 1, w) keys
    ramp = window * (window + 1) / 2
    return (ramp + (seq_len - window) * window) / seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass per token: 2 × active matmul params + attention scores/values."""
    c = count_params(cfg)
    matmul_params = c["active"] - c["embedding"] // (1 if cfg.tie_word_embeddings else 2)  # lookup is free
    flops = 2.0 * matmul_params
    per_key = 2 * 2 * cfg.num_attention_heads * cfg.head_dim            # QK^T and AV
    for i in range(cfg.num_hidden_layers):
        window = None if cfg.is_global_layer(i) else cfg.sliding_window
        flops += per_key * mean_attended_keys(seq_len, window)
    return flops


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward ≈ 3 × forward."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def format_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
