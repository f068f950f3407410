"""Muon for hidden matrices + AdamW for embedding / lm_head / 1-D params (SPEC §4).

Every parameter gets an explicit :class:`ParamRule` from its path (never from its rank:
``optax.contrib.muon``'s default sends 3-D expert tensors to AdamW and stacked ``[L, d]``
norm gains to Muon — STACK_NOTES §2d):

- ``embed_tokens``, ``lm_head``            → AdamW, weight decay
- ``.../scale``, ``.../bias``, any 1-D leaf → AdamW, no decay (stacked gains ``[L, d]`` too)
- ``router/kernel``                        → Muon (``optim.router_on_muon``) else AdamW
- every other matrix                       → Muon, weight decay; only the LAST TWO axes
  (``[in, out]``) are the matrix, leading axes (scanned layers, experts) are batch axes, so
  ``[L, E, d, f]`` is orthogonalised per layer and expert. LR × √max(1, fan_out/fan_in).

The learning rates come from ``schedules.group_schedules`` evaluated at the train step
(``TrainState.step``), not from an optimizer-internal counter, so a skipped non-finite step
does not shift the schedule. Use :meth:`Optimizer.update`, which applies them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from trinity_jax.model.mlp import dot_nn, dot_rows, f32_result_dots

__all__ = ["ParamRule", "param_rules", "muon_lr_scale", "make_optimizer", "Optimizer", "format_table",
           "newton_schulz", "scale_by_muon", "MuonState"]

# Keller Jordan's quintic coefficients (the ones optax.contrib.muon defaults to).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


class ParamRule(NamedTuple):
    group: str        # 'muon' | 'adam'
    lr_scale: float   # multiplies the group's LR (Muon: √max(1, fan_out/fan_in))
    decay: bool       # weight decay applies


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def muon_lr_scale(shape: tuple) -> float:
    """√max(1, fan_out/fan_in) of a ``[..., in, out]`` matrix (SPEC §4)."""
    fan_in, fan_out = shape[-2], shape[-1]
    return math.sqrt(max(1.0, fan_out / fan_in))


def _rule(path: str, shape: tuple, router_on_muon: bool, hidden_optimizer: str = "muon") -> ParamRule:
    name = path.rsplit("/", 1)[-1]
    if "embed_tokens" in path or path.startswith("lm_head"):
        return ParamRule("adam", 1.0, True)
    if name in ("scale", "bias") or len(shape) < 2:
        return ParamRule("adam", 1.0, False)
    if ("router" in path and not router_on_muon) or hidden_optimizer == "adamw":
        return ParamRule("adam", 1.0, True)
    return ParamRule("muon", muon_lr_scale(shape), True)


def param_rules(params: Any, router_on_muon: bool = True, hidden_optimizer: str = "muon") -> Any:
    """A tree like ``params`` of :class:`ParamRule` (works on arrays or ShapeDtypeStructs).
    ``hidden_optimizer='adamw'`` (ablation) puts every matrix on AdamW too."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _rule(_path_str(p), tuple(x.shape), router_on_muon, hidden_optimizer), params)


def _is_rule(x):
    return isinstance(x, ParamRule)


def format_table(params: Any, router_on_muon: bool = True, hidden_optimizer: str = "muon") -> str:
    """The start-up table: parameter path, shape, optimizer, LR scale, weight decay."""
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = _path_str(path)
        r = _rule(p, tuple(x.shape), router_on_muon, hidden_optimizer)
        rows.append((p, "×".join(map(str, x.shape)), r.group, f"{r.lr_scale:.3g}",
                     "yes" if r.decay else "no"))
    head = ("parameter", "shape", "optimizer", "lr scale", "decay")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(head), line(tuple("-" * n for n in w))] + [line(r) for r in rows])


# On XLA:CPU Newton-Schulz runs over chunks of at most this many bytes of fp32 matrices, each
# chunk's steps done before the next is read, so the iterate stays in cache between the
# products and the elementwise passes: a 448-matrix 256×128 expert leaf, 5 steps, went
# 785 → 644 ms (fp32) and 527 → 320 ms (bf16 products) with 4 MiB chunks (32 matrices; 64 and
# 128 matrices gained less). Other backends take the whole batch at once.
NS_CHUNK_BYTES = 4 << 20


