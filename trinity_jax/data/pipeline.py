"""The data entry point: config -> tokenizer, token shards, phase plan and batch iterators.

```python
from trinity_jax.data import build_data
dm = build_data(cfg, workdir, process_index=jax.process_index(), process_count=jax.process_count())
dm.tokenizer                 # data.tokenizer.Tokenizer (encode / decode / vocab_size / path)
dm.phase_plan                # [(name, start_step, end_step), ...]; dm.phases has the mixtures
dm.unigram_entropy           # nats per token of the first phase's training mixture (+ _bits)
batch = dm.train.next_batch(B)   # this process's rows of global batch B (B % process_count == 0)
dm.train.get_state() / dm.train.set_state(state)   # JSON-able; exact resume
dm.train.step, dm.train.phase_index, dm.train.phase_name, dm.train.tokens_seen
val = dm.validation_batches(n, B)   # <= n fixed batches over the validation split
```

``train.next_batch(B)`` must be called once per optimizer step with that step's *global*
batch size (it may change at a ramp or phase boundary); the step counter it keeps selects the
phase of ``phase_plan`` (after the last phase the last one continues). Each phase reads its own
stream, seeded by ``data.seed`` and the phase index; a document cut at the end of a phase is
not continued in the next one. Every process walks the
same global stream of sequence layouts (cheap: integer ranges only) and materialises rows
``[p*B/P, (p+1)*B/P)``, so P processes together see exactly the 1-process global batch. The
iterator is a ``grain.DatasetIterator``: ``grain.checkpoint.CheckpointSave(dm.train)`` works in
an Orbax Composite, and ``next(dm.train)`` gives the batch of ``ramp_batch_size``.

Batch format (docs/contracts.md): ``inputs, targets, positions, segment_ids`` int32 ``[B/P, S]``
and ``loss_mask`` float32. Each row holds ``S + 1`` stream tokens (inputs ``[:-1]``, targets
``[1:]``); every document piece in a row is a segment (ids 1, 2, ...) whose positions restart
at 0 — also for the continuation of a document cut at the previous row's end. ``loss_mask`` is
0 on a target that belongs to another segment than its input (the ``<eos> -> <bos>`` step)
and on padding. With ``data.intra_doc_mask=False``: segment ids 1, positions 0..S-1, mask 1
(except padding). Training batches never pad; validation pads only its last row/batch.

Validation: the validation documents of all sources, shuffled once with a fixed seed
(independent of ``data.seed``), packed, read once: ``validation_batches(n, B)`` returns the first
``min(n, available)`` batches (a short last batch is filled with all-padding rows, mask 0).
"""
from __future__ import annotations

import math
import os
import sys

import grain
import numpy as np

from trinity_jax.config import ExperimentConfig
from trinity_jax.data.corpus import resolve_source
from trinity_jax.data.errors import DataError
from trinity_jax.data.packing import (PackedIterDataset, RSDBIterDataset, document_stream,
                                      layouts_to_batch)
from trinity_jax.data.phases import Phase, plan_phases, ramp_batch_size
from trinity_jax.data.shards import SourceShards, load_or_build_shards
from trinity_jax.data.tokenizer import Tokenizer, get_or_train_tokenizer

__all__ = ["build_data", "DataModule", "TrainIterator", "cache_dir_for"]

_VALIDATION_SEED = 20240601
STATE_VERSION = 1


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir_for(cfg: ExperimentConfig, workdir: str) -> str:
    return cfg.data.cache_dir or os.path.join(workdir, "data")


