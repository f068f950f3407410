"""Data pipeline: determinism, exact resume, packing, RSDB, process shards, phases, batch format."""
import json

import numpy as np
import pytest

from trinity_jax.config import from_config_dict
from trinity_jax.data import build_data, plan_phases
from trinity_jax.data.packing import PackedIterDataset, document_stream
from trinity_jax.data.synthetic import write_jsonl_corpus, write_text_corpus

S, V = 32, 384


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_text_corpus(str(root / "a"), 40, seed=0)
    write_jsonl_corpus(str(root / "b.jsonl"), 60, seed=1)
    write_text_corpus(str(root / "c"), 10, seed=2, docs_per_file=3, min_words=40, max_words=300)
    return root


def make_cfg(corpus, *, steps=12, batch_size=4, phases=True, ramp=(), **data):
    d = {"sources": {"a": str(corpus / "a"), "b": str(corpus / "b.jsonl"), "c": str(corpus / "c")},
         "cache_dir": str(corpus / "cache"), "val_fraction": 0.1}
    if phases:
        d["phases"] = [{"name": "p1", "tokens": 2, "mixture": {"a": 1, "b": 1}},
                       {"name": "p2", "tokens": 1, "mixture": {"b": 1, "c": 3}}]
    d.update(data)
    return from_config_dict({"model": {"vocab_size": V}, "data": d,
                             "train": {"steps": steps, "batch_size": batch_size, "seq_len": S,
                                       "batch_ramp": list(ramp)}})


def build(cfg, **kw):
    logs = []
    return build_data(cfg, "/nonexistent-workdir", log=logs.append, **kw), logs


def batches(dm, sizes):
    return [dm.train.next_batch(b) for b in sizes]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format_and_masks(corpus):
    dm, _ = build(make_cfg(corpus))
    b = dm.train.next_batch(4)
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((4, S), "int32"), "targets": ((4, S), "int32"), "positions": ((4, S), "int32"),
        "segment_ids": ((4, S), "int32"), "loss_mask": ((4, S), "float32")}
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    seg = b["segment_ids"]
    assert (seg >= 1).all()                                  # training never pads
    # positions restart at 0 on every new segment and count up inside it
    new = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert (b["positions"][new] == 0).all()
    assert (b["positions"][:, 1:][~new[:, 1:]] == b["positions"][:, :-1][~new[:, 1:]] + 1).all()
    # loss is off exactly on targets that start another document: the <eos> -> <bos> step
    off = b["loss_mask"] == 0
    assert ((b["targets"] == 1) == off).all()                # <bos> = 1 is only ever a first token
    assert ((b["inputs"][off]) == 2).all()                   # ... preceded by <eos> = 2
    assert dm.tokenizer.vocab_size <= V and b["inputs"].max() < V

    dm2, _ = build(make_cfg(corpus, intra_doc_mask=False))
    b2 = dm2.train.next_batch(4)
    np.testing.assert_array_equal(b2["inputs"], b["inputs"])
    assert (b2["segment_ids"] == 1).all() and (b2["loss_mask"] == 1).all()
    np.testing.assert_array_equal(b2["positions"], np.broadcast_to(np.arange(S), (4, S)))


def test_deterministic_for_a_seed(corpus):
    sizes = [4, 4, 8, 4]
    x = batches(build(make_cfg(corpus))[0], sizes)
    y = batches(build(make_cfg(corpus))[0], sizes)
    z = batches(build(make_cfg(corpus, seed=1))[0], sizes)
    assert_batches_equal(x, y)
    assert not np.array_equal(x[0]["inputs"], z[0]["inputs"])


@pytest.mark.parametrize("loading", ["packed", "rsdb"])
def test_exact_resume_across_phase_boundary(corpus, loading):
    cfg = make_cfg(corpus, loading=loading, rsdb_buffer=4)
    assert [p[1:] for p in build(cfg)[0].phase_plan] == [(0, 8), (8, 12)]
    sizes = [4, 8, 4, 4, 8, 4, 4, 4, 8, 4, 4, 4, 4]        # batch size changes on the way
    ref = build(cfg)[0]
    want = batches(ref, sizes)
    for cut in (3, 7, 8):                                     # mid-phase, just before, at boundary
        dm = build(cfg)[0]
        batches(dm, sizes[:cut])
        state = json.loads(json.dumps(dm.train.get_state()))   # through JSON, like a checkpoint
        fresh = build(cfg)[0]
        fresh.train.set_state(state)
        assert fresh.train.step == cut
        assert_batches_equal(batches(fresh, sizes[cut:]), want[cut:])
        assert fresh.train.phase_name == "p2" and fresh.train.step == len(sizes)


