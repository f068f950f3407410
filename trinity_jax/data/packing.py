"""Sequence layouts (packing and RSDB, SPEC §4) as grain IterDatasets, and layouts -> batches.

A *document stream* is a grain ``MapDataset`` whose element k is ``(source, doc)``: per source
a shuffled, endlessly repeated (reseeded every epoch) range of its documents, mixed by
``grain.MapDataset.mix`` (a deterministic weighted interleave). Mixture weights are token
fractions, so each source's document weight is its token weight / its mean document length.

The two loaders turn a document stream into *layouts*: one per sequence of ``L = seq_len + 1``
tokens, an int64 array ``[pieces, 4]`` of ``(source, doc, start, stop)`` token ranges. Layouts
are cheap to compute, so every process walks the same global stream and materialises only
its own rows (``layouts_to_batch``).

- ``PackedIterDataset`` ("packed"): documents concatenated in stream order and cut into
  sequences; the leftover of a document starts the next sequence.
  State ``{"doc": k, "head": h}``: next document index in the stream and tokens already used.
- ``RSDBIterDataset`` ("rsdb", random sequential document buffer): a buffer of whole documents,
  each with a read head. A sequence is filled by repeatedly picking a random unfinished
  buffered document and copying from its head (advancing it) until the document or the
  sequence ends. The buffer holds ``2 * size`` documents; when the number of unfinished ones
  drops to ``size`` the finished ones are dropped and the buffer is refilled in bulk from the
  stream. Picks use ``np.random.default_rng([seed, sequence_counter])``.
  State ``{"doc": k, "seq": n, "buffer": [[doc_index, head], ...]}``.

Both are exact under ``get_state``/``set_state`` (plain JSON-able dicts).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import grain
import numpy as np

__all__ = ["document_stream", "PackedIterDataset", "RSDBIterDataset", "layouts_to_batch"]


def document_stream(lengths: Sequence[np.ndarray], weights: Sequence[float], seed: int,
                    *, sources: Optional[Sequence[int]] = None, repeat: bool = True,
                    shuffle: bool = True) -> grain.MapDataset:
    """Element k -> ``(source_index, doc_index)``; ``lengths[i]`` are source i's document lengths.

    ``weights`` are token fractions; ``sources`` are the indices reported for each entry
    (default 0..n-1). Sources with weight 0 must be left out by the caller.
    """
    sources = list(range(len(lengths))) if sources is None else list(sources)
    parts, doc_weights = [], []
    for s, lens, w in zip(sources, lengths, weights):
        ds = grain.MapDataset.range(len(lens))
        if shuffle:
            ds = ds.shuffle(seed=int(seed * 1_000_003 + s) % (2 ** 31))
        if repeat:
            ds = ds.repeat(None)
        parts.append(ds.map(_Tag(s)))
        doc_weights.append(w / max(1.0, float(np.mean(lens))))
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, doc_weights)


class _Tag:
    def __init__(self, s: int):
        self.s = s

    def __call__(self, i):
        return (self.s, int(i))


class _DocLengths:
    """``(source, doc) -> length`` over per-source length arrays."""

    def __init__(self, lengths: Sequence[np.ndarray]):
        self.lengths = [np.asarray(l, np.int64) for l in lengths]

    def __call__(self, ref) -> int:
        return int(self.lengths[ref[0]][ref[1]])


# ----------------------------------------------------------------------------- packing

class PackedIterDataset(grain.IterDataset):
    """Concatenate-and-split packing of a document stream into layouts of ``length`` tokens.

    With ``finite=True`` (validation) the stream is read once; the last layout may be shorter
    than ``length`` (padded when materialised).
    """

    def __init__(self, stream: grain.MapDataset, lengths: Sequence[np.ndarray], length: int,
                 *, finite: bool = False):
        super().__init__(stream)
        self.stream, self.doc_len, self.length, self.finite = stream, _DocLengths(lengths), length, finite

    def __iter__(self):
        return _PackedIterator(self)


class _PackedIterator(grain.DatasetIterator):
    def __init__(self, ds: PackedIterDataset):
        super().__init__()
        self.ds = ds
        self.doc, self.head = 0, 0

    def __next__(self) -> np.ndarray:
        ds, need, pieces = self.ds, self.ds.length, []
        while need > 0:
            if ds.finite and self.doc >= len(ds.stream):
                break
            ref = ds.stream[self.doc]
            n = ds.doc_len(ref)
            take = min(n - self.head, need)
            pieces.append((ref[0], ref[1], self.head, self.head + take))
            self.head += take
            need -= take
            if self.head == n:
                self.doc, self.head = self.doc + 1, 0
        if not pieces:
            raise StopIteration
        return np.asarray(pieces, np.int64).reshape(-1, 4)

    def get_state(self) -> dict:
        return {"doc": self.doc, "head": self.head}

    def set_state(self, state: dict) -> None:
        self.doc, self.head = int(state["doc"]), int(state["head"])


# ----------------------------------------------------------------------------- RSDB

class RSDBIterDataset(grain.IterDataset):
    """Random sequential document buffer (SPEC §4) over an endless document stream."""

    def __init__(self, stream: grain.MapDataset, lengths: Sequence[np.ndarray], length: int,
                 *, buffer_size: int, seed: int):
        super().__init__(stream)
        self.stream, self.doc_len, self.length = stream, _DocLengths(lengths), length
        self.buffer_size, self.seed = buffer_size, seed

    def __iter__(self):
        return _RSDBIterator(self)


class _RSDBIterator(grain.DatasetIterator):
    def __init__(self, ds: RSDBIterDataset):
        super().__init__()
        self.ds = ds
        self.doc, self.seq = 0, 0
        self.buffer: list[list] = []      # [stream index, head, (source, doc), length]
        self._live_idx: list[int] = []    # buffer positions of unfinished documents, in order
        self.on_refill: Optional[Callable] = None   # test hook: called with the iterator

    def _entry(self, k: int, head: int) -> list:
        ref = self.ds.stream[k]
        return [k, head, ref, self.ds.doc_len(ref)]

    def _live(self) -> list[int]:
        return list(self._live_idx)

    def _refill(self) -> None:
        """Drop finished documents, then add whole new ones up to twice the user size."""
        self.buffer = [e for e in self.buffer if e[1] < e[3]]
        while len(self.buffer) < 2 * self.ds.buffer_size:
            self.buffer.append(self._entry(self.doc, 0))
            self.doc += 1
        self._live_idx = list(range(len(self.buffer)))
        if self.on_refill is not None:
            self.on_refill(self)

    def __next__(self) -> np.ndarray:
        if not self.buffer:
            self._refill()
        rng = np.random.default_rng([self.ds.seed, self.seq])
        self.seq += 1
        need, pieces, live = self.ds.length, [], self._live_idx
        while need > 0:
            j = live[int(rng.integers(len(live)))]
            entry = self.buffer[j]
            take = min(entry[3] - entry[1], need)
            pieces.append((entry[2][0], entry[2][1], entry[1], entry[1] + take))
            entry[1] += take
            need -= take
            if entry[1] == entry[3]:
                live.remove(j)
                if len(live) <= self.ds.buffer_size:
                    self._refill()
                    live = self._live_idx
        return np.asarray(pieces, np.int64).reshape(-1, 4)

    def get_state(self) -> dict:
        return {"doc": self.doc, "seq": self.seq,
                "buffer": [[int(e[0]), int(e[1])] for e in self.buffer]}

    def set_state(self, state: dict) -> None:
        self.doc, self.seq = int(state["doc"]), int(state["seq"])
        self.buffer = [self._entry(int(k), int(h)) for k, h in state["buffer"]]
        self._live_idx = [j for j, e in enumerate(self.buffer) if e[1] < e[3]]


# ----------------------------------------------------------------------------- batches

def layouts_to_batch(layouts: Sequence[np.ndarray], fetch: Callable, seq_len: int, *,
                     intra_doc_mask: bool = True, pad_id: int = 0,
                     fetch_mask: Optional[Callable] = None) -> dict:
    """Materialise layouts into the batch dict of docs/contracts.md.

    ``fetch(source, doc, start, stop)`` returns the tokens of a piece; ``fetch_mask`` (SFT) the
    0/1 weight of each token *as a target*. Every piece is one segment (ids 1, 2, ... in the
    row, 0 = padding) with positions restarting at 0. With ``intra_doc_mask=False`` segment ids
    are 1 on every real token and positions run 0..S-1.
    """
    b, s1 = len(layouts), seq_len + 1
    tok = np.full((b, s1), pad_id, np.int32)
    seg = np.zeros((b, s1), np.int32)
    pos = np.zeros((b, s1), np.int32)
    weight = np.ones((b, s1), np.float32) if fetch_mask is not None else None
    for r, pieces in enumerate(layouts):
        c = 0
        for j, (src, doc, a, z) in enumerate(np.asarray(pieces).tolist()):
            n = z - a
            tok[r, c:c + n] = fetch(src, doc, a, z)
            seg[r, c:c + n] = j + 1
            pos[r, c:c + n] = np.arange(n)
            if weight is not None:
                weight[r, c:c + n] = fetch_mask(src, doc, a, z)
            c += n
    real = seg > 0
    if intra_doc_mask:
        segment_ids, positions = seg[:, :-1], pos[:, :-1]
        mask = (seg[:, 1:] == seg[:, :-1]) & real[:, :-1]
    else:
        segment_ids = real[:, :-1].astype(np.int32)
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy()
        mask = real[:, 1:] & real[:, :-1]
    loss_mask = mask.astype(np.float32)
    if weight is not None:
        loss_mask *= weight[:, 1:]
    return {"inputs": np.ascontiguousarray(tok[:, :-1]), "targets": np.ascontiguousarray(tok[:, 1:]),
            "positions": np.ascontiguousarray(positions), "segment_ids": np.ascontiguousarray(segment_ids),
            "loss_mask": loss_mask}