class TrainIterator(grain.DatasetIterator):
    """Stateful global-batch iterator over the phases (see module docstring)."""

    def __init__(self, module: "DataModule"):
        super().__init__()
        self._m = module
        self.step, self.tokens_seen = 0, 0
        self.phase_index = self._phase_at(0)
        self._it = iter(module.phase_dataset(self.phase_index))

    @property
    def phase_name(self) -> str:
        return self._m.phases[self.phase_index].name

    def _phase_at(self, step: int) -> int:
        phases = self._m.phases
        for p in phases:
            if p.start_step <= step < p.end_step:
                return p.index
        return max((p.index for p in phases if p.end_step > p.start_step), default=len(phases) - 1)

    def next_batch(self, batch_size: int) -> dict:
        """This process's rows of the next global batch of ``batch_size`` sequences."""
        pc, pi = self._m.process_count, self._m.process_index
        if batch_size < 1 or batch_size % pc:
            raise ValueError(f"global batch size {batch_size} must be a positive multiple of "
                             f"process_count={pc}")
        phase = self._phase_at(self.step)
        if phase != self.phase_index:
            self.phase_index, self._it = phase, iter(self._m.phase_dataset(phase))
        layouts = [next(self._it) for _ in range(batch_size)]
        lo, hi = pi * batch_size // pc, (pi + 1) * batch_size // pc
        self.step += 1
        self.tokens_seen += batch_size * self._m.seq_len
        return self._m.materialize(layouts[lo:hi])

    def __next__(self) -> dict:
        return self.next_batch(ramp_batch_size(self._m.cfg.train, self.tokens_seen))

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "tokens_seen": self.tokens_seen,
                "phase": self.phase_index, "phase_name": self.phase_name,
                "stream": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')!r} is not "
                            f"{STATE_VERSION}; cannot resume this checkpoint's data position")
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        phase = int(state["phase"])
        if phase >= len(self._m.phases) or self._m.phases[phase].name != state.get("phase_name"):
            raise DataError(f"data iterator state is in phase {state.get('phase_name')!r} which "
                            "is not in this config's data.phases at the same index")
        self.phase_index = phase
        self._it = iter(self._m.phase_dataset(phase))
        self._it.set_state(state["stream"])


