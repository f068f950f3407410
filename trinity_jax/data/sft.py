"""SFT data (SPEC §4 post-training): chat template, assistant-only loss mask, builtin instructions.

Chat template (role markers are special tokens, so content can never forge them)::

    <bos><|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n<eos>

``encode_chat`` returns the ids and a 0/1 *target weight* per token: 1 on the tokens of every
assistant message's ``\\n{content}`` and on the ``<|end|>`` that closes it, 0 elsewhere (system
and user turns, role markers, the ``\\n`` separators, ``<bos>``/``<eos>``). A generation prompt
(``format_chat(messages)`` for inference) ends with ``<|assistant|>\\n``; generation stops at
``<|end|>``. ``tokenizer.encode(format_chat(m, add_generation_prompt=False), allow_special=True)``
equals ``encode_chat(tokenizer, m)[0]`` minus the final ``<eos>``, and
``encode_chat(tokenizer, m, add_generation_prompt=True)[0]`` is the same prompt as ids (message
contents that spell a marker stay plain text there).

Data: ``data.sft`` is a chat JSONL path (one ``{"messages": [{"role", "content"}, ...]}`` per
line; roles system/user/assistant; at least one assistant message) or ``"builtin"``: an
instruction set made from the stdlib itself with ``ast`` — for each public top-level function
with a docstring in a non-test module, "What does `mod.func` do?" -> the docstring's first
paragraph, and "Write a Python function `func(sig)` ..." -> its source (if under 1,500 chars);
for each public class "What is the class `mod.Cls` for?" -> its first paragraph. The held-out
split is ``in_validation("sft:" + example key, data.val_fraction)``.

Batches (same format as pre-training): whole conversations packed greedily in a per-epoch
shuffled order (``data.seed``) into rows of ``seq_len + 1`` tokens, never split; a row is closed
and padded when the next conversation does not fit. Conversations longer than ``seq_len + 1``
are truncated; those whose first assistant token falls beyond the cut are dropped (counted).
Each conversation is one segment. ``loss_mask[t]`` = target weight of ``targets[t]``, and 0 on
padding and across segments. Iterator state ``{"step", "next"}`` is exact.
"""
from __future__ import annotations

import ast
import io
import json
import math
import os
import sys
import textwrap
from typing import Sequence

import grain
import numpy as np

from trinity_jax.data.corpus import in_validation, is_test_path, module_name, resolve_source
from trinity_jax.data.errors import DataError
from trinity_jax.data.packing import layouts_to_batch
from trinity_jax.data.tokenizer import END_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS, Tokenizer

__all__ = ["format_chat", "encode_chat", "builtin_conversations", "read_chat_jsonl",
           "build_sft", "SFTData"]

