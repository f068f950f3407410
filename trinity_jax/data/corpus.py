"""Corpora: turn ``data.sources`` specs into files, read their documents, split train/validation.

Source specs (``data.sources`` is a tuple of ``(name, spec)`` pairs):

=================  ===========================================================================
``stdlib``         every ``*.py`` file of this Python's standard library
                   (``sysconfig.get_paths()['stdlib']``; site-packages, ``__pycache__``,
                   ``lib-dynload`` and ``config-*`` left out) — about 1,800 files, 34 MB
``stdlib:lib``     the non-test modules (about 12 MB)
``stdlib:tests``   the test files: a path component ``test``/``tests``/``idle_test`` or a
                   ``test_*.py`` name (about 22 MB)
``stdlib:docs``    natural language: per non-test module one document made of its module, class
                   and function docstrings, each under its qualified name and signature
``stdlib:PREFIX``  the files whose path inside the stdlib starts with PREFIX (``stdlib:email``)
``PATH.txt``       a UTF-8 text file: one document, or several separated by lines that read
                   exactly ``<|endoftext|>``
``PATH.jsonl``     one JSON object per line with a string field ``text``
``DIR``            every ``*.txt`` and ``*.jsonl`` file below DIR, in sorted order
=================  ===========================================================================

Every document has a *key* (its path relative to the source root, plus ``#i`` for the i-th
piece of a split ``.txt`` file or ``:LINE`` for a jsonl line). The train/validation split is a
pure function of the key: a document is in validation iff ``sha256(key)`` read as a fraction in
[0, 1) is below ``data.val_fraction`` — so stdlib files are split by file, the same way in every
subset (a module held out of ``stdlib:lib`` is also held out of ``stdlib:docs``).

Files that are not UTF-8 or cannot be read are skipped and counted (``ReadStats``); a source
with no document left is a ``DataError``.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterator, Optional

from trinity_jax.data.errors import DataError

__all__ = ["Source", "ReadStats", "resolve_source", "in_validation", "stdlib_root",
           "module_name", "DOC_SEPARATOR"]

CORPUS_VERSION = 1                      # bump when document extraction changes (rebuilds shards)
DOC_SEPARATOR = "<|endoftext|>"         # line separating documents inside a .txt file
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}
_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclasses.dataclass
class ReadStats:
    """Counts of what reading a source skipped (reported, never silent)."""

    files: int = 0
    documents: int = 0
    non_utf8: int = 0
    unreadable: int = 0
    unparsable: int = 0          # stdlib:docs modules that ast cannot parse
    empty: int = 0

    @property
    def skipped(self) -> int:
        return self.non_utf8 + self.unreadable + self.unparsable


def no_documents_error(source: "Source", stats: ReadStats, val_fraction: float,
                       n_validation: int = 0) -> DataError:
    """The error for a source that has no training document left, with what was skipped."""
    return DataError(
        f"source {source.name!r} ({source.spec}): no training documents ({stats.files} files "
        f"read; skipped {stats.non_utf8} not UTF-8, {stats.unreadable} unreadable, "
        f"{stats.unparsable} unparsable; {stats.empty} empty; {n_validation} in validation at "
        f"data.val_fraction={val_fraction})")


def in_validation(key: str, val_fraction: float) -> bool:
    """Deterministic split: sha256(key) as a fraction in [0, 1) below val_fraction."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < val_fraction


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_test_path(rel: str) -> bool:
    parts = rel.split("/")
    return any(p in _TEST_DIRS for p in parts[:-1]) or parts[-1].startswith("test_")


def module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".") if rel.endswith(".py") else rel.replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved source: its files (relpath, size, mtime_ns) under ``root``; nothing read yet."""

    name: str
    spec: str
    kind: str                 # stdlib | stdlib:lib | stdlib:tests | stdlib:docs | stdlib:prefix | text
    root: str
    files: tuple              # ((relpath, size, mtime_ns), ...) sorted

    def fingerprint(self) -> str:
        """Changes iff the spec, the extraction code version or any file's size/mtime changes."""
        payload = json.dumps([CORPUS_VERSION, self.kind, self.spec, self.root, list(self.files),
                              sys.version_info[:2]])
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f[1] for f in self.files)

    def documents(self, split: Optional[str] = None, val_fraction: float = 0.0,
                  stats: Optional[ReadStats] = None) -> Iterator[tuple[str, str]]:
        """Yield ``(key, text)`` in a fixed order; ``split`` in (None, 'train', 'validation')."""
        stats = stats if stats is not None else ReadStats()
        for rel, _, _ in self.files:
            stats.files += 1
            path = os.path.join(self.root, rel)
            text = _read_text(path, stats)
            if text is None:
                continue
            for key, doc in self._split_file(rel, path, text, stats):
                if split is not None and in_validation(key, val_fraction) != (split == "validation"):
                    continue
                if not doc.strip():
                    stats.empty += 1
                    continue
                stats.documents += 1
                yield key, doc

    def _split_file(self, rel: str, path: str, text: str, stats: ReadStats):
        if self.kind == "stdlib:docs":
            try:
                doc = module_docs(module_name(rel), text)
            except (SyntaxError, ValueError):
                stats.unparsable += 1
                return
            if doc:
                yield rel, doc
        elif rel.endswith(".jsonl"):
            yield from _jsonl_documents(rel, path, text)
        elif self.kind == "text":
            pieces = _split_txt(text)
            if len(pieces) == 1:
                yield rel, pieces[0]
            else:
                for i, p in enumerate(pieces):
                    yield f"{rel}#{i}", p
        else:
            yield rel, text


