"""Tokenizer and token shards: fixed special ids, reuse on re-run, damaged shards rebuilt."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from trinity_jax.config import from_config_dict
from trinity_jax.data import build_data
from trinity_jax.data.synthetic import write_jsonl_corpus, write_text_corpus
from trinity_jax.data.tokenizer import SPECIAL_TOKENS, train_bpe


def cfg_for(root, **data):
    d = {"sources": {"t": str(root / "t"), "j": str(root / "j.jsonl")},
         "cache_dir": str(root / "cache"), "val_fraction": 0.1}
    d.update(data)
    return from_config_dict({"model": {"vocab_size": 320}, "data": d,
                             "train": {"steps": 4, "batch_size": 2, "seq_len": 16}})


@pytest.fixture()
def root(tmp_path):
    write_text_corpus(str(tmp_path / "t"), 12, seed=0)
    write_jsonl_corpus(str(tmp_path / "j.jsonl"), 20, seed=1)
    return tmp_path


def build(cfg):
    logs = []
    return build_data(cfg, "/unused", log=logs.append), logs


def test_bpe_special_ids_digits_and_round_trip():
    text = ["def add(x, y):\n    return x + y  # 12345 é ü\n"] * 20 + ["value = 3.14159\n"] * 20
    tok = train_bpe(text, 300)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("x = 12345")
    digits = [tok.id_to_token(i) for i in ids][-5:]
    assert digits == list("12345")                            # one token per digit
    s = "  def f(x):\n\treturn 'é' + \"<bos>\"  # 0042"
    assert tok.decode(tok.encode(s)) == s
    assert 1 not in tok.encode("<bos>")                       # corpus text never becomes a special
    assert tok.encode("<bos>", allow_special=True) == [1]
    assert train_bpe(text, 300).hash == tok.hash              # deterministic training


def test_rerun_does_no_work(root):
    cfg = cfg_for(root)
    dm, logs = build(cfg)
    assert any("trained" in m for m in logs) and sum("tokenised" in m for m in logs) == 2
    manifests = sorted(glob.glob(str(root / "cache/shards/*/manifest.json")))
    mtimes = [os.stat(m).st_mtime_ns for m in manifests]
    first = dm.train.next_batch(2)
    dm2, logs2 = build(cfg)
    assert logs2 == []                                        # no training, no tokenising
    assert [os.stat(m).st_mtime_ns for m in manifests] == mtimes
    assert dm2.tokenizer.hash == dm.tokenizer.hash
    np.testing.assert_array_equal(dm2.train.next_batch(2)["inputs"], first["inputs"])
    m = json.load(open(manifests[0]))
    assert m["complete"] is True and m["tokenizer"]["hash"] == dm.tokenizer.hash
    assert m["splits"]["train"]["n_tokens"] > 0 and m["source"]["files"]


@pytest.mark.parametrize("damage", ["no_manifest", "incomplete", "wrong_counts", "truncated"])
def test_half_written_or_mismatched_shard_is_rebuilt(root, damage):
    cfg = cfg_for(root)
    dm, _ = build(cfg)
    want = dm.train.next_batch(2)
    shard = glob.glob(str(root / "cache/shards/t-*"))[0]
    mpath = os.path.join(shard, "manifest.json")
    m = json.load(open(mpath))
    if damage == "no_manifest":
        os.remove(mpath)
    elif damage == "incomplete":
        m["complete"] = False
        json.dump(m, open(mpath, "w"))
    elif damage == "wrong_counts":
        m["splits"]["train"]["n_tokens"] += 5
        json.dump(m, open(mpath, "w"))
    else:
        shutil.rmtree(os.path.join(shard, "train", "tokens"))
    # a leftover temporary folder of a crashed build is ignored too
    os.makedirs(shard + ".tmp-host-123/train")
    dm2, logs = build(cfg)
    assert any("rebuilding" in x for x in logs) and sum("tokenised" in x for x in logs) == 1
    np.testing.assert_array_equal(dm2.train.next_batch(2)["inputs"], want["inputs"])
    assert json.load(open(mpath))["complete"] is True


def test_changed_source_file_rebuilds_its_shard_only(root):
    cfg = cfg_for(root)
    build(cfg)
    with open(root / "t" / "doc_0000.txt", "a") as f:
        f.write("one more line with 7 words in it\n")
    _, logs = build(cfg)
    tokenised = [x for x in logs if "tokenised" in x]
    # the tokenizer fingerprint covers the sources, so the BPE is retrained and both re-tokenised
    assert any("trained" in x for x in logs) and len(tokenised) == 2
    _, logs = build(cfg)
    assert logs == []


def test_loaded_tokenizer_json(root):
    tok = train_bpe(["hello world 123\n"] * 50, 300)
    path = str(root / "tok.json")
    tok.save(path)
    dm, logs = build(cfg_for(root, tokenizer=path))
    assert dm.tokenizer.hash == tok.hash and not any("trained" in x for x in logs)
    assert dm.train.next_batch(2)["inputs"].max() < 320