def newton_schulz(x: jax.Array, steps: int, coeffs=NS_COEFFS, eps: float = 1e-8,
                  dtype=jnp.float32) -> jax.Array:
    """Orthogonalise ``x [..., in, out]`` per matrix over its last two axes (leading axes are
    batch axes): Frobenius-normalise, then ``steps`` quintic steps
    ``X ← aX + (b·XXᵀ + c·(XXᵀ)²)X`` — optax's ``orthogonalize_via_newton_schulz``.

    Computed on the tall orientation ``Y [..., n, m]`` (n ≥ m, Y = X or Xᵀ) as
    ``Y ← aY + Y(b·YᵀY + c·(YᵀY)²)``, which is the same map transposed (the Gram matrix is
    symmetric). On XLA:CPU the batched ``[n,m]×[m,m]`` products run ~2× faster than the
    wide ``[m,m]×[m,n]`` ones optax issues (a 448-matrix 256×128 expert leaf: 1.27 s →
    0.66 s for 5 steps). The steps are a ``lax.scan`` (unrolling multiplies compile time).

    ``dtype=bfloat16`` (``optim.ns_dtype``) rounds the products' operands to bf16, as the Muon
    reference implementation does, keeping the iterate and the products' results in f32; on
    XLA:CPU that moves them onto the bf16 library path (the leaf above: 610-765 → 370-425 ms).
    """
    *lead, n, m = x.shape
    batch = math.prod(lead)
    chunk = max(1, NS_CHUNK_BYTES // (n * m * 4))
    if jax.default_backend() == "cpu" and batch > chunk:
        flat = x.reshape(batch, n, m)
        return jax.lax.map(lambda c: _newton_schulz(c, steps, coeffs, eps, dtype), flat,
                           batch_size=chunk).reshape(x.shape)
    return _newton_schulz(x, steps, coeffs, eps, dtype)


def _newton_schulz(x, steps, coeffs, eps, dtype):
    tall = x.shape[-2] >= x.shape[-1]
    y = x if tall else jnp.swapaxes(x, -1, -2)
    y = y / (jnp.linalg.norm(y, axis=(-2, -1), keepdims=True) + eps)

    a0, b0, c0 = coeffs

    def mm(a, b):
        return dot_nn(a.astype(dtype), b.astype(dtype))

    def step(y, _):
        yd = y.astype(dtype)
        if f32_result_dots(dtype):   # XLA:CPU upcasts a row-contracting bf16 product: Yᵀ copied
            gram = dot_rows(yd, yd)
        else:                        # in f32 the direct form is ~2x faster than a copied Yᵀ here
            gram = jnp.einsum("...ji,...jk->...ik", yd, yd, preferred_element_type=jnp.float32)
        return a0 * y + mm(yd, b0 * gram + c0 * mm(gram, gram)), None

    y, _ = jax.lax.scan(step, y, None, length=steps)
    return y if tall else jnp.swapaxes(y, -1, -2)


class MuonState(NamedTuple):
    count: jax.Array   # int32 steps taken by this transform
    mu: Any            # momentum, like the params


def scale_by_muon(ns_steps: int, beta: float, nesterov: bool = True,
                  ns_dtype=jnp.float32) -> optax.GradientTransformation:
    """Muon's direction for ``[..., in, out]`` leaves: momentum (bias-corrected; Nesterov as
    in ``optax.contrib.scale_by_muon``), then :func:`newton_schulz` per matrix. Equal to
    optax's transform with ``weight_dimension_numbers`` (reduction -2, output -1) up to fp32
    rounding (tests/test_train_optimizer.py); ours only orients the products for XLA:CPU."""

    def init(params):
        return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        if nesterov:
            direction = jax.tree.map(
                lambda m, g: beta * m + (1 - beta) * g,
                optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                optax.tree.bias_correction(updates, beta, count))
        else:
            direction = optax.tree.bias_correction(mu, beta, count)
        direction = jax.tree.map(lambda d: newton_schulz(d, ns_steps, dtype=ns_dtype), direction)
        return direction, MuonState(count, mu)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """``init(params) -> opt_state``; ``learning_rates(step) -> {'muon': lr, 'adam': lr}``;
    ``update(grads, opt_state, params, lrs) -> (updates, opt_state)`` with updates LR-scaled."""

    tx: optax.GradientTransformation   # clip → partition(muon | adam), LR = 1 (sign included)
    rules: Any                          # tree of ParamRule
    schedules: dict                     # {'muon': fn(step), 'adam': fn(step)}

    def init(self, params):
        return self.tx.init(params)

    def learning_rates(self, step) -> dict:
        """``{'muon': lr, 'adam': lr}`` at ``step`` (the schedules' values, before rule scales)."""
        return {g: fn(step) for g, fn in self.schedules.items()}

    def update(self, grads, opt_state, params, lrs: dict):
        """``lrs`` = :meth:`learning_rates` of the step (computed once by the caller)."""
        updates, opt_state = self.tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda r, u: (u * (lrs[r.group] * r.lr_scale)).astype(u.dtype),
                               self.rules, updates, is_leaf=_is_rule)
        return updates, opt_state