def _read_text(path: str, stats: ReadStats) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        stats.unreadable += 1
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.non_utf8 += 1
        return None


def _split_txt(text: str) -> list[str]:
    if DOC_SEPARATOR not in text:
        return [text]
    pieces, cur = [], []
    for line in text.splitlines(keepends=True):
        if line.strip() == DOC_SEPARATOR:
            pieces.append("".join(cur))
            cur = []
        else:
            cur.append(line)
    pieces.append("".join(cur))
    return pieces


def _jsonl_documents(rel: str, path: str, text: str):
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string field 'text', "
                            f"got {type(obj).__name__}"
                            + (f" with fields {sorted(obj)[:8]}" if isinstance(obj, dict) else ""))
        yield f"{rel}:{lineno}", obj["text"]


# ----------------------------------------------------------------------------- stdlib:docs

def _signature(node) -> str:
    try:
        return ast.unparse(node.args)
    except Exception:  # pragma: no cover - ast.unparse handles every parsed node
        return "..."


def module_docs(modname: str, source: str) -> str:
    """Module, class and function docstrings of one module, each under its qualified name."""
    tree = ast.parse(source)
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {modname}\n\n{doc}")

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                public = not node.name.startswith("_") or node.name == "__init__"
                if not public:
                    continue
                d = ast.get_docstring(node)
                qual = f"{prefix}.{node.name}"
                if isinstance(node, ast.ClassDef):
                    if d:
                        parts.append(f"class {qual}\n\n{d}")
                    visit(node.body, qual)
                elif d:
                    parts.append(f"{qual}({_signature(node)})\n\n{d}")

    visit(tree.body, modname)
    return "\n\n\n".join(parts)


# ----------------------------------------------------------------------------- resolution

def _walk(root: str, exts: tuple, skip_dirs=frozenset()) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in skip_dirs and not d.startswith("config-"))
        for fn in filenames:
            if fn.endswith(exts):
                full = os.path.join(dirpath, fn)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                out.append((rel, int(st.st_size), int(st.st_mtime_ns)))
    return sorted(out)


_STDLIB_CACHE: dict = {}


def _stdlib_files() -> list:
    root = stdlib_root()
    if root not in _STDLIB_CACHE:
        _STDLIB_CACHE[root] = _walk(root, (".py",), _STDLIB_SKIP_DIRS)
    return _STDLIB_CACHE[root]


def resolve_source(name: str, spec: str) -> Source:
    """``(name, spec)`` -> Source (stats the files, reads nothing); DataError if nothing matches."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        files = _stdlib_files()
        sub = spec.partition(":")[2]
        if sub == "":
            kind = "stdlib"
        elif sub in ("lib", "docs"):
            kind, files = f"stdlib:{sub}", [f for f in files if not is_test_path(f[0])]
        elif sub == "tests":
            kind, files = "stdlib:tests", [f for f in files if is_test_path(f[0])]
        else:
            kind, files = "stdlib:prefix", [f for f in files if f[0].startswith(sub)]
        if not files:
            raise DataError(f"data.sources[{name!r}]={spec!r}: no stdlib file matches under "
                            f"{stdlib_root()} (subsets: stdlib:lib, stdlib:tests, stdlib:docs, "
                            "stdlib:PREFIX)")
        return Source(name, spec, kind, stdlib_root(), tuple(files))
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        files = _walk(path, (".txt", ".jsonl"))
        if not files:
            raise DataError(f"data.sources[{name!r}]={spec!r}: the folder has no .txt or .jsonl "
                            "file (empty corpus)")
        return Source(name, spec, "text", path, tuple(files))
    if not os.path.exists(path):
        raise DataError(f"data.sources[{name!r}]={spec!r}: no such file or folder (expected "
                        "'stdlib', 'stdlib:lib|tests|docs|PREFIX', a .txt/.jsonl file or a folder)")
    if not path.endswith((".txt", ".jsonl")):
        raise DataError(f"data.sources[{name!r}]={spec!r}: unsupported file type; use a .txt or "
                        ".jsonl file or a folder of them")
    st = os.stat(path)
    if st.st_size == 0:
        raise DataError(f"data.sources[{name!r}]={spec!r}: the file is empty (empty corpus)")
    return Source(name, spec, "text", os.path.dirname(path),
                  ((os.path.basename(path), int(st.st_size), int(st.st_mtime_ns)),))
