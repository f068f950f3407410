"""Probing: per-layer intermediates, a logit lens, and interventions through one hook interface.

    r = m.probe(tokens)                                  # int [B, S]
    r.residuals        [L+1, B, S, d]  residual stream entering layer i (i = L: entering the final norm)
    r.resid_mid        [L, B, S, d]    residual after attention, before the MLP
    r.attn_gate        [L, B, S, hq, dh]  sigmoid(gate) (None if model.attention_gate=False)
    r.router_scores    [L_moe, B, S, E]   sigmoid router scores (unbiased)
    r.experts          [L_moe, B, S, k]   chosen experts (top-k of scores + expert_bias)
    r.expert_weights   [L_moe, B, S, k]   their gate weights (route_scale applied)
    r.expert_bias      [L_moe, E]         the balancing bias (before interventions)
    r.logit_lens       [L+1, B, S, V]     final norm + lm_head of every residual (None if logit_lens=False)
    r.logits           [B, S, V]          the model's logits (= r.logit_lens[-1])
    r.moe_layers       layer index of each router row (num_dense_layers .. L-1)

Interventions (the one hook interface; also accepted as a plain dict with the same keys):

    iv = Interventions(
        ban_experts={3: [5]},          # layer -> experts that are never selected
        force_experts={2: [0, 7]},     # layer -> experts always selected (at most k per layer)
        zero_attn_gate=[1],            # layers whose attention output gate is set to 0
        patch_residual=[(2, [4, 5], values)],  # (residual index, positions, values [B, len(pos), d])
    )
    r = m.probe(tokens, interventions=iv)

Layers are absolute indices 0..L-1 (ban/force only on MoE layers); residual indices follow
`r.residuals` (0..L). Banning/forcing shifts only the *selection* score by ∓1e6, so the forced
experts' weights still come from their unbiased scores (SPEC §1.6). Ban, force and zero-gate
also work for generation (`m.generate_tokens(..., interventions=iv)`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trinity_jax.config import ModelConfig
from trinity_jax.inference.decoder import Hooks, forward, head_logits

__all__ = ["Interventions", "ProbeResult", "probe", "as_interventions", "build_hooks", "FORCE"]

FORCE = 1e6


@dataclasses.dataclass(frozen=True)
class Interventions:
    """What to change in a forward pass (see the module docstring)."""

    ban_experts: Mapping[int, Sequence[int]] = dataclasses.field(default_factory=dict)
    force_experts: Mapping[int, Sequence[int]] = dataclasses.field(default_factory=dict)
    zero_attn_gate: Sequence[int] = ()
    patch_residual: Sequence[tuple] = ()


def as_interventions(iv: Any) -> Interventions:
    if iv is None:
        return Interventions()
    if isinstance(iv, Interventions):
        return iv
    if isinstance(iv, Mapping):
        allowed = {f.name for f in dataclasses.fields(Interventions)}
        bad = sorted(set(iv) - allowed)
        if bad:
            raise ValueError(f"interventions: unknown key {bad[0]!r}; allowed: {sorted(allowed)}")
        return Interventions(**iv)
    raise ValueError(f"interventions: expected an Interventions or a dict, got {type(iv).__name__}")


def _moe_layer(cfg: ModelConfig, layer, what: str) -> int:
    if not isinstance(layer, (int, np.integer)) or not cfg.num_dense_layers <= layer < cfg.num_hidden_layers:
        raise ValueError(f"interventions.{what}: layer {layer!r} is not a MoE layer; allowed: "
                         f"{cfg.num_dense_layers}..{cfg.num_hidden_layers - 1}")
    return int(layer) - cfg.num_dense_layers


def _expert_ids(cfg: ModelConfig, experts, what: str, layer) -> list[int]:
    ids = [experts] if isinstance(experts, (int, np.integer)) else list(experts)
    for e in ids:
        if not isinstance(e, (int, np.integer)) or not 0 <= e < cfg.num_experts:
            raise ValueError(f"interventions.{what}[{layer}]: expert {e!r} is not in [0, {cfg.num_experts})")
    return [int(e) for e in ids]


def build_hooks(cfg: ModelConfig, iv: Interventions, *, seq_len: int | None, batch: int | None) -> Hooks:
    """Validate `iv` against the model (and the probed shape) and turn it into decoder `Hooks`."""
    delta = np.zeros((cfg.num_moe_layers, max(cfg.num_experts, 1)), np.float32)
    k = cfg.num_experts_per_tok
    banned: dict[int, set] = {}
    for layer, experts in dict(iv.ban_experts).items():
        j = _moe_layer(cfg, layer, "ban_experts")
        ids = _expert_ids(cfg, experts, "ban_experts", layer)
        banned[j] = set(ids)
        if cfg.num_experts - len(banned[j]) < k:
            raise ValueError(f"interventions.ban_experts[{layer}]: banning {len(banned[j])} of "
                             f"{cfg.num_experts} experts leaves fewer than num_experts_per_tok={k}")
        delta[j, ids] = -FORCE
    for layer, experts in dict(iv.force_experts).items():
        j = _moe_layer(cfg, layer, "force_experts")
        ids = sorted(set(_expert_ids(cfg, experts, "force_experts", layer)))
        if len(ids) > k:
            raise ValueError(f"interventions.force_experts[{layer}]: {len(ids)} experts forced but only "
                             f"num_experts_per_tok={k} are chosen per token")
        both = banned.get(j, set()) & set(ids)
        if both:
            raise ValueError(f"interventions: expert {min(both)} is both banned and forced at layer {layer}")
        delta[j, ids] = FORCE
    gate = np.ones((cfg.num_hidden_layers,), np.float32)
    for layer in iv.zero_attn_gate:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < cfg.num_hidden_layers:
            raise ValueError(f"interventions.zero_attn_gate: layer {layer!r} is not in "
                             f"[0, {cfg.num_hidden_layers})")
        if not cfg.attention_gate:
            raise ValueError("interventions.zero_attn_gate needs model.attention_gate=True (this model has no gate)")
        gate[int(layer)] = 0.0
    patches = {}
    for n, item in enumerate(iv.patch_residual):
        if seq_len is None:
            raise ValueError("interventions.patch_residual: only for probe()")
        try:
            layer, positions, values = item
        except (TypeError, ValueError):
            raise ValueError(f"interventions.patch_residual[{n}]: expected (layer, positions, values)") from None
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer <= cfg.num_hidden_layers:
            raise ValueError(f"interventions.patch_residual[{n}]: residual index {layer!r} is not in "
                             f"[0, {cfg.num_hidden_layers}]")
        pos = np.arange(seq_len) if positions is None else np.atleast_1d(np.asarray(positions))
        if pos.size == 0 or pos.min() < 0 or pos.max() >= seq_len or len(set(pos.tolist())) != pos.size:
            raise ValueError(f"interventions.patch_residual[{n}]: positions must be distinct and in [0, {seq_len})")
        vals = np.asarray(values, np.float32)
        want = (batch, pos.size, cfg.hidden_size)
        try:
            vals = np.broadcast_to(vals, want)
        except ValueError:
            raise ValueError(f"interventions.patch_residual[{n}]: values of shape {vals.shape} do not "
                             f"broadcast to [batch, len(positions), hidden] = {want}") from None
        mask, full = patches.get(int(layer), (np.zeros(seq_len, bool), np.zeros((batch, seq_len, cfg.hidden_size),
                                                                                 np.float32)))
        mask, full = mask.copy(), full.copy()
        mask[pos] = True
        full[:, pos] = vals
        patches[int(layer)] = (mask, full)
    return Hooks(bias_delta=jnp.asarray(delta) if iv.ban_experts or iv.force_experts else None,
                 gate_scale=jnp.asarray(gate) if len(iv.zero_attn_gate) else None,
                 patches={i: (jnp.asarray(m), jnp.asarray(v)) for i, (m, v) in patches.items()} or None)


@dataclasses.dataclass
class ProbeResult:
    tokens: np.ndarray
    logits: np.ndarray
    residuals: np.ndarray
    resid_mid: np.ndarray
    attn_gate: np.ndarray | None
    router_scores: np.ndarray
    experts: np.ndarray
    expert_weights: np.ndarray
    expert_bias: np.ndarray
    logit_lens: np.ndarray | None
    moe_layers: tuple[int, ...]

    def unbiased_experts(self) -> np.ndarray:
        """Top-k of the router scores alone (what selection would be without expert_bias) [L_moe, B, S, k]."""
        k = self.experts.shape[-1]
        return np.argsort(-self.router_scores, axis=-1, kind="stable")[..., :k]

    def bias_changed(self) -> np.ndarray:
        """Per MoE layer and token: number of chosen experts that differ from the unbiased top-k [L_moe, B, S]."""
        chosen = np.sort(self.experts, axis=-1)
        plain = np.sort(self.unbiased_experts(), axis=-1)
        e = self.router_scores.shape[-1]
        hit = (np.eye(e, dtype=bool)[chosen].any(-2) & ~np.eye(e, dtype=bool)[plain].any(-2))
        return hit.sum(-1)


@functools.partial(jax.jit, static_argnames=("cfg", "logit_lens"))
def _probe_fn(variables, tokens, hooks: Hooks, *, cfg: ModelConfig, logit_lens: bool):
    logits, _, inter = forward(variables, cfg, tokens, hooks=hooks, collect=True)
    out = {"logits": logits,
           "residuals": jnp.stack(inter["residual"]).astype(jnp.float32),
           "resid_mid": jnp.stack(inter["resid_mid"]).astype(jnp.float32)}
    if cfg.attention_gate:
        b, s = tokens.shape
        out["attn_gate"] = jnp.stack(inter["attn_gate"]).reshape(
            cfg.num_hidden_layers, b, s, cfg.num_attention_heads, cfg.head_dim)
    if cfg.num_moe_layers:
        out["router_scores"] = jnp.stack(inter["router_scores"])
        out["experts"] = jnp.stack(inter["router_experts"])
        out["expert_weights"] = jnp.stack(inter["router_weights"])
    if logit_lens:
        out["logit_lens"] = jax.vmap(lambda x: head_logits(variables["params"], cfg, x))(
            jnp.stack(inter["residual"]))
    return out


def probe(model, tokens, *, interventions: Any = None, logit_lens: bool = True) -> ProbeResult:
    """Run `model` on tokens [B, S] collecting intermediates (see the module docstring)."""
    cfg = model.config
    ids = np.asarray(tokens)
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"tokens: expected a non-empty int array [batch, seq], got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"tokens: ids must be in [0, vocab_size={cfg.vocab_size})")
    hooks = build_hooks(cfg, as_interventions(interventions), seq_len=ids.shape[1], batch=ids.shape[0])
    variables = jax.tree_util.tree_map(jnp.asarray, model.variables)
    out = jax.device_get(_probe_fn(variables, jnp.asarray(ids, jnp.int32), hooks, cfg=cfg, logit_lens=logit_lens))
    b, s = ids.shape
    lm, e, k = cfg.num_moe_layers, max(cfg.num_experts, 1), cfg.num_experts_per_tok
    bias = (np.asarray(model.variables["balance"]["moe_layers"]["mlp"]["expert_bias"], np.float32) if lm
            else np.zeros((0, e), np.float32))
    return ProbeResult(
        tokens=ids, logits=out["logits"], residuals=out["residuals"], resid_mid=out["resid_mid"],
        attn_gate=out.get("attn_gate"),
        router_scores=out.get("router_scores", np.zeros((0, b, s, e), np.float32)),
        experts=out.get("experts", np.zeros((0, b, s, k), np.int32)),
        expert_weights=out.get("expert_weights", np.zeros((0, b, s, k), np.float32)),
        expert_bias=bias, logit_lens=out.get("logit_lens"),
        moe_layers=tuple(range(cfg.num_dense_layers, cfg.num_hidden_layers)))
