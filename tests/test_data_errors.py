"""Bad data input -> one clear error before training, naming the file, line or field."""
import dataclasses
import json
import os

import numpy as np
import pytest

from trinity_jax.config import ConfigError, PhaseConfig, from_config_dict
from trinity_jax.data import DataError, build_data, build_sft
from trinity_jax.data.synthetic import synthetic_document, write_text_corpus
from trinity_jax.data.tokenizer import train_bpe


def cfg_for(sources, tmp_path, vocab=320, **data):
    d = {"sources": sources, "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0}
    d.update(data)
    return from_config_dict({"model": {"vocab_size": vocab}, "data": d,
                             "train": {"steps": 2, "batch_size": 2, "seq_len": 16}})


def build(cfg):
    return build_data(cfg, "/unused", log=lambda m: None)


def test_error_is_a_config_error():
    assert issubclass(DataError, ConfigError) and issubclass(DataError, ValueError)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt or \.jsonl file \(empty corpus\)"):
        build(cfg_for({"e": str(tmp_path / "empty")}, tmp_path))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"e\.txt.*the file is empty"):
        build(cfg_for({"e": str(tmp_path / "e.txt")}, tmp_path))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    with pytest.raises(DataError, match=r"source 'b' .*no training documents.*1 empty"):
        build(cfg_for({"b": str(tmp_path / "blank")}, tmp_path))
    with pytest.raises(DataError, match=r"data.sources\['m'\].*no such file or folder"):
        build(cfg_for({"m": str(tmp_path / "missing")}, tmp_path))


def test_non_utf8_files_are_skipped_and_counted(tmp_path):
    write_text_corpus(str(tmp_path / "c"), 6)
    (tmp_path / "c" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    logs = []
    dm = build_data(cfg_for({"c": str(tmp_path / "c")}, tmp_path), "/unused", log=logs.append)
    assert dm.shards["c"].manifest["skipped"]["non_utf8"] == 1
    assert any("1 not UTF-8" in m for m in logs)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(DataError, match=r"source 'bad' .*no training documents.*skipped 1 not UTF-8"):
        build(cfg_for({"bad": str(tmp_path / "bad")}, tmp_path))


def test_tokenizer_larger_than_vocab(tmp_path):
    write_text_corpus(str(tmp_path / "c"), 4)
    rng = np.random.default_rng(0)
    tok = train_bpe([synthetic_document(rng) for _ in range(300)], 400)
    assert tok.vocab_size > 300
    path = str(tmp_path / "big.json")
    tok.save(path)
    with pytest.raises(DataError, match=rf"data.tokenizer=.*big\.json.*{tok.vocab_size} ids.*"
                                        r"model.vocab_size=300"):
        build(cfg_for({"c": str(tmp_path / "c")}, tmp_path, vocab=300, tokenizer=path))
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(DataError, match=r"junk\.json.*cannot load"):
        build(cfg_for({"c": str(tmp_path / "c")}, tmp_path, tokenizer=str(tmp_path / "junk.json")))


def test_bad_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "fine line one"}) + "\n" + json.dumps({"text": "two"})
                 + "\n{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        build(cfg_for({"d": str(p)}, tmp_path))
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected an object with a string field 'text'"):
        build(cfg_for({"d": str(p)}, tmp_path))


def test_unknown_source_in_phase_mixture(tmp_path):
    write_text_corpus(str(tmp_path / "c"), 4)
    raw = {"data": {"sources": {"c": str(tmp_path / "c")},
                    "phases": [{"name": "p", "tokens": 10, "mixture": {"c": 1, "web": 1}}]}}
    with pytest.raises(ConfigError, match=r"data.phases\[0\].mixture names unknown source 'web'"):
        from_config_dict(raw)
    cfg = cfg_for({"c": str(tmp_path / "c")}, tmp_path)     # bypass validation: build_data checks too
    phase = PhaseConfig("p", 10, (("web", 1.0),))
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, phases=(phase,)))
    with pytest.raises(DataError, match="unknown source 'web'"):
        build(bad)


def test_bad_chat_jsonl(tmp_path):
    write_text_corpus(str(tmp_path / "c"), 6)
    dm = build(cfg_for({"c": str(tmp_path / "c")}, tmp_path))
    p = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    cases = [
        ("{nope", r"chat\.jsonl:2: not valid JSON"),
        (json.dumps({"msgs": []}), r"chat\.jsonl:2: expected an object with a non-empty list field 'messages'"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"chat\.jsonl:2: messages\[0\] must be"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), r"chat\.jsonl:2: no 'assistant' message"),
    ]
    for line, pattern in cases:
        p.write_text(json.dumps(good) + "\n" + line + "\n")
        cfg = cfg_for({"c": str(tmp_path / "c")}, tmp_path, sft=str(p))
        with pytest.raises(DataError, match=pattern):
            build_sft(cfg, dm.tokenizer)
    cfg = cfg_for({"c": str(tmp_path / "c")}, tmp_path, sft=str(tmp_path / "none.jsonl"))
    with pytest.raises(DataError, match=r"data.sft=.*none\.jsonl.*cannot read"):
        build_sft(cfg, dm.tokenizer)


def test_tokenizer_without_chat_markers(tmp_path):
    import tokenizers
    from trinity_jax.data.tokenizer import Tokenizer
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    write_text_corpus(str(tmp_path / "c"), 2)
    cfg = cfg_for({"c": str(tmp_path / "c")}, tmp_path, sft=os.devnull)
    with pytest.raises(DataError, match=r"no special token '<\|system\|>'"):
        build_sft(cfg, Tokenizer(raw))


def test_tokenizer_without_bos_eos_is_refused_for_data(tmp_path):
    """A tokenizer.json with no <pad>/<bos>/<eos>: the model's ids 0-2 are ordinary tokens of it,
    so wrapping documents as <bos> … <eos> would put text tokens there (and the same ids occur
    inside documents). The data pipeline refuses it, naming the file, token and field."""
    import tokenizers
    write_text_corpus(str(tmp_path / "c"), 4)
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator([synthetic_document(np.random.default_rng(0)) for _ in range(50)],
                            tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=[],
                                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    assert raw.token_to_id("<bos>") is None and raw.get_vocab_size() <= 320
    path = str(tmp_path / "plain.json")
    raw.save(path)
    with pytest.raises(DataError, match=r"data.tokenizer=.*plain\.json.*no <pad> token, so "
                                        r"model.pad_token_id=0 is its ordinary token"):
        build(cfg_for({"c": str(tmp_path / "c")}, tmp_path, tokenizer=path))