SYSTEM_PROMPT = "You are a concise assistant that knows the Python standard library."
MAX_SOURCE_CHARS = 1500


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_chat(messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """Messages -> prompt text with the special-token markers (encode with ``tokenizer.encode``)."""
    parts = ["<bos>"]
    for m in messages:
        parts.append(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END_TOKEN}\n")
    if add_generation_prompt:
        parts.append(f"{ROLE_TOKENS['assistant']}\n")
    return "".join(parts)


def _special_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise DataError(f"the tokenizer ({tok.path or 'in memory'}) has no special token {token!r}; "
                        f"the chat template needs {list(SPECIAL_TOKENS[3:])}")
    return i


def encode_chat(tok: Tokenizer, messages: Sequence[dict], *,
                add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Messages -> (int32 ids, float32 target weights: 1 on assistant content and its <|end|>)."""
    end, nl = _special_id(tok, END_TOKEN), tok.encode("\n")
    ids, w = [tok.bos_id], [0.0]
    for m in messages:
        body = tok.encode("\n" + m["content"])
        on = 1.0 if m["role"] == "assistant" else 0.0
        ids += [_special_id(tok, ROLE_TOKENS[m["role"]])] + body + [end] + nl
        w += [0.0] + [on] * (len(body) + 1) + [0.0] * len(nl)
    if add_generation_prompt:
        ids += [_special_id(tok, ROLE_TOKENS["assistant"])] + nl
        w += [0.0] * (1 + len(nl))
    else:
        ids.append(tok.eos_id)
        w.append(0.0)
    return np.asarray(ids, np.int32), np.asarray(w, np.float32)


# ----------------------------------------------------------------------------- sources

def _first_paragraph(doc: str) -> str:
    return doc.strip().split("\n\n")[0].strip()


def builtin_conversations(spec: str = "stdlib:lib", *, files: dict | None = None) -> list[tuple[str, list]]:
    """``[(key, messages), ...]`` from the non-test modules of a stdlib spec (deterministic).

    ``files``, when a dict is given, receives each key's module file (its path inside the
    stdlib): the pre-training corpus splits the stdlib by that path, and the SFT set must
    split the same way (SFTData's ``split_keys``), or a held-out module's docstrings are
    trained on."""
    src = resolve_source("sft", spec)
    out = []
    for rel, _, _ in src.files:
        if is_test_path(rel) or rel.split("/")[0] in ("idlelib", "lib2to3", "turtledemo"):
            continue
        try:
            with open(os.path.join(src.root, rel), encoding="utf-8") as f:
                text = f.read()
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        mod = module_name(rel)
        lines = io.StringIO(text, newline="").readlines()
        if any(p.startswith("_") for p in mod.split(".")):
            continue
        first_of_file = len(out)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(_first_paragraph(doc)) < 20:
                continue
            para = _first_paragraph(doc)
            key = f"{mod}.{node.name}"
            if isinstance(node, ast.ClassDef):
                out.append((f"{key}:class", [
                    {"role": "user", "content": f"What is the class `{key}` for?"},
                    {"role": "assistant", "content": para}]))
                continue
            sig = f"{node.name}({ast.unparse(node.args)})"
            out.append((f"{key}:what", [
                {"role": "user", "content": f"What does `{key}` do?"},
                {"role": "assistant", "content": para}]))
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            code = "".join(lines[first - 1:node.end_lineno])
            if code and len(code) <= MAX_SOURCE_CHARS:
                out.append((f"{key}:write", [
                    {"role": "user", "content": f"Write a Python function `{sig}` (as in the "
                                                f"`{mod}` module): {para}"},
                    {"role": "assistant", "content": textwrap.dedent(code)}]))
        if files is not None:
            files.update({key: rel for key, _ in out[first_of_file:]})
    for i, (key, msgs) in enumerate(out):      # a system prompt on about a quarter of them
        if in_validation("system:" + key, 0.25):
            out[i] = (key, [{"role": "system", "content": SYSTEM_PROMPT}] + msgs)
    return out


def read_chat_jsonl(path: str) -> list[tuple[str, list]]:
    """A chat JSONL file -> ``[(key, messages)]``; DataError naming the file, line and field."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"data.sft={path!r}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.sft={path!r}: not UTF-8 (byte {e.start})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: expected an object with a non-empty list field 'messages'")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] must be {{'role': one of "
                                f"{list(ROLE_TOKENS)}, 'content': str}}, got {str(m)[:80]}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no 'assistant' message (nothing to train on)")
        out.append((f"{os.path.basename(path)}:{lineno}", [dict(role=m["role"], content=m["content"])
                                                           for m in msgs]))
    if not out:
        raise DataError(f"data.sft={path!r}: no conversations (empty file)")
    return out


# ----------------------------------------------------------------------------- batches

class _SFTIterator(grain.DatasetIterator):
    def __init__(self, data: "SFTData"):
        super().__init__()
        self._d = data
        self.step, self.next, self.tokens_seen = 0, 0, 0
        self.phase_name = "sft"      # (a Preview's metadata names its stage and tokens by these)
        self._stream = data.stream("train", repeat=True)

    def _layout(self) -> np.ndarray:
        d, room, pieces = self._d, self._d.seq_len + 1, []
        while True:
            ex = self._stream[self.next]
            n = len(d.ids["train"][ex])
            if n > room:
                break
            pieces.append((0, ex, 0, n))
            room -= n
            self.next += 1
        return np.asarray(pieces, np.int64).reshape(-1, 4)

    def next_batch(self, batch_size: int) -> dict:
        pc, pi = self._d.process_count, self._d.process_index
        if batch_size < 1 or batch_size % pc:
            raise ValueError(f"global batch size {batch_size} must be a positive multiple of "
                             f"process_count={pc}")
        layouts = [self._layout() for _ in range(batch_size)]
        self.step += 1
        self.tokens_seen += batch_size * self._d.seq_len
        return self._d.materialize(layouts[pi * batch_size // pc:(pi + 1) * batch_size // pc], "train")

    def __next__(self) -> dict:
        return self.next_batch(self._d.batch_size)

    def get_state(self) -> dict:
        return {"step": self.step, "next": self.next, "tokens_seen": self.tokens_seen}

    def set_state(self, state: dict) -> None:
        self.step, self.next = int(state["step"]), int(state["next"])
        self.tokens_seen = int(state.get("tokens_seen", self.step * self._d.batch_size * self._d.seq_len))


class SFTData:
    """Tokenised conversations per split and the batch iterators (built by ``build_sft``)."""

    def __init__(self, cfg, tok: Tokenizer, conversations, process_index: int, process_count: int,
                 log=_log, split_keys: dict | None = None):
        """``split_keys``: conversation key -> the key its held-out split is drawn by (the
        built-in set: the module file, as the pre-training corpus splits); others split by
        their own key."""
        split_keys = split_keys or {}
        self.cfg, self.tokenizer = cfg, tok
        self.seq_len, self.batch_size = cfg.train.seq_len, cfg.train.batch_size
        self.process_index, self.process_count = process_index, process_count
        self.ids = {"train": [], "validation": []}
        self.weights = {"train": [], "validation": []}
        self.messages = {"train": [], "validation": []}
        dropped = 0
        for key, msgs in conversations:
            ids, w = encode_chat(tok, msgs)
            if len(ids) > self.seq_len + 1:
                ids, w = ids[:self.seq_len + 1], w[:self.seq_len + 1]
                if not w.any():
                    dropped += 1
                    continue
            by = split_keys.get(key, "sft:" + key)
            split = "validation" if in_validation(by, cfg.data.val_fraction) else "train"
            self.ids[split].append(ids)
            self.weights[split].append(w)
            self.messages[split].append(msgs)
        if not self.ids["train"]:
            raise DataError(f"data.sft={cfg.data.sft!r}: no training conversation fits "
                            f"train.seq_len={self.seq_len} ({dropped} dropped as too long)")
        log(f"[data] SFT: {len(self.ids['train'])} train / {len(self.ids['validation'])} held-out "
            f"conversations" + (f" ({dropped} too long, dropped)" if dropped else ""))
        self.train = _SFTIterator(self)
        self._val_cache: dict = {}

    def stream(self, split: str, *, repeat: bool) -> grain.MapDataset:
        ds = grain.MapDataset.range(len(self.ids[split]))
        if repeat:
            ds = ds.shuffle(seed=self.cfg.data.seed).repeat(None)
        return ds

    def materialize(self, layouts, split: str) -> dict:
        ids, ws = self.ids[split], self.weights[split]
        return layouts_to_batch(layouts, lambda s, d, a, z: ids[d][a:z], self.seq_len,
                                intra_doc_mask=self.cfg.data.intra_doc_mask,
                                pad_id=self.cfg.model.pad_token_id,
                                fetch_mask=lambda s, d, a, z: ws[d][a:z])

    def validation_batches(self, n: int, batch_size: int) -> list[dict]:
        """The held-out conversations, packed in order: at most n batches, always the same."""
        pc, pi = self.process_count, self.process_index
        key = (n, batch_size)
        if key not in self._val_cache:
            rows, cur, room = [], [], self.seq_len + 1
            for ex, a in enumerate(self.ids["validation"]):
                if len(a) > room:
                    rows.append(cur)
                    cur, room = [], self.seq_len + 1
                cur.append((0, ex, 0, len(a)))
                room -= len(a)
            if cur:
                rows.append(cur)
            rows = [np.asarray(r, np.int64).reshape(-1, 4) for r in rows[:n * batch_size]]
            out = []
            for b in range(math.ceil(len(rows) / batch_size)):
                chunk = rows[b * batch_size:(b + 1) * batch_size]
                chunk += [np.zeros((0, 4), np.int64)] * (batch_size - len(chunk))
                out.append(self.materialize(chunk[pi * batch_size // pc:(pi + 1) * batch_size // pc],
                                            "validation"))
            self._val_cache[key] = out
        return self._val_cache[key]


def build_sft(cfg, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
              log=_log) -> SFTData:
    """``data.sft`` ('builtin' or a chat JSONL path) -> SFTData; DataError on bad input."""
    for t in SPECIAL_TOKENS[3:]:
        _special_id(tokenizer, t)
    files: dict = {}
    if cfg.data.sft == "builtin":
        conversations = builtin_conversations(files=files)
    else:
        conversations = read_chat_jsonl(cfg.data.sft)
    return SFTData(cfg, tokenizer, conversations, process_index, process_count, log=log,
                   split_keys=files)
