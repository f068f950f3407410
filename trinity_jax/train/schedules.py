"""LR schedules (warm-up → constant → decay, SPEC §4) and the batch-size ramp keyed on tokens.

Decay starts at the first step of data phase ``optim.decay_start_phase`` (−1: the last
phase), or when the warm-up ends if that is later, so a TrueBase checkpoint taken at the end
of the first phase has seen no decay.
All schedule functions are jnp-traceable functions of the (0-based) step being applied.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp

__all__ = ["lr_schedule", "decay_start_step", "batch_size_at", "steps_for_tokens",
           "phase_start_steps", "group_schedules"]

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def lr_schedule(peak: float, *, warmup_steps: int, decay: str, decay_start: int,
                total_steps: int, final_fraction: float = 0.0) -> Schedule:
    """lr(step) = peak · min(1, (step+1)/warmup) · decay_factor(step).

    decay_factor is 1 before ``decay_start``; over [decay_start, total_steps] it goes
    ``linear_to_zero`` from 1 to 0, or ``cosine_to_fraction`` from 1 to ``final_fraction``
    (half cosine); ``none`` keeps it at 1.
    """
    if decay not in ("linear_to_zero", "cosine_to_fraction", "none"):
        raise ValueError(f"optim.decay={decay!r}: allowed values are "
                         "['linear_to_zero', 'cosine_to_fraction', 'none']")
    span = max(total_steps - decay_start, 1)

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
        progress = jnp.clip((step - decay_start) / span, 0.0, 1.0)
        if decay == "linear_to_zero":
            factor = 1.0 - progress
        elif decay == "cosine_to_fraction":
            factor = final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            factor = 1.0
        return peak * warm * factor

    return fn


def decay_start_step(decay_start_phase: int, phase_starts: Sequence[int], total_steps: int) -> int:
    """The step where decay begins: start step of phase ``decay_start_phase`` (−1 = last)."""
    if not phase_starts:
        return 0
    n = len(phase_starts)
    if not -n <= decay_start_phase < n:
        raise ValueError(f"optim.decay_start_phase={decay_start_phase}: the data plan has {n} "
                         f"phase(s); allowed values are -{n}..{n - 1}")
    return min(int(phase_starts[decay_start_phase]), total_steps)


def batch_size_at(tokens_seen: int, base_batch_size: int, batch_ramp: Sequence = ()) -> int:
    """Global batch (sequences) for the next step: the last ramp entry with tokens_seen ≥ its
    threshold wins; before the first threshold, ``base_batch_size``."""
    bs = base_batch_size
    for threshold, size in batch_ramp:
        if tokens_seen >= threshold:
            bs = size
    return int(bs)


def steps_for_tokens(tokens: int, seq_len: int, base_batch_size: int, batch_ramp: Sequence = (),
                     tokens_seen: int = 0) -> int:
    """Number of steps to consume ``tokens`` starting at ``tokens_seen``, following the ramp."""
    steps, seen, end = 0, tokens_seen, tokens_seen + tokens
    while seen < end:
        bs = batch_size_at(seen, base_batch_size, batch_ramp)
        nxt = [t for t, _ in batch_ramp if t > seen]           # next ramp threshold
        stop = min(end, nxt[0]) if nxt else end
        per = bs * seq_len
        k = max(1, -(-(stop - seen) // per))
        steps += k
        seen += k * per
    return steps


def phase_start_steps(phase_tokens: Sequence[int], seq_len: int, base_batch_size: int,
                      batch_ramp: Sequence = ()) -> list[int]:
    """Start step of each data phase given its token budget (used when the data plan
    only gives tokens)."""
    starts, step, seen = [], 0, 0
    for tokens in phase_tokens:
        starts.append(step)
        k = steps_for_tokens(tokens, seq_len, base_batch_size, batch_ramp, tokens_seen=seen)
        for _ in range(k):  # exact tokens seen after k steps
            seen += batch_size_at(seen, base_batch_size, batch_ramp) * seq_len
        step += k
    return starts


def group_schedules(optim_cfg, *, total_steps: int, phase_starts: Sequence[int] = (0,)) -> dict:
    """{'muon': lr_fn, 'adam': lr_fn}: the same shape, each group with its own peak.

    Decay never starts before the warm-up ends: with one data phase (or a decay phase that
    starts inside the warm-up) it would begin at step 0, the two factors would multiply, and
    the LR would never reach its peak (warm-up 2000 of 10k steps: 0.8× peak at most)."""
    ds = decay_start_step(optim_cfg.decay_start_phase, phase_starts, total_steps)
    ds = max(ds, min(optim_cfg.warmup_steps, total_steps))
    kw = dict(warmup_steps=optim_cfg.warmup_steps, decay=optim_cfg.decay, decay_start=ds,
              total_steps=total_steps, final_fraction=optim_cfg.decay_final_fraction)
    return {"muon": lr_schedule(optim_cfg.muon_lr, **kw), "adam": lr_schedule(optim_cfg.adam_lr, **kw)}
