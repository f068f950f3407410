"""SFT: chat template, assistant-only loss mask, batches, resume, builtin stdlib instructions."""
import json

import numpy as np
import pytest

from trinity_jax.config import from_config_dict
from trinity_jax.data import build_sft, encode_chat, format_chat
from trinity_jax.data.sft import SFTData, builtin_conversations
from trinity_jax.data.synthetic import synthetic_document
from trinity_jax.data.tokenizer import train_bpe

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? Say <|end|> if unsure."},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6.\nDone."}]


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    return train_bpe([synthetic_document(rng) for _ in range(200)] + ["What is 2+2? It is 6."] * 20,
                     320)


def cfg(tmp_path=None, seq_len=48, **data):
    return from_config_dict({"model": {"vocab_size": 320}, "data": {"val_fraction": 0.2, **data},
                             "train": {"seq_len": seq_len, "batch_size": 4}})


def test_mask_covers_only_assistant_content_and_end(tok):
    ids, w = encode_chat(tok, CONV)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.dtype == np.int32
    end = tok.token_to_id("<|end|>")
    on = tok.decode(ids[w == 1], skip_special_tokens=False)
    assert on == "\n4<|end|>\nIt is 6.\nDone.<|end|>"
    # every masked-in run ends with <|end|> and starts right after <|assistant|>
    runs = np.flatnonzero(np.diff(np.concatenate([[0], w, [0]])))
    starts, stops = runs[::2], runs[1::2]
    assert len(starts) == 2
    assert all(ids[a - 1] == tok.token_to_id("<|assistant|>") for a in starts)
    assert all(ids[z - 1] == end for z in stops)
    assert (ids == end).sum() == 5                        # user content "<|end|>" stays plain text
    # the text template says the same as the ids
    # the text template says the same as the ids (for contents that do not spell a marker)
    clean = [CONV[0], {"role": "user", "content": "What is 2+2?"}, CONV[2]]
    text_ids = tok.encode(format_chat(clean, add_generation_prompt=False), allow_special=True)
    assert text_ids + [tok.eos_id] == encode_chat(tok, clean)[0].tolist()
    prompt = encode_chat(tok, clean[:2], add_generation_prompt=True)[0].tolist()
    assert prompt == tok.encode(format_chat(clean[:2]), allow_special=True)
    assert format_chat(clean[:2]).endswith("<|assistant|>\n")


def _convs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"k{i}", [{"role": "user", "content": synthetic_document(rng, 2, 8)},
                       {"role": "assistant", "content": synthetic_document(rng, 2, 10)}])
            for i in range(n)]


def test_sft_batches_mask_and_resume(tok):
    data = SFTData(cfg(), tok, _convs(120), 0, 1, log=lambda m: None)
    b = data.train.next_batch(4)
    seg, lm = b["segment_ids"], b["loss_mask"]
    # loss exactly on targets inside an assistant turn: after <|assistant|>, up to its <|end|>
    asst, end = tok.token_to_id("<|assistant|>"), tok.token_to_id("<|end|>")
    for r in range(4):
        row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
        w, inside = np.zeros(len(row)), False
        for i, t in enumerate(row):
            w[i] = float(inside and t != asst)
            inside = (inside or t == asst) and t != end
        np.testing.assert_array_equal(lm[r], w[1:])
    assert lm.sum() > 0 and (lm[seg == 0] == 0).all()
    assert set(np.unique(lm)) <= {0.0, 1.0}
    # every conversation is whole inside a row: starts with <bos>, ends with <eos>
    for r in range(4):
        for sid in np.unique(seg[r][seg[r] > 0]):
            toks = b["inputs"][r][seg[r] == sid]
            assert toks[0] == tok.bos_id
    masked = tok.decode(b["targets"][0][lm[0] == 1], skip_special_tokens=False)
    assert masked.startswith("\n") and masked.endswith("<|end|>")
    # exact resume and process shards
    sizes = [4, 8, 4, 4]
    ref = SFTData(cfg(), tok, _convs(120), 0, 1, log=lambda m: None)
    want = [ref.train.next_batch(s) for s in sizes]
    part = SFTData(cfg(), tok, _convs(120), 0, 1, log=lambda m: None)
    part.train.next_batch(4)
    state = json.loads(json.dumps(part.train.get_state()))
    fresh = SFTData(cfg(), tok, _convs(120), 0, 1, log=lambda m: None)
    fresh.train.set_state(state)
    for s, w in zip(sizes[1:], want[1:]):
        np.testing.assert_array_equal(fresh.train.next_batch(s)["loss_mask"], w["loss_mask"])
    # tokens and stage, as the pre-training iterator reports them (a Preview's metadata)
    assert (fresh.train.tokens_seen, fresh.train.phase_name) == (sum(sizes) * 48, "sft")
    halves = [SFTData(cfg(), tok, _convs(120), p, 2, log=lambda m: None) for p in (0, 1)]
    for s, w in zip(sizes, want):
        got = [h.train.next_batch(s) for h in halves]
        np.testing.assert_array_equal(np.concatenate([g["inputs"] for g in got]), w["inputs"])
    val = data.validation_batches(2, 4)
    assert val and val[0]["inputs"].shape == (4, 48)
    assert data.ids["validation"] and len(data.ids["train"]) + len(data.ids["validation"]) == 120


