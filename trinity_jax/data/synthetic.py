"""Small deterministic corpora for tests, benchmarks and examples (no download, no stdlib)."""
from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["write_text_corpus", "write_jsonl_corpus", "synthetic_document"]

_WORDS = ("the a of to in is for on with as by at from it this that data model token expert "
          "router layer batch loss step phase buffer shard python def return class import value "
          "list dict 0 1 2 3 4 5 6 7 8 9 42 100 2024 error file line json text").split()


def synthetic_document(rng: np.random.Generator, min_words: int = 5, max_words: int = 120) -> str:
    n = int(rng.integers(min_words, max_words + 1))
    words = rng.choice(_WORDS, size=n)
    lines, line = [], []
    for w in words:
        line.append(str(w))
        if rng.random() < 0.12:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    if line:
        lines.append(" ".join(line) + ".")
    return "\n".join(lines) + "\n"


def write_text_corpus(folder: str, n_files: int, *, seed: int = 0, docs_per_file: int = 1,
                      **kw) -> str:
    """``n_files`` .txt files (several documents each, separated by ``<|endoftext|>`` lines)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n_files):
        docs = [synthetic_document(rng, **kw) for _ in range(docs_per_file)]
        with open(os.path.join(folder, f"doc_{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write("<|endoftext|>\n".join(docs))
    return folder


def write_jsonl_corpus(path: str, n_docs: int, *, seed: int = 1, **kw) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": synthetic_document(rng, **kw)}) + "\n")
    return path
