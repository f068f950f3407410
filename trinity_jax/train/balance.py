"""Aux-loss-free router balancing: SMEBU and the sign rule (SPEC §4), and load metrics.

Both rules act on the per-layer expert token counts ``n [L_moe, E]`` of one whole step (the
global batch, all microbatches) and update ``expert_bias [L_moe, E]``, which the router adds
to its sigmoid scores for top-k selection only. The bias (and SMEBU's momentum) live outside
the optimizer and are changed only here, after the gradient step.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["smebu_update", "sign_update", "balance_update", "load_metrics", "BALANCE_RULES"]

BALANCE_RULES = ("smebu", "sign", "none")


def _violation(counts: jax.Array) -> jax.Array:
    """v_i = (n̄ − n_i) / n̄ per layer; 0 for a layer that saw no tokens."""
    n_bar = jnp.mean(counts, axis=-1, keepdims=True)
    return (n_bar - counts) / jnp.where(n_bar > 0, n_bar, 1.0)


def smebu_update(bias: jax.Array, momentum: jax.Array, counts: jax.Array, *,
                 lam: float = 5e-4, beta: float = 0.5, kappa: float = 2.0):
    """SMEBU (SPEC §4): v=(n̄−n)/n̄, ṽ=tanh(κv), Δb=λṽ, Δb−=mean(Δb), m=βm+(1−β)Δb, b+=m."""
    v = _violation(counts.astype(jnp.float32))
    db = lam * jnp.tanh(kappa * v)
    db = db - jnp.mean(db, axis=-1, keepdims=True)
    momentum = beta * momentum + (1.0 - beta) * db
    return bias + momentum, momentum


def sign_update(bias: jax.Array, counts: jax.Array, *, gamma: float = 1e-3) -> jax.Array:
    """Sign rule (SPEC §4, Nano/Mini): Δb=γ·sign(n̄−n), b+=Δb, b−=mean(b)."""
    counts = counts.astype(jnp.float32)
    n_bar = jnp.mean(counts, axis=-1, keepdims=True)
    bias = bias + gamma * jnp.sign(n_bar - counts)
    return bias - jnp.mean(bias, axis=-1, keepdims=True)


def balance_update(rule: str, train_cfg) -> Callable:
    """The configured rule as ``fn(bias, momentum, counts) -> (bias, momentum)``."""
    if rule == "smebu":
        return lambda b, m, n: smebu_update(b, m, n, lam=train_cfg.smebu_lambda,
                                            beta=train_cfg.smebu_beta, kappa=train_cfg.smebu_kappa)
    if rule == "sign":
        return lambda b, m, n: (sign_update(b, n, gamma=train_cfg.sign_gamma), m)
    if rule == "none":
        return lambda b, m, n: (b, m)
    raise ValueError(f"train.balance={rule!r}: allowed values are {list(BALANCE_RULES)}")


def load_metrics(counts: jax.Array, bias: jax.Array | None = None) -> dict:
    """MaxVio per layer = max_i (n_i − n̄)/n̄, its max over layers, dead-expert fraction, |b|."""
    counts = counts.astype(jnp.float32)
    if counts.shape[0] == 0:  # no MoE layers
        zero = jnp.zeros((), jnp.float32)
        return {"max_vio_layers": jnp.zeros((0,), jnp.float32), "max_vio": zero,
                "dead_frac": zero, "bias_norm": zero}
    max_vio = jnp.max(-_violation(counts), axis=-1)                 # [L_moe]
    out = {"max_vio_layers": max_vio, "max_vio": jnp.max(max_vio),
           "dead_frac": jnp.mean((counts == 0).astype(jnp.float32))}
    out["bias_norm"] = (jnp.linalg.norm(bias.astype(jnp.float32)) if bias is not None
                        else jnp.zeros((), jnp.float32))
    return out
