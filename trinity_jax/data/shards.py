"""Token shards: each source tokenised once into tensorstore arrays, with a manifest written last.

Layout of one source (``<cache_dir>/shards/<name>-<fingerprint16>/``)::

    manifest.json           written last; {"complete": true, fingerprint, source files, tokenizer
                            hash, per split n_docs / n_tokens, skipped-file counts, ...}
    train/tokens            zarr3 uint32 [n_tokens], zstd   (each document = <bos> ids <eos>)
    train/offsets           zarr3 int64  [n_docs + 1]       (document i = tokens[o[i]:o[i+1]])
    validation/{tokens,offsets}
    unigram.npy             int64 [vocab] counts of the training tokens

The fingerprint hashes the source (spec, file list with sizes and mtimes, extraction version),
the tokenizer hash, ``data.val_fraction`` and the shard format version. A shard is built in a
``.tmp-*`` folder that is renamed into place only after its manifest is written, so a folder
with the final name is complete; on load the manifest, fingerprint and array shapes are checked
anyway, and anything that does not match is deleted and rebuilt — never read. A re-run with
nothing changed only stats the source files and reads the arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Optional

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from trinity_jax.data.corpus import ReadStats, Source, in_validation, no_documents_error
from trinity_jax.data.errors import DataError
from trinity_jax.data.tokenizer import Tokenizer, encode_documents

__all__ = ["TokenShard", "SourceShards", "load_or_build_shards", "SPLITS"]

SHARD_VERSION = 1
SPLITS = ("train", "validation")
_CHUNK = 1 << 20                 # tokens per zarr chunk
_IN_MEMORY_MAX_TOKENS = 1 << 28  # shards up to 1 GiB of tokens are read into memory
_ENCODE_BATCH = 32               # documents per tokenizers.encode_batch call


def _ts_spec(path: str, shape: Optional[int] = None, dtype: str = "uint32") -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if shape is None:
        spec["open"] = True
    else:
        spec.update(create=True, delete_existing=True, metadata={
            "shape": [shape], "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [_CHUNK]}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3}}]})
    return spec


def _write_array(path: str, data: np.ndarray) -> None:
    arr = ts.open(_ts_spec(path, len(data), str(data.dtype))).result()
    for a in range(0, len(data), 16 * _CHUNK):
        z = min(len(data), a + 16 * _CHUNK)
        arr[a:z].write(np.ascontiguousarray(data[a:z])).result()


class TokenShard:
    """One split of one source: ``doc(i)`` -> uint32 tokens of document i (with bos/eos)."""

    def __init__(self, path: str, n_docs: int, n_tokens: int):
        self.path = path
        offsets = ts.open(_ts_spec(os.path.join(path, "offsets"))).result()
        tokens = ts.open(_ts_spec(os.path.join(path, "tokens"))).result()
        if offsets.shape != (n_docs + 1,) or tokens.shape != (n_tokens,):
            raise ValueError(f"{path}: arrays {offsets.shape}/{tokens.shape} do not match the "
                             f"manifest ({n_docs} docs, {n_tokens} tokens)")
        self.offsets = offsets.read().result().astype(np.int64)
        if self.offsets[0] != 0 or self.offsets[-1] != n_tokens or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"{path}: offsets are not a valid partition of the tokens")
        self._ts = tokens
        self.tokens = tokens.read().result() if n_tokens <= _IN_MEMORY_MAX_TOKENS else None
        self.lengths = np.diff(self.offsets)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        a = int(self.offsets[i])
        b = int(self.offsets[i + 1]) if stop is None else a + stop
        if self.tokens is not None:
            return self.tokens[a + start:b]
        return self._ts[a + start:b].read().result()


class SourceShards:
    def __init__(self, name: str, path: str, manifest: dict):
        self.name, self.path, self.manifest = name, path, manifest
        self.splits = {s: TokenShard(os.path.join(path, s), manifest["splits"][s]["n_docs"],
                                     manifest["splits"][s]["n_tokens"]) for s in SPLITS}
        self.unigram = np.load(os.path.join(path, "unigram.npy"), allow_pickle=False)

    @property
    def train(self) -> TokenShard:
        return self.splits["train"]

    @property
    def validation(self) -> TokenShard:
        return self.splits["validation"]


def _fingerprint(source: Source, tok: Tokenizer, val_fraction: float) -> str:
    payload = json.dumps([SHARD_VERSION, source.fingerprint(), tok.hash, val_fraction])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _try_load(name: str, path: str, fingerprint: str) -> Optional[SourceShards]:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.exists(mpath):
        return None
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("complete") is not True or manifest.get("fingerprint") != fingerprint:
            return None
        return SourceShards(name, path, manifest)
    except Exception:      # damaged or half-written: the caller deletes and rebuilds
        return None


def load_or_build_shards(source: Source, tok: Tokenizer, cache_dir: str, *, val_fraction: float,
                         vocab_size: int, log=print) -> SourceShards:
    """The shards of ``source``: loaded if complete and current, else (re)built atomically."""
    fp = _fingerprint(source, tok, val_fraction)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", source.name)
    root = os.path.join(cache_dir, "shards")
    path = os.path.join(root, f"{safe}-{fp}")
    shards = _try_load(source.name, path, fp)
    if shards is not None:
        return shards
    if os.path.exists(path):
        log(f"[data] shard {path} is incomplete or does not match; rebuilding")
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _build(source, tok, tmp, fp, val_fraction=val_fraction, vocab_size=vocab_size,
                          log=log)
        try:
            os.rename(tmp, path)
        except OSError:          # another process finished first: use its copy if it is valid
            shards = _try_load(source.name, path, fp)
            if shards is None:
                raise
            return shards
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SourceShards(source.name, path, manifest)


def _build(source: Source, tok: Tokenizer, out: str, fingerprint: str, *, val_fraction: float,
           vocab_size: int, log) -> dict:
    t0 = time.time()
    os.makedirs(out)
    stats = ReadStats()
    bins = {s: open(os.path.join(out, f"{s}.bin"), "wb") for s in SPLITS}
    lengths = {s: [] for s in SPLITS}
    unigram = np.zeros(vocab_size, np.int64)
    max_id = 0
    pbar = tqdm(total=len(source.files), desc=f"tokenize {source.name}", unit="file",
                file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def flush(batch):
        nonlocal max_id
        for (key, split), arr in zip(((k, s) for k, s, _ in batch),
                                     encode_documents(tok, [t for _, _, t in batch])):
            if len(arr):
                max_id = max(max_id, int(arr.max()))
            if max_id >= vocab_size:
                raise DataError(f"source {source.name!r} ({key}): token id {max_id} >= "
                                f"model.vocab_size={vocab_size} (tokenizer {tok.path or tok.hash})")
            arr.tofile(bins[split])
            lengths[split].append(len(arr))
            if split == "train":
                unigram[:] += np.bincount(arr, minlength=vocab_size)
        pbar.update(stats.files - pbar.n)

    try:
        batch = []
        for key, text in source.documents(None, 0.0, stats):
            split = "validation" if in_validation(key, val_fraction) else "train"
            batch.append((key, split, text))
            if len(batch) >= _ENCODE_BATCH:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        pbar.close()
        for f in bins.values():
            f.close()
    skipped = (f"{stats.non_utf8} not UTF-8, {stats.unreadable} unreadable, "
               f"{stats.unparsable} unparsable")
    if not lengths["train"]:
        raise no_documents_error(source, stats, val_fraction, len(lengths["validation"]))
    split_info = {}
    for s in SPLITS:
        toks = np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint32)
        offsets = np.zeros(len(lengths[s]) + 1, np.int64)
        np.cumsum(lengths[s], out=offsets[1:])
        _write_array(os.path.join(out, s, "tokens"), toks)
        _write_array(os.path.join(out, s, "offsets"), offsets)
        os.remove(os.path.join(out, f"{s}.bin"))
        split_info[s] = {"n_docs": len(lengths[s]), "n_tokens": int(offsets[-1])}
    np.save(os.path.join(out, "unigram.npy"), unigram, allow_pickle=False)
    manifest = {
        "complete": True, "version": SHARD_VERSION, "fingerprint": fingerprint,
        "source": {"name": source.name, "spec": source.spec, "kind": source.kind,
                   "root": source.root, "files": [list(f) for f in source.files]},
        "tokenizer": {"hash": tok.hash, "path": tok.path, "vocab_size": tok.vocab_size},
        "val_fraction": val_fraction, "splits": split_info,
        "skipped": {"non_utf8": stats.non_utf8, "unreadable": stats.unreadable,
                    "unparsable": stats.unparsable, "empty": stats.empty},
        "seconds": round(time.time() - t0, 2),
    }
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, "manifest.json"))
    log(f"[data] tokenised {source.name!r}: {split_info['train']['n_docs']} train / "
        f"{split_info['validation']['n_docs']} validation documents, "
        f"{split_info['train']['n_tokens']:,} train tokens in {manifest['seconds']}s"
        + (f" (skipped {skipped})" if stats.skipped else ""))
    return manifest
