"""Gated GQA attention with QK-norm, RoPE on local layers and NoPE on global layers (SPEC §1.4)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from trinity_jax.config import ModelConfig
from trinity_jax.model.mlp import Linear
from trinity_jax.model.norms import RMSNorm

_NEG_INF = -1e30


def rope_frequencies(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim] for neox (rotate-half) RoPE over the full head_dim, in fp32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq            # [..., dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                           # [..., dh]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [b, s, h, dh] rotated by cos/sin [b, s, dh] (rotate-half convention, as HF)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s


def attention_mask(q_index: jax.Array, k_index: jax.Array, q_segment: jax.Array, k_segment: jax.Array,
                   window: jax.Array | int | None) -> jax.Array:
    """Boolean [b, q, k]: causal, same document, and (if `window`) t − w < s ≤ t (SPEC §1.2).

    `window` may be a traced scalar; a value <= 0 means no window (global layer).
    """
    qi, ki = q_index[:, :, None], k_index[:, None, :]
    mask = (ki <= qi) & (q_segment[:, :, None] == k_segment[:, None, :])
    if window is not None:
        w = jnp.asarray(window)
        mask &= (w <= 0) | (ki > qi - w)
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [b, t, hq, dh], k/v [b, s, hkv, dh], mask [b, t, s] -> [b, t, hq, dh]; softmax in fp32.

    Query head i reads kv head i // (hq / hkv) (GQA).
    """
    b, t, hq, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (dh ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, dh)


class Attention(nn.Module):
    """Gated GQA attention: o = Wo(attn(x) * sigmoid(Wg x)); QK-norm before RoPE."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, is_global: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, s, _ = x.shape
        hq, hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.sigma
        q = Linear(hq * dh, ("embed", "q_heads"), std, dtype, name="q_proj")(x).reshape(b, s, hq, dh)
        k = Linear(hkv * dh, ("embed", "kv_heads"), std, dtype, name="k_proj")(x).reshape(b, s, hkv, dh)
        v = Linear(hkv * dh, ("embed", "kv_heads"), std, dtype, name="v_proj")(x).reshape(b, s, hkv, dh)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, axis_name="head_dim", name="k_norm")(k)
        # RoPE only on local layers (NoPE on global) unless the ablation puts RoPE everywhere.
        cos, sin = rope_frequencies(positions, dh, cfg.rope_theta)
        use_rope = jnp.logical_not(is_global) if cfg.nope_global else jnp.bool_(True)
        q = jnp.where(use_rope, apply_rope(q, cos, sin), q)
        k = jnp.where(use_rope, apply_rope(k, cos, sin), k)
        q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", None))
        k = nn.with_logical_constraint(k, ("act_batch", "act_seq", "act_kv_heads", None))
        index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        window = jnp.where(is_global, 0, cfg.sliding_window)
        mask = attention_mask(index, index, segment_ids, segment_ids, window)
        out = dot_product_attention(q, k, v, mask).reshape(b, s, hq * dh)
        out = checkpoint_name(out, "attn_out")
        if cfg.attention_gate:
            gate = Linear(hq * dh, ("embed", "q_heads"), std, dtype, name="gate_proj")(x)
            out = out * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(out.dtype)
        return Linear(cfg.hidden_size, ("q_heads", "embed"), std, dtype, name="o_proj")(out)