def test_phase_mixture_is_followed(corpus):
    dm, _ = build(make_cfg(corpus, steps=40))
    a, b, c = (dm.source_names.index(n) for n in "abc")
    frac = []
    for phase in range(2):
        it, counts = iter(dm.phase_dataset(phase)), np.zeros(3)
        for _ in range(300):
            for s, _, lo, hi in next(it).tolist():
                counts[s] += hi - lo
        frac.append(counts / counts.sum())
    assert frac[0][c] == 0 and frac[1][a] == 0               # only the phase's sources
    assert abs(frac[0][a] - 0.5) < 0.1                        # token fractions follow the weights
    assert abs(frac[1][c] - 0.75) < 0.1


def test_packing_keeps_every_token_once_per_epoch(corpus):
    dm, _ = build(make_cfg(corpus, phases=False))
    shard = dm.shards["a"].train
    lengths = [shard.lengths]
    stream = document_stream(lengths, [1.0], seed=3)
    it = iter(PackedIterDataset(stream, lengths, S + 1))
    n_epoch_tokens = int(shard.lengths.sum())
    layouts, got = [], 0
    while got < n_epoch_tokens + S + 1:
        layouts.append(next(it))
        got += S + 1
    pieces = np.concatenate(layouts)
    assert all(int((lay[:, 3] - lay[:, 2]).sum()) == S + 1 for lay in layouts)   # full rows
    # every document of epoch 1 exactly once, in stream order, each piece continuing the last
    order = [stream[k][1] for k in range(shard.n_docs)]
    assert sorted(order) == list(range(shard.n_docs))
    heads = {}
    seen = []
    for _, d, a, z in pieces.tolist():
        assert a == heads.get(d, 0) and z > a
        heads[d] = z if z < shard.lengths[d] else 0        # a finished doc may come back next epoch
        if a == 0:
            seen.append(d)
    assert seen[:shard.n_docs] == order
    # token level: the rows, concatenated, are the documents concatenated in stream order
    batch = dm.materialize([np.concatenate([lay[:, :1] * 0 + dm.source_names.index("a"),
                                            lay[:, 1:]], axis=1) for lay in layouts])
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1).reshape(-1)
    docs = np.concatenate([shard.doc(d) for d in order])
    np.testing.assert_array_equal(rows[:len(docs)], docs)
    # no segment mixes two documents: <bos> only first, <eos> only last in a segment
    seg = batch["segment_ids"]
    for r in range(len(seg)):
        for sid in np.unique(seg[r]):
            toks = batch["inputs"][r][seg[r] == sid]
            assert (toks[1:] != 1).all() and (toks[:-1] != 2).all()


def test_rsdb_buffer_invariants():
    import grain
    from trinity_jax.data.packing import RSDBIterDataset
    # a stream of 3000 distinct documents (stream index == doc id) with lengths 2..150
    lengths = np.random.default_rng(0).integers(2, 150, size=3000)
    stream = grain.MapDataset.range(3000).map(lambda i: (0, int(i)))
    it = iter(RSDBIterDataset(stream, [lengths], S + 1, buffer_size=3, seed=0))
    refills = []
    it.on_refill = lambda i: refills.append((len(i.buffer), len(i._live())))
    head = {}
    for _ in range(400):
        lay = next(it)
        assert int((lay[:, 3] - lay[:, 2]).sum()) == S + 1                 # rows always full
        live = it._live()
        assert 3 < len(live) <= 6 and len(it.buffer) <= 6                 # user size 3, internal 6
        for _, d, a, z in lay.tolist():
            assert a == head.get(d, 0) and z > a                            # in order, from 0
            head[d] = z
        assert len({int(d) for d in lay[:, 1]}) == len(lay)                 # a doc once per row
    assert len(refills) > 20 and all(r == (6, 6) for r in refills)        # bulk refill to 2x
    in_buffer = {e[0] for e in it.buffer}
    done = [d for d in head if d not in in_buffer]
    assert len(done) > 100 and all(head[d] == lengths[d] for d in done)  # copied exactly once
    assert set(head) <= set(range(it.doc))                                # whole docs, stream order
    # random picks interleave documents (packing would finish them in stream order)
    first = [d for d in head]
    assert first != sorted(first)


