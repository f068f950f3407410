"""Phase plan (SPEC §4 data phases): token budgets and mixtures -> step ranges.

``data.phases`` is a tuple of ``PhaseConfig(name, tokens, mixture=((source, weight), ...))``;
empty means one phase ``"phase1"`` with every source at equal weight. Mixture weights are
*token* fractions (normalised; a weight of 0 drops the source from that phase).

Budgets become steps by walking the run step by step with the global batch size of
``train.batch_ramp`` (``ramp_batch_size``) and ``train.seq_len`` tokens per sequence.
**``train.steps`` always sets the run length**: the phase budgets are rescaled proportionally
so that the ``train.steps`` steps go through every phase (phase i ends at the first step whose
cumulative tokens are nearest ``sum(tokens[:i+1]) / sum(tokens)`` of the run's tokens, every
phase keeping at least one step when ``train.steps >= len(phases)``; with fewer steps than
phases, the phases whose share rounds to zero steps are skipped). ``plan_phases(...,
rescale=False)`` gives the unscaled plan (budgets as written) for ``python -m trinity_jax plan``.
"""
from __future__ import annotations

import dataclasses

__all__ = ["Phase", "plan_phases", "ramp_batch_size", "phase_mixtures"]


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    index: int
    start_step: int           # first step of the phase
    end_step: int             # one past the last step
    mixture: tuple            # ((source, token fraction), ...) normalised, zero weights dropped
    tokens: int               # tokens the phase's steps consume (after rescaling)


def ramp_batch_size(train_cfg, tokens_seen: int) -> int:
    """Global batch size at ``tokens_seen`` under ``train.batch_ramp`` (SPEC §4 batch ramp)."""
    b = train_cfg.batch_size
    for threshold, size in train_cfg.batch_ramp:
        if tokens_seen >= threshold:
            b = size
    return b


def phase_mixtures(data_cfg) -> list[tuple[str, tuple]]:
    """``[(name, normalised mixture), ...]``; the implicit single phase if data.phases is empty."""
    if not data_cfg.phases:
        names = [n for n, _ in data_cfg.sources]
        return [("phase1", tuple((n, 1.0 / len(names)) for n in names))]
    out = []
    for p in data_cfg.phases:
        total = sum(w for _, w in p.mixture)
        out.append((p.name, tuple((s, w / total) for s, w in p.mixture if w > 0)))
    return out


def _cumulative_tokens(train_cfg, steps: int) -> list[int]:
    cum = [0]
    for _ in range(steps):
        cum.append(cum[-1] + ramp_batch_size(train_cfg, cum[-1]) * train_cfg.seq_len)
    return cum


def plan_phases(data_cfg, train_cfg, *, rescale: bool = True) -> list[Phase]:
    """The phases with their [start_step, end_step) ranges (see module docstring)."""
    mixtures = phase_mixtures(data_cfg)
    budgets = [p.tokens for p in data_cfg.phases] or [1]
    if not rescale:
        ends, cum, tokens, step = [], [0], 0, 0
        for b in budgets:
            target = tokens + b
            while tokens < target:
                tokens += ramp_batch_size(train_cfg, tokens) * train_cfg.seq_len
                step += 1
                cum.append(tokens)
            ends.append(step)
    else:
        steps = train_cfg.steps
        cum = _cumulative_tokens(train_cfg, steps)
        total, acc, ends, n = sum(budgets), 0, [], len(budgets)
        for i, b in enumerate(budgets):
            acc += b
            target = cum[-1] * acc / total
            # the step whose cumulative tokens are nearest the target (ties: the later step)
            end = min(range(steps + 1), key=lambda s: (abs(cum[s] - target), -s))
            prev = ends[-1] if ends else 0
            if steps >= n:      # every phase keeps >= 1 step and leaves one for each later phase
                end = min(max(end, prev + 1), steps - (n - 1 - i))
            end = steps if i == n - 1 else max(end, prev)
            ends.append(end)
    out, start = [], 0
    for i, ((name, mix), end) in enumerate(zip(mixtures, ends)):
        out.append(Phase(name, i, start, end, mix, cum[end] - cum[start]))
        start = end
    return out