class DataModule:
    """Everything the trainer needs from data/ (built by ``build_data``)."""

    def __init__(self, cfg: ExperimentConfig, tokenizer: Tokenizer, shards: dict,
                 process_index: int, process_count: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.shards: dict[str, SourceShards] = shards
        self.source_names = list(shards)
        self.process_index, self.process_count = process_index, process_count
        self.seq_len = cfg.train.seq_len
        self.phases: list[Phase] = plan_phases(cfg.data, cfg.train)
        self.phase_plan = [(p.name, p.start_step, p.end_step) for p in self.phases]
        self._val_cache: dict = {}
        self.train = TrainIterator(self)

    # ---------------------------------------------------------------- streams
    def phase_dataset(self, index: int) -> grain.IterDataset:
        """The layout IterDataset of phase ``index`` (fresh stream, seeded by data.seed + index)."""
        phase = self.phases[index]
        src_idx = [self.source_names.index(s) for s, _ in phase.mixture]
        lengths = [self.shards[s].train.lengths for s, _ in phase.mixture]
        seed = self.cfg.data.seed * 1000 + index
        stream = document_stream(lengths, [w for _, w in phase.mixture], seed, sources=src_idx)
        all_lengths = [self.shards[s].train.lengths for s in self.source_names]
        length = self.seq_len + 1
        if self.cfg.data.loading == "rsdb":
            return RSDBIterDataset(stream, all_lengths, length, buffer_size=self.cfg.data.rsdb_buffer,
                                   seed=seed)
        return PackedIterDataset(stream, all_lengths, length)

    def _fetch(self, split: str):
        shards = [self.shards[s].splits[split] for s in self.source_names]
        return lambda src, doc, a, z: shards[src].doc(doc, a, z)

    def materialize(self, layouts, split: str = "train") -> dict:
        return layouts_to_batch(layouts, self._fetch(split), self.seq_len,
                                intra_doc_mask=self.cfg.data.intra_doc_mask,
                                pad_id=self.cfg.model.pad_token_id)

    # ---------------------------------------------------------------- validation
    def _validation_layouts(self, n_rows: int) -> list:
        refs = [(i, d) for i, s in enumerate(self.source_names)
                for d in range(self.shards[s].validation.n_docs)]
        if not refs:
            return []
        order = np.random.default_rng(_VALIDATION_SEED).permutation(len(refs))
        stream = grain.MapDataset.source([refs[i] for i in order])
        lengths = [self.shards[s].validation.lengths for s in self.source_names]
        it = iter(PackedIterDataset(stream, lengths, self.seq_len + 1, finite=True))
        out = []
        for layout in it:
            out.append(layout)
            if len(out) >= n_rows:
                break
        return out

    def validation_batches(self, n: int, batch_size: int) -> list[dict]:
        """The first ``<= n`` global validation batches (this process's rows), always the same."""
        pc, pi = self.process_count, self.process_index
        if batch_size < 1 or batch_size % pc:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of "
                             f"process_count={pc}")
        key = (n, batch_size)
        if key not in self._val_cache:
            layouts = self._validation_layouts(n * batch_size)
            batches = []
            for b in range(math.ceil(len(layouts) / batch_size)):
                rows = layouts[b * batch_size:(b + 1) * batch_size]
                rows += [np.zeros((0, 4), np.int64)] * (batch_size - len(rows))
                lo, hi = pi * batch_size // pc, (pi + 1) * batch_size // pc
                batches.append(self.materialize(rows[lo:hi], "validation"))
            self._val_cache[key] = batches
        return self._val_cache[key]

    # ---------------------------------------------------------------- statistics
    def unigram_probs(self, phase_index: int = 0) -> np.ndarray:
        p = np.zeros(self.cfg.model.vocab_size, np.float64)
        for s, w in self.phases[phase_index].mixture:
            c = self.shards[s].unigram.astype(np.float64)
            p += w * c / max(1.0, c.sum())
        return p

    @property
    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the unigram distribution of phase 1's training tokens: the
        cross-entropy of a model that ignores context, a baseline for the training loss."""
        p = self.unigram_probs(0)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    @property
    def unigram_entropy_bits(self) -> float:
        return self.unigram_entropy / math.log(2)

    def summary(self) -> str:
        lines = [f"tokenizer: {self.tokenizer.vocab_size} ids ({self.tokenizer.path})"]
        for name, sh in self.shards.items():
            t, v = sh.train, sh.validation
            lines.append(f"source {name!r}: {t.n_docs} docs / {t.n_tokens:,} tokens train, "
                         f"{v.n_docs} docs / {v.n_tokens:,} tokens validation")
        for p in self.phases:
            mix = ", ".join(f"{s}={w:.2f}" for s, w in p.mixture)
            lines.append(f"phase {p.name}: steps [{p.start_step}, {p.end_step}) "
                         f"{p.tokens:,} tokens; mixture {mix}")
        lines.append(f"unigram entropy: {self.unigram_entropy:.3f} nats/token "
                     f"({self.unigram_entropy_bits:.3f} bits)")
        return "\n".join(lines)


def build_data(cfg: ExperimentConfig, workdir: str, *, process_index: int = 0,
               process_count: int = 1, log=_log) -> DataModule:
    """Resolve sources, get the tokenizer, load or build the token shards, plan the phases.

    Raises ``DataError`` (a ``ConfigError``) naming the file, line or field for bad input.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    names = [n for n, _ in cfg.data.sources]
    for i, p in enumerate(cfg.data.phases):
        for s, _ in p.mixture:
            if s not in names:
                raise DataError(f"data.phases[{i}].mixture names unknown source {s!r}; known "
                                f"sources (data.sources): {sorted(names)}")
    sources = [resolve_source(n, spec) for n, spec in cfg.data.sources]
    cache = cache_dir_for(cfg, workdir)
    os.makedirs(cache, exist_ok=True)
    tok = get_or_train_tokenizer(cfg.data, cfg.model, sources, cache, log=log)
    shards = {}
    for src in sources:
        shards[src.name] = load_or_build_shards(src, tok, cache, val_fraction=cfg.data.val_fraction,
                                                vocab_size=cfg.model.vocab_size, log=log)
    return DataModule(cfg, tok, shards, process_index, process_count)