@pytest.mark.parametrize("loading", ["packed", "rsdb"])
def test_process_shards_equal_the_global_batch(corpus, loading):
    cfg = make_cfg(corpus, loading=loading, rsdb_buffer=4)
    sizes = [4, 8, 4, 4, 4, 4, 4, 4, 8, 4]
    whole = batches(build(cfg)[0], sizes)
    for pc in (2, 4):
        parts = [batches(build(cfg, process_index=p, process_count=pc)[0], sizes) for p in range(pc)]
        for i in range(len(sizes)):
            for k in whole[i]:
                np.testing.assert_array_equal(
                    np.concatenate([parts[p][i][k] for p in range(pc)]), whole[i][k])
    with pytest.raises(ValueError, match="multiple of process_count"):
        build(cfg, process_index=0, process_count=4)[0].train.next_batch(6)
    v1 = build(cfg)[0].validation_batches(2, 4)
    v2 = [build(cfg, process_index=p, process_count=2)[0].validation_batches(2, 4) for p in (0, 1)]
    for i in range(len(v1)):
        np.testing.assert_array_equal(np.concatenate([v2[0][i]["inputs"], v2[1][i]["inputs"]]),
                                      v1[i]["inputs"])


def test_validation_is_fixed_and_held_out(corpus):
    dm, _ = build(make_cfg(corpus))
    v = dm.validation_batches(3, 4)
    assert 1 <= len(v) <= 3
    other, _ = build(make_cfg(corpus, seed=7))
    for x, y in zip(v, other.validation_batches(3, 4)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])         # independent of data.seed
    many = dm.validation_batches(1000, 4)                                # read once, padded at the end
    n_val = sum(sh.validation.n_tokens for sh in dm.shards.values())
    real = sum(int((b["segment_ids"] > 0).sum()) + int((b["segment_ids"][:, -1] > 0).sum())
               for b in many)
    assert n_val <= real <= n_val + len(many) * 4
    assert many[-1]["loss_mask"][-1].sum() == 0 or len(many) * 4 * (S + 1) == n_val
    train_docs = {tuple(dm.shards["b"].train.doc(i)) for i in range(dm.shards["b"].train.n_docs)}
    val_docs = {tuple(dm.shards["b"].validation.doc(i)) for i in range(dm.shards["b"].validation.n_docs)}
    assert val_docs and not (train_docs & val_docs)
    h = dm.unigram_entropy
    assert 0 < h < np.log(V) and abs(dm.unigram_entropy_bits - h / np.log(2)) < 1e-9


def test_phase_plan():
    def cfg(steps, phases=((6, "a"), (3, "b"), (1, "c")), ramp=(), b=8, s=256):
        return from_config_dict({
            "data": {"sources": {"a": "stdlib", "b": "stdlib:lib", "c": "stdlib:docs"},
                     "phases": [{"name": f"p{i}", "tokens": t, "mixture": {m: 1}}
                                for i, (t, m) in enumerate(phases)]},
            "train": {"steps": steps, "batch_size": b, "seq_len": s, "batch_ramp": list(ramp)}})

    def plan(c, **kw):
        return [(p.start_step, p.end_step) for p in plan_phases(c.data, c.train, **kw)]

    assert plan(cfg(20)) == [(0, 12), (12, 18), (18, 20)]
    assert plan(cfg(1000)) == [(0, 600), (600, 900), (900, 1000)]
    assert plan(cfg(2)) == [(0, 1), (1, 2), (2, 2)]                    # fewer steps than phases
    assert plan(cfg(3, phases=((1000, "a"), (1, "b"), (1, "c")))) == [(0, 1), (1, 2), (2, 3)]
    # a batch ramp doubles the batch after 8*256*10 tokens: boundaries follow tokens, not steps
    r = cfg(20, phases=((1, "a"), (1, "b")), ramp=((8 * 256 * 10, 16),))
    assert plan(r) == [(0, 13), (13, 20)]
    # unscaled: the budgets as written
    u = cfg(5, phases=((8 * 256 * 3, "a"), (8 * 256 * 2 + 1, "b")))
    assert plan(u, rescale=False) == [(0, 3), (3, 6)]
    single = from_config_dict({"data": {"sources": {"x": "stdlib", "y": "stdlib:lib"}},
                               "train": {"steps": 7}})
    (p,) = plan_phases(single.data, single.train)
    assert (p.name, p.start_step, p.end_step, p.mixture) == ("phase1", 0, 7, (("x", 0.5), ("y", 0.5)))


def test_grain_checkpoint_handler_accepts_the_iterator(corpus, tmp_path):
    import grain
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = make_cfg(corpus)
    dm = build(cfg)[0]
    batches(dm, [4, 4, 4])
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(dm.train)))
    mgr.wait_until_finished()
    want = batches(dm, [4, 8])
    fresh = build(cfg)[0]
    mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh.train)))
    assert_batches_equal(batches(fresh, [4, 8]), want)
    mgr.close()
