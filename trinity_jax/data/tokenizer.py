"""Tokenizer: a byte-level BPE (``tokenizers``) with fixed special-token ids, trained or loaded.

Special tokens and their FIXED ids (they match ModelConfig pad/bos/eos defaults)::

    <pad>=0  <bos>=1  <eos>=2  <|system|>=3  <|user|>=4  <|assistant|>=5  <|end|>=6

The default tokenizer (``data.tokenizer == ""``) is a byte-level BPE with ``model.vocab_size``
entries trained on a deterministic sample of the training split (``sample_texts``: at most
``DEFAULT_SAMPLE_BYTES`` spread evenly over the sources, documents in key-hash order), with
digits split one by one (``Digits(individual_digits=True)`` before ``ByteLevel``). It is saved as
``<cache_dir>/tokenizer-<fingerprint>/tokenizer.json`` and reused while the sources, vocab size
and sample size are unchanged. ``data.tokenizer = PATH`` loads any Hugging Face
``tokenizer.json`` instead; it must fit in ``model.vocab_size``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Iterable, Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from trinity_jax.data.corpus import ReadStats, no_documents_error
from trinity_jax.data.errors import DataError

__all__ = ["SPECIAL_TOKENS", "PAD_ID", "BOS_ID", "EOS_ID", "ROLE_TOKENS", "END_TOKEN",
           "Tokenizer", "train_bpe", "load_tokenizer", "get_or_train_tokenizer",
           "DEFAULT_SAMPLE_BYTES"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
DEFAULT_SAMPLE_BYTES = 6_000_000
TOKENIZER_VERSION = 1


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids the model and pipeline need."""

    def __init__(self, tok: tokenizers.Tokenizer, path: str = "", *, pad_id=PAD_ID,
                 bos_id=BOS_ID, eos_id=EOS_ID):
        self.tok = tok
        self.path = path
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.hash = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (max id + 1), including added/special tokens."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(i)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in ``text`` (``<bos>``, ``<|user|>``, ...) are plain
        text unless ``allow_special`` (use it for ``sft.format_chat`` prompts)."""
        self.tok.encode_special_tokens = not allow_special
        try:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Documents -> ids (special-token strings are plain text)."""
        self.tok.encode_special_tokens = True
        try:
            return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str) -> None:
        _atomic_write(path, self.tok.to_str(pretty=True))


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _new_bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE of at most ``vocab_size`` ids; special tokens get ids 0..6 in order."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} ids (256 bytes + {len(SPECIAL_TOKENS)} "
                        "special tokens)")
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return Tokenizer(tok)


def check_tokenizer(tok: Tokenizer, vocab_size: int, *, where: str, pad_id=PAD_ID,
                    bos_id=BOS_ID, eos_id=EOS_ID, require_specials: bool = False) -> None:
    """A tokenizer must fit the model: every id < vocab_size, named specials at the model's ids.

    ``require_specials`` (the data pipeline, which wraps every document as ``<bos> … <eos>``):
    the three specials must exist, not only sit at the right ids where present: without them
    the model's bos/eos ids are ordinary tokens of that vocabulary."""
    if tok.vocab_size > vocab_size:
        raise DataError(f"{where}: the tokenizer has {tok.vocab_size} ids (token ids up to "
                        f"{tok.vocab_size - 1}) but model.vocab_size={vocab_size}; raise "
                        "model.vocab_size or use a smaller tokenizer")
    for name, want, field in (("<pad>", pad_id, "pad_token_id"), ("<bos>", bos_id, "bos_token_id"),
                              ("<eos>", eos_id, "eos_token_id")):
        got = tok.token_to_id(name)
        if got is not None and got != want:
            raise DataError(f"{where}: token {name} has id {got} but model.{field}={want}")
        if got is None and require_specials:
            raise DataError(f"{where}: the tokenizer has no {name} token, so model.{field}={want} "
                            f"is its ordinary token {tok.id_to_token(want)!r}; documents are "
                            f"wrapped as <bos> … <eos>: use a tokenizer with <pad>, <bos>, <eos> "
                            f"at the model's ids")