def _add_muon_decay(weight_decay: float) -> optax.GradientTransformation:
    """Muon's decoupled decay at the group's plain LR: ``u + (wd / lr_scale)·p``, which
    :meth:`Optimizer.update`'s multiplication by ``lr·lr_scale`` turns into
    ``lr·lr_scale·u + lr·wd·p`` — only the orthogonalised update is scaled, as in the Muon
    reference (with ``add_decayed_weights`` a 1024 → 3072 matrix decayed √3× faster). Its
    state is optax's ``EmptyState``, as ``add_decayed_weights``'s is."""

    def update(updates, state, params):
        return jax.tree.map(lambda u, p: u + (weight_decay / muon_lr_scale(p.shape)) * p,
                            updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg, params: Any, schedules: dict) -> Optimizer:
    """Build the Muon/AdamW optimizer for ``params`` (arrays or shapes) from ``OptimConfig``.

    Muon branch: Nesterov momentum (``muon_momentum``), ``ns_steps`` Newton–Schulz steps per
    matrix (last two axes), decoupled decay ``weight_decay·lr`` (not scaled by the
    √max(1, fan_out/fan_in) factor, which is in ``ParamRule.lr_scale``). AdamW branch:
    β=(adam_b1, adam_b2), eps. Decay is
    0 for rules with ``decay=False`` (a separate ``*_nodecay`` branch). Global-norm clipping
    (``clip_norm``, 0 = off) over all gradients comes first.
    """
    rules = param_rules(params, optim_cfg.router_on_muon, optim_cfg.hidden_optimizer)
    labels = jax.tree.map(lambda r: r.group + ("" if r.decay else "_nodecay"), rules,
                          is_leaf=_is_rule)

    def muon(wd):
        # every leaf reaching this branch is a [..., in, out] matrix: leading axes are batch axes
        return optax.chain(
            scale_by_muon(optim_cfg.ns_steps, optim_cfg.muon_momentum, optim_cfg.nesterov,
                          optim_cfg.ns_dtype),
            _add_muon_decay(wd), optax.scale(-1.0))

    def adam(wd):
        return optax.chain(
            optax.scale_by_adam(b1=optim_cfg.adam_b1, b2=optim_cfg.adam_b2, eps=optim_cfg.adam_eps),
            optax.add_decayed_weights(wd), optax.scale(-1.0))

    wd = optim_cfg.weight_decay
    branches = {"muon": muon(wd), "muon_nodecay": muon(0.0), "adam": adam(wd), "adam_nodecay": adam(0.0)}
    present = sorted(set(jax.tree.leaves(labels)))
    clip = (optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0
            else optax.identity())
    tx = optax.chain(clip, optax.partition({k: branches[k] for k in present}, labels))
    return Optimizer(tx=tx, rules=rules, schedules=schedules)
