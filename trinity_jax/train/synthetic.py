"""A learnable synthetic batch source with the data module's interface (tests, benchmarks).

Documents of random length follow a fixed random permutation of the vocabulary
(``next = perm[current]``) from a random first token, packed back to back into rows: a model
that learns the bigram map drives the loss from ln(V) towards 0 (document starts are
unpredictable, and their targets are masked). Batches are a pure function of
(seed, step), so the iterator state is just ``{step, tokens_seen}``.

Interface (a subset of ``trinity_jax.data.DataModule``): ``.train.next_batch(B)`` (this
process's rows of global batch B), ``.train.get_state() / set_state()``,
``.train.tokens_seen``, ``.train.phase_name``, ``.phase_plan``,
``.validation_batches(n, B)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SyntheticData", "synthetic_batch"]


def synthetic_batch(rng: np.random.Generator, perm: np.ndarray, rows: int, seq_len: int,
                    mean_doc_len: int = 48) -> dict:
    """One packed batch dict (inputs/targets/positions/segment_ids/loss_mask) of [rows, S]."""
    v = perm.shape[0]
    toks = np.empty((rows, seq_len + 1), np.int32)
    seg = np.empty((rows, seq_len + 1), np.int32)
    pos = np.empty((rows, seq_len + 1), np.int32)
    for r in range(rows):
        t, doc = 0, 1
        while t < seq_len + 1:
            n = min(int(rng.integers(mean_doc_len // 2, 2 * mean_doc_len)), seq_len + 1 - t)
            cur = int(rng.integers(0, v))
            for i in range(n):
                toks[r, t + i] = cur
                cur = perm[cur]
            seg[r, t:t + n] = doc
            pos[r, t:t + n] = np.arange(n)
            t, doc = t + n, doc + 1
    same_doc = seg[:, 1:] == seg[:, :-1]
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "positions": pos[:, :-1],
            "segment_ids": seg[:, :-1], "loss_mask": same_doc.astype(np.float32)}


class _Iterator:
    def __init__(self, owner: "SyntheticData"):
        self._o = owner
        self.step, self.tokens_seen = 0, 0
        self.phase_name = "synthetic"
        self.phase_index = 0

    def next_batch(self, batch_size: int) -> dict:
        o = self._o
        if batch_size % o.process_count:
            raise ValueError(f"global batch size {batch_size} must be a multiple of "
                             f"process_count={o.process_count}")
        rng = np.random.default_rng([o.seed, 1, self.step])
        batch = synthetic_batch(rng, o.perm, batch_size, o.seq_len)
        lo = o.process_index * batch_size // o.process_count
        hi = (o.process_index + 1) * batch_size // o.process_count
        self.step += 1
        self.tokens_seen += batch_size * o.seq_len
        return {k: v[lo:hi] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def set_state(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


class SyntheticData:
    def __init__(self, vocab_size: int, seq_len: int, *, seed: int = 0, steps: int = 1,
                 process_index: int = 0, process_count: int = 1):
        self.seq_len, self.seed = seq_len, seed
        self.process_index, self.process_count = process_index, process_count
        self.perm = np.random.default_rng(seed).permutation(vocab_size).astype(np.int32)
        self.phase_plan = [("synthetic", 0, steps)]
        self.train = _Iterator(self)

    def validation_batches(self, n: int, batch_size: int) -> list[dict]:
        out = []
        for i in range(n):
            b = synthetic_batch(np.random.default_rng([self.seed, 2, i]), self.perm, batch_size,
                                self.seq_len)
            lo = self.process_index * batch_size // self.process_count
            hi = (self.process_index + 1) * batch_size // self.process_count
            out.append({k: v[lo:hi] for k, v in b.items()})
        return out
