"""The AFMoE decoder (SPEC §1): embedding, scanned sandwich-norm layers, final norm, untied head."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from trinity_jax.config import ModelConfig
from trinity_jax.model.attention import Attention, rope_tables
from trinity_jax.model.initializers import truncated_normal_3sigma
from trinity_jax.model.mlp import SwiGLU, is_16bit_float
from trinity_jax.model.moe import MoE
from trinity_jax.model.norms import RMSNorm

_CHECKPOINT_NAMES = ("attn_out", "mlp_hidden", "shared_hidden", "layer_attn", "layer_mlp")


def remat_policy(name: str):
    """Named remat policies: 'full' saves nothing; 'save_dots' saves matmul outputs without batch dims;
    'save_dots_except_moe' saves the attention and dense-MLP activations tagged with checkpoint_name."""
    if name == "full":
        return None
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "save_dots_except_moe":
        return jax.checkpoint_policies.save_only_these_names(*_CHECKPOINT_NAMES)
    raise ValueError(f"model.remat_policy={name!r}: allowed none, full, save_dots, save_dots_except_moe")


def mup_embedding_scale(x: jax.Array, hidden_size: int) -> jax.Array:
    """x · √d (SPEC §1.1), the product taken in fp32 with the exact constant and rounded once
    to x's dtype, as transformers does (a bf16 √3072 is 55.5, not 55.43: 0.13% too large, and
    a quarter of Large's bf16 embeddings one rounding step off HF's)."""
    return (x.astype(jnp.float32) * math.sqrt(hidden_size)).astype(x.dtype)


class DecoderLayer(nn.Module):
    """x = x + post_attn_norm(attn(pre_attn_norm(x))); x = x + post_mlp_norm(mlp(pre_mlp_norm(x)))."""

    config: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x, is_global, rope, segment_ids, valid):
        cfg = self.config
        post_init = 1.0 / math.sqrt(cfg.num_hidden_layers)  # depth-scaled sandwich-norm init (SPEC §3)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
        h = Attention(cfg, name="self_attn")(h, is_global, rope, segment_ids)
        if cfg.sandwich_norm:
            h = RMSNorm(cfg.rms_norm_eps, post_init, name="post_attention_layernorm")(h)
        x = x + checkpoint_name(h, "layer_attn")
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        h = RMSNorm(cfg.rms_norm_eps, name="pre_mlp_layernorm")(x)
        if self.moe:
            h, aux = MoE(cfg, name="mlp")(h, valid)
        else:
            h, aux = SwiGLU(cfg.intermediate_size, cfg.sigma, jnp.dtype(cfg.dtype), name="mlp")(h), {}
        if cfg.sandwich_norm:
            h = RMSNorm(cfg.rms_norm_eps, post_init, name="post_mlp_layernorm")(h)
        x = x + checkpoint_name(h, "layer_mlp")
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        return x, aux


def scan_unroll(cfg: ModelConfig, length: int) -> int:
    """Layers per scan iteration for a stack of `length` (`model.scan_unroll`; 0 = auto: the
    whole stack for 16-bit compute on CPU, else 1)."""
    if cfg.scan_unroll:
        return min(cfg.scan_unroll, length)
    return length if is_16bit_float(cfg.dtype) and jax.default_backend() == "cpu" else 1


def layer_stack(cfg: ModelConfig, moe: bool, length: int, name: str) -> nn.Module:
    """`length` identical layers under nn.scan; the local/global flag of each layer is scanned in."""
    layer = DecoderLayer
    if cfg.remat_policy != "none":
        layer = nn.remat(DecoderLayer, prevent_cse=False, policy=remat_policy(cfg.remat_policy))
    scanned = nn.scan(layer,
                      variable_axes={"params": 0, "balance": 0, "intermediates": 0},
                      split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=length, unroll=scan_unroll(cfg, length),
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe, name=name)


class LMHead(nn.Module):
    """Holds the untied head kernel [d, V]; the product is taken by the caller (possibly in chunks)."""

    vocab_size: int
    std: float

    @nn.compact
    def __call__(self, d: int) -> jax.Array:
        return self.param("kernel", nn.with_logical_partitioning(truncated_normal_3sigma(self.std),
                                                                 ("embed", "vocab")),
                          (d, self.vocab_size), jnp.float32)


class Transformer(nn.Module):
    """AfmoeForCausalLM in Flax. __call__(tokens [B,S]) -> (logits [B,S,V] f32 | hidden, aux)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, return_hidden: bool = False):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        valid = segment_ids > 0
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(truncated_normal_3sigma(cfg.sigma),
                                                                     ("vocab", "embed")),
                         name="embed_tokens")
        x = embed(tokens)                                                   # [batch, seq, embed]
        if cfg.mup_enabled:
            x = mup_embedding_scale(x, cfg.hidden_size)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        flags = jnp.array([cfg.is_global_layer(i) for i in range(cfg.num_hidden_layers)])
        nd, nm = cfg.num_dense_layers, cfg.num_moe_layers
        # RoPE tables once per forward (cos/sin [batch, seq, head_dim]), shared by every layer:
        # computed inside each layer, XLA:CPU fused the transcendentals into per-head loops.
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        if nd:
            x, _ = layer_stack(cfg, False, nd, "dense_layers")(x, flags[:nd], rope, segment_ids, valid)
        e = max(cfg.num_experts, 1)
        aux: dict[str, Any] = {"counts": jnp.zeros((0, e), jnp.float32),
                               "balance": jnp.zeros((0,), jnp.float32),
                               "dropped": jnp.zeros((0,), jnp.float32)}
        if nm:
            x, aux = layer_stack(cfg, True, nm, "moe_layers")(x, flags[nd:], rope, segment_ids, valid)
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)                        # [batch, seq, embed]
        kernel = LMHead(cfg.vocab_size, cfg.sigma, name="lm_head")(cfg.hidden_size)
        if return_hidden:
            return x, aux
        logits = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ("act_batch", "act_seq", "act_vocab")), aux


def _dummy_tokens(cfg: ModelConfig) -> jax.Array:
    return jnp.zeros((1, min(8, cfg.max_position_embeddings)), jnp.int32)


def init_boxed(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Variables with flax logical-partitioning metadata (nn.Partitioned boxes)."""
    return Transformer(cfg).init(rng, _dummy_tokens(cfg))


@functools.lru_cache(maxsize=16)
def _jitted_init(cfg: ModelConfig):
    return jax.jit(lambda rng: nn.unbox(init_boxed(cfg, rng)))


def init_variables(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Plain-array variables {'params': ..., 'balance': ...} (fp32 master weights).

    Jitted (cached per config): one compile instead of op-by-op initialisation of the scanned
    stacks (7 s -> under 1 s for a 4-layer test model on 2 cores)."""
    return _jitted_init(cfg)(rng)


def abstract_variables(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the variables, without allocating them."""
    return nn.unbox(jax.eval_shape(lambda r: init_boxed(cfg, r), jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> dict:
    """PartitionSpecs of logical axis names for every variable (same tree as init_variables)."""
    return nn.get_partition_spec(jax.eval_shape(lambda r: init_boxed(cfg, r), jax.random.key(0)))