def load_tokenizer(path: str, vocab_size: int, *, require_specials: bool = False, **ids) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json``; DataError if unreadable or larger than the model
    (or, with ``require_specials``, without the <pad>/<bos>/<eos> tokens: see check_tokenizer)."""
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise DataError(f"data.tokenizer={path!r}: cannot load a tokenizer.json ({e})") from None
    out = Tokenizer(tok, path, **{k: v for k, v in ids.items()})
    check_tokenizer(out, vocab_size, where=f"data.tokenizer={path!r}", require_specials=require_specials, **ids)
    return out


def sample_texts(sources, val_fraction: float, max_bytes: int) -> list[str]:
    """Deterministic training sample: per source up to max_bytes/len(sources), in key-hash order."""
    per_source = max_bytes // max(1, len(sources))
    out = []
    for src in sources:
        stats = ReadStats()
        docs = list(src.documents("train", val_fraction, stats))
        if not docs:
            raise no_documents_error(src, stats, val_fraction)
        docs.sort(key=lambda kd: hashlib.sha256(kd[0].encode()).digest())
        used = 0
        for _, text in docs:
            if used >= per_source:
                break
            text = text[: per_source - used]
            out.append(text)
            used += len(text)
    return out


def get_or_train_tokenizer(data_cfg, model_cfg, sources, cache_dir: str, *,
                           sample_bytes: int = DEFAULT_SAMPLE_BYTES, log=print) -> Tokenizer:
    """``data.tokenizer`` if set, else the cached BPE for these sources (trained on first use)."""
    ids = dict(pad_id=model_cfg.pad_token_id, bos_id=model_cfg.bos_token_id,
               eos_id=model_cfg.eos_token_id)
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer, model_cfg.vocab_size, require_specials=True, **ids)
    if (model_cfg.pad_token_id, model_cfg.bos_token_id, model_cfg.eos_token_id) != (PAD_ID, BOS_ID, EOS_ID):
        raise DataError(f"model.pad/bos/eos_token_id=({model_cfg.pad_token_id}, "
                        f"{model_cfg.bos_token_id}, {model_cfg.eos_token_id}): the built-in BPE "
                        f"uses ({PAD_ID}, {BOS_ID}, {EOS_ID}); set data.tokenizer to use others")
    fp = hashlib.sha256(json.dumps(
        [TOKENIZER_VERSION, model_cfg.vocab_size, sample_bytes, data_cfg.val_fraction,
         sorted(s.fingerprint() for s in sources)]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokenizer-{fp}", "tokenizer.json")
    if os.path.exists(path):
        try:
            tok = Tokenizer(tokenizers.Tokenizer.from_file(path), path, **ids)
            check_tokenizer(tok, model_cfg.vocab_size, where=path, **ids)
            return tok
        except Exception:   # a damaged cache file: retrain below
            log(f"[data] cached tokenizer {path} is unreadable; retraining")
    t0 = time.time()
    texts = sample_texts(sources, data_cfg.val_fraction, sample_bytes)
    if not texts:
        raise DataError("data.sources: no training text to train the tokenizer on (empty corpus)")
    tok = train_bpe(texts, model_cfg.vocab_size)
    tok.path = path
    tok.save(path)
    log(f"[data] trained a {tok.vocab_size}-id byte-level BPE on "
        f"{sum(map(len, texts)) / 1e6:.1f} MB in {time.time() - t0:.1f}s -> {path}")
    return tok


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Each text -> uint32 ``[bos] + ids + [eos]``."""
    out = []
    for ids in tok.encode_batch(texts):
        a = np.empty(len(ids) + 2, np.uint32)
        a[0], a[-1] = tok.bos_id, tok.eos_id
        a[1:-1] = ids
        out.append(a)
    return out