def test_long_conversations_truncated_or_dropped(tok):
    long_user = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    logs = []
    data = SFTData(cfg(val_fraction=0.0), tok, [("a", long_user), ("b", long_answer)], 0, 1,
                   log=logs.append)
    assert len(data.ids["train"]) == 1 and len(data.ids["train"][0]) == 49
    assert "1 too long, dropped" in logs[0]


def test_builtin_instructions_from_stdlib(tok):
    convs = builtin_conversations("stdlib:json")
    keys = [k for k, _ in convs]
    assert keys == [k for k, _ in builtin_conversations("stdlib:json")]      # deterministic
    assert "json.dumps:what" in keys and "json.load:write" in keys
    assert "json.dumps:write" not in keys                  # its source is over 1,500 chars
    msgs = dict(convs)["json.dumps:what"]
    assert msgs[-2]["content"] == "What does `json.dumps` do?"
    assert msgs[-1]["content"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    code = dict(convs)["json.load:write"][-1]["content"]
    assert code.startswith("def load(") and '"""' in code
    data = SFTData(cfg(seq_len=256, val_fraction=0.3), tok, convs, 0, 1, log=lambda m: None)
    assert data.ids["train"] and data.ids["validation"]
    held = {json.dumps(m) for m in data.messages["validation"]}
    assert not held & {json.dumps(m) for m in data.messages["train"]}


def test_build_sft_from_jsonl(tok, tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps({"messages": m}) for _, m in _convs(30)) + "\n")
    data = build_sft(cfg(sft=str(p)), tok, log=lambda m: None)
    assert len(data.ids["train"]) + len(data.ids["validation"]) == 30
    assert data.train.next_batch(4)["loss_mask"].sum() > 0


def test_builtin_set_splits_by_module_file_like_pretraining(tok):
    """A module held out of pre-training (the stdlib is split by file path) is held out of the
    built-in SFT set too, with all its examples: before, each example was split by its own key,
    so a held-out `:what` answer (a docstring's first paragraph) sat inside the same function's
    training `:write` target, and SFT trained on pre-training's held-out modules."""
    from trinity_jax.data.corpus import in_validation, resolve_source

    files = {}
    convs = builtin_conversations("stdlib:email", files=files)
    assert set(files) == {k for k, _ in convs}
    data = SFTData(cfg(seq_len=1024, val_fraction=0.3), tok, convs, 0, 1, log=lambda m: None,
                   split_keys=files)
    split_of = {json.dumps(m): split for split in ("train", "validation") for m in data.messages[split]}
    by_key = dict(convs)
    want_held = {k for k in by_key if in_validation(files[k], 0.3)}
    assert want_held and len(want_held) < len(by_key)
    kept = [k for k in by_key if json.dumps(by_key[k]) in split_of]     # (none too long here)
    assert len(kept) == len(by_key)
    assert all(split_of[json.dumps(by_key[k])] == ("validation" if k in want_held else "train")
               for k in kept)
    # the pre-training corpus holds the same files out
    src = resolve_source("x", "stdlib:email")
    val_files = {key for key, _ in src.documents("validation", 0.3)}
    assert {files[k] for k in want_held} <= val_files
    train_files = {files[k] for k in by_key if k not in want_held}
    assert not train_files & val_files
