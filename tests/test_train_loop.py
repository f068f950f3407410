"""End to end (train/loop.py): train() on a tiny real model and a learnable synthetic task in a
tmp workdir — metrics.jsonl fields, TensorBoard events, PNGs, falling loss, callbacks, and the
non-finite stop."""
import dataclasses
import glob
import json
import os
import time

import jax
import numpy as np
import pytest

from trinity_jax.config import ConfigError, from_config_dict
from trinity_jax.train import loop
from trinity_jax.train.synthetic import SyntheticData

STEPS = 40
# one scanned MoE stack, all hidden matrices 32×32: few distinct shapes = fast compile on 2 cores
TINY = {
    "model": dict(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=32,
                  num_hidden_layers=2, num_dense_layers=0, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                  global_attn_every_n_layers=2, sliding_window=16, max_position_embeddings=64,
                  moe_impl="dense_reference"),   # cheapest MoE to compile; dispatch: test_moe
    "train": dict(steps=STEPS, batch_size=8, seq_len=32, log_every=10, eval_every=20,
                  eval_batches=2, loss_chunk_size=16, peak_flops=0.0, microbatches=1),
    "optim": dict(warmup_steps=5, muon_lr=0.02, adam_lr=0.01),
}


class Recorder(loop.Callback):
    def __init__(self):
        self.events = []

    def on_start(self, run):
        assert run.state is None          # a checkpoint callback would restore here
        assert run.abstract_state.params["lm_head"]["kernel"].sharding is not None
        self.events.append(("start", 0))

    def on_step_end(self, run, step, metrics):
        assert int(run.state.step) == step and run.data.train.step == step
        self.events.append(("step", step))

    def on_end(self, run):
        self.events.append(("end", int(run.state.step)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = from_config_dict(TINY)
    workdir = str(tmp_path_factory.mktemp("run"))
    rec = Recorder()
    lines = []
    run = loop.train(cfg, workdir, data=SyntheticData(64, 32, steps=STEPS), callbacks=[rec],
                     log=lines.append)
    return run, workdir, rec, lines


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_metrics_jsonl_has_every_field_each_log_step(trained):
    run, workdir, _, _ = trained
    recs = _records(workdir)
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    need = ("step loss ce z_loss balance_loss dropped grad_norm lr lr_muon lr_adam tokens_seen "
            "tokens_per_s mfu logit_max logit_mean max_vio max_vio_layers dead_frac bias_norm batchhet "
            "phase").split()
    for r in recs:
        missing = [k for k in need if k not in r]
        assert not missing, missing
        assert r["dropped"] == 0.0                                      # dropless
        assert len(r["max_vio_layers"]) == 2 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    tps = [r["tokens_per_s"] for r in recs]          # eval steps (20, 40) must not skew tokens/s
    assert max(tps) / min(tps) < 10, tps
    assert recs[-1]["tokens_seen"] == STEPS * 8 * 32
    assert "val_loss" in recs[1] and "val_loss" in recs[3]          # eval_every=20 and at the end
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == STEPS


def test_loss_falls_on_the_learnable_task(trained):
    """Bigram task: from ~ln 64 = 4.16 to below 2.5 in 40 steps (val too)."""
    recs = _records(trained[1])
    assert recs[0]["loss"] < 4.6
    assert recs[-1]["loss"] < 2.5 and recs[-1]["loss"] < recs[0]["loss"] - 1.0
    assert recs[-1]["val_loss"] < 2.5


def test_outputs_plots_tensorboard_and_optimizer_table(trained):
    run, workdir, _, lines = trained
    for name in ("loss.png", "expert_load.png"):
        path = os.path.join(workdir, "plots", name)
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
    assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    table = open(os.path.join(workdir, "optimizer_table.txt")).read()
    assert "moe_layers/mlp/experts/gate_proj" in table and any("optimizer" in l for l in lines)


def test_callbacks_see_every_step_in_order(trained):
    events = trained[2].events
    assert events[0] == ("start", 0) and events[-1] == ("end", STEPS)
    assert [s for e, s in events if e == "step"] == list(range(1, STEPS + 1))


class _NaNData(SyntheticData):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        inner = self.train.next_batch

        def bad(b):
            batch = inner(b)
            batch["loss_mask"] = batch["loss_mask"] * np.nan
            return batch
        self.train.next_batch = bad


def test_stops_after_max_nonfinite_steps_naming_the_step(trained):
    """Continue the trained run (same compiled step) on NaN batches: stops at step 43 with the
    state untouched."""
    run, _, _, _ = trained
    before = jax.tree.map(np.asarray, run.state.params)
    run.cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(
        run.cfg.train, steps=STEPS + 10, max_nonfinite_steps=3))
    run.data = _NaNData(64, 32)
    run.data.train.set_state({"step": STEPS, "tokens_seen": STEPS * 8 * 32})
    run.writer = type(run.writer)(run.workdir, enabled=False)
    with pytest.raises(loop.NonFiniteError, match=r"stopping at step 43: 3 consecutive"):
        loop.run_loop(run)
    for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_metrics_writer_does_not_import_torch(tmp_path):
    """tensorboardX's writer imports torch when installed (seconds of start-up per run); ours
    hides it for that import, still writes an event file, and leaves torch importable."""
    import subprocess
    import sys
    pytest.importorskip("torch")
    code = ("import sys; from trinity_jax.train.metrics import MetricsWriter\n"
            f"w = MetricsWriter({str(tmp_path)!r}); w.write({{'step': 1, 'loss': 2.5}}); w.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import torch; print(torch.zeros(2).sum().item())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0.0"
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


def test_mfu_peak_is_measured_in_the_model_compute_dtype(monkeypatch, tmp_path):
    """MFU's denominator is a matmul in the model's compute dtype: a bf16 model measured
    against the f32 peak would report ~4x its MFU on this CPU (bf16 AMX products)."""
    from trinity_jax.train import metrics
    seen = []
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype: seen.append(dtype) or 1e12)
    cfg = from_config_dict({**TINY, "model": {**TINY["model"], "dtype": "bfloat16"}})
    lines = []
    loop.setup(cfg, str(tmp_path), data=SyntheticData(64, 32, steps=STEPS), log=lines.append).writer.close()
    assert [jax.numpy.dtype(d).name for d in seen] == ["bfloat16"]
    assert any("measured bfloat16 2048³ matmul" in line for line in lines), lines


def test_a_configured_peak_on_cpu_counts_the_host_once_not_each_emulated_device():
    """train.peak_flops on CPU: the 8 emulated devices of this process share its cores, so the
    total is the configured peak (x processes), not x 8 (an 8x low MFU)."""
    from trinity_jax.config import TrainConfig
    from trinity_jax.train.metrics import peak_flops_total
    assert jax.device_count() == 8 and jax.default_backend() == "cpu"
    peak, how = peak_flops_total(TrainConfig(peak_flops=2e11))
    assert peak == 2e11 and "processes" in how


def test_host_cpu_names_the_model_and_the_bf16_matmul_isa(tmp_path):
    """Speed figures are tagged with the host: AMX outranks AVX-512 BF16, which outranks none;
    the first core's fields are read; an unreadable file gives "unknown", not an error."""
    from trinity_jax.train.metrics import host_cpu

    def info(model, flags):
        core = f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
        path = tmp_path / f"cpuinfo{len(list(tmp_path.iterdir()))}"
        path.write_text(core + core.replace("processor\t: 0", "processor\t: 1").replace(model, "other"))
        return host_cpu(str(path))

    intel = info("Intel(R) Xeon(R) Platinum 8488C", "fpu sse avx512f avx512_bf16 amx_bf16 amx_tile")
    amd = info("AMD EPYC 9R14", "fpu sse avx512f avx512_bf16 avx512_vnni")
    old = info("Intel(R) Xeon(R) CPU E5-2686 v4", "fpu sse avx2 fma")
    assert (intel["model"], intel["bf16_matmul"]) == ("Intel(R) Xeon(R) Platinum 8488C", "amx_bf16")
    assert (amd["model"], amd["bf16_matmul"]) == ("AMD EPYC 9R14", "avx512_bf16")
    assert old["bf16_matmul"] == "none"
    assert host_cpu(str(tmp_path / "missing")) == {"model": "unknown", "cores": os.cpu_count(),
                                                   "bf16_matmul": "unknown"}


class _TwoPhaseData(SyntheticData):
    """SyntheticData whose iterator enters phase "p2" while drawing its 4th batch, as the data
    pipeline's TrainIterator switches phase inside next_batch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        draw = self.train.next_batch

        def next_batch(b):
            out = draw(b)
            self.train.phase_name = "p1" if self.train.step <= 3 else "p2"
            return out

        self.train.next_batch = next_batch


def test_records_name_each_steps_batch_size_phase_and_tokens_and_the_ramp_compiles_once_per_size(tmp_path):
    """train.batch_ramp in a real run: 8 sequences of 32 tokens until 3 steps' tokens (768) have
    been seen, then 16; each record names the size, phase and tokens_seen of the batch its step
    trained on (they were read one batch late); the jitted step is compiled exactly once per
    batch size (2). With the hidden matrices on AdamW, "lr" is AdamW's."""
    ramp_at = 3 * 8 * 32
    cfg = from_config_dict({**TINY, "train": {**TINY["train"], "steps": 6, "log_every": 1,
                                              "eval_every": 0, "batch_ramp": [[ramp_at, 16]]},
                            "optim": {**TINY["optim"], "hidden_optimizer": "adamw"}})
    run = loop.setup(cfg, str(tmp_path), data=_TwoPhaseData(64, 32, steps=6), log=lambda *a: None)
    loop.run_loop(run)
    recs = _records(str(tmp_path))
    assert [r["batch_size"] for r in recs] == [8, 8, 8, 16, 16, 16]
    assert [r["tokens_seen"] for r in recs] == [256, 512, 768, 1280, 1792, 2304]
    assert [r["phase"] for r in recs] == ["p1"] * 3 + ["p2"] * 3
    assert all(r["lr"] == r["lr_adam"] != r["lr_muon"] for r in recs)
    assert run.train_step._cache_size() == 2
    # the last step's clock stops when its own metrics arrive: it used to run from the previous
    # step's logging, done after the last step had finished, which gave 38x the tokens/s before
    last, before = recs[-1]["tokens_per_s"], recs[-2]["tokens_per_s"]
    assert last < 10 * before, (before, last)


def _tensorboard_points(logdir, tag):
    """(step, value) of `tag` as TensorBoard shows it: event files in name order, and a session
    START event at step s drops the points at steps >= s read before it (its purge rule)."""
    import struct

    from tensorboardX.proto import event_pb2
    points = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.*"))):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                points = [(s, v) for s, v in points if s < ev.step]
            points += [(ev.step, v.simple_value) for v in ev.summary.value if v.tag == tag]
    return points


def test_resume_hides_the_interrupted_runs_later_tensorboard_points(tmp_path):
    """A run logged steps 1-4 and was resumed from step 2: metrics.jsonl is truncated to 1-2 by
    the checkpoint callback, and TensorBoard must show the re-run steps once (the new values),
    not both runs' points for steps 3 and 4."""
    from trinity_jax.train.metrics import MetricsWriter

    first = MetricsWriter(str(tmp_path))
    for s in (1, 2, 3, 4):
        first.write({"step": s, "loss": 10.0 - s})
    first.close()
    time.sleep(1.1)            # a later process: tensorboardX names event files by the second
    resumed = MetricsWriter(str(tmp_path))
    resumed.resume_at(2)
    assert [r["step"] for r in resumed.records] == [1, 2]
    for s in (3, 4):
        resumed.write({"step": s, "loss": 20.0 - s})
    resumed.close()
    assert _tensorboard_points(str(tmp_path / "tb"), "loss") == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0)]


def test_variant_validation_loss_equals_the_trainers_evaluation_on_packed_rows(trained):
    """recipe.validation_loss (the variants' figure in the quickstart summary) on packed
    validation rows equals the train loop's eval_step CE on the same rows (1e-5 relative: full
    fp32 logits against the chunked loss), because the documents are kept apart by their
    segment ids and positions; without them (one document per row) the figure differs."""
    from trinity_jax import recipe
    from trinity_jax.api import LoadedModel

    run, *_ = trained
    batches = run.data.validation_batches(2, 8)
    assert max(int(np.max(b["segment_ids"])) for b in batches) > 1               # packed rows
    model = LoadedModel(run.cfg.model, {"params": run.state.params, "balance": run.state.balance})
    ours = recipe.validation_loss(model, batches)
    sums = [run.eval_step(run.state.params, run.state.balance, run.to_device(b)) for b in batches]
    want = sum(float(s.ce) for s in sums) / sum(float(s.count) for s in sums)
    np.testing.assert_allclose(ours, want, rtol=1e-5)
    unpacked = recipe.validation_loss(model, [{k: v for k, v in b.items()
                                               if k not in ("positions", "segment_ids")} for b in batches])
    print("packed", ours, "as one document per row", unpacked)
    assert abs(unpacked - ours) > 1e-3 * ours


def test_a_workdir_of_another_config_is_refused_before_anything_is_written(tmp_path):
    """Resuming a workdir with another model or run plan would restore checkpoints of other
    shapes (they used to be quarantined as corrupt, and the run restarted from 0) or replay its
    phases and LR schedule on a new plan; loop.setup refuses it first, naming the field, and
    config.json stays the run's. Logging, mesh and implementation choices may change."""
    workdir = str(tmp_path)
    quiet = dict(data=SyntheticData(64, 32, steps=STEPS), log=lambda *a: None, init=False)
    loop.setup(from_config_dict(TINY), workdir, **quiet).writer.close()
    before = open(os.path.join(workdir, "config.json")).read()
    for group, field, value, shown in (("model", "num_experts", 8, "model.num_experts: 4 in the run, 8"),
                                       ("train", "steps", 80, "train.steps: 40 in the run, 80")):
        changed = {**TINY, group: {**TINY[group], field: value}}
        with pytest.raises(ConfigError, match=rf"{shown} asked for.*another --workdir"):
            loop.setup(from_config_dict(changed), workdir, **quiet)
        assert open(os.path.join(workdir, "config.json")).read() == before
    harmless = {**TINY, "train": {**TINY["train"], "log_every": 3, "eval_batches": 1},
                "model": {**TINY["model"], "moe_impl": "block_sparse"}}
    loop.setup(from_config_dict(harmless), workdir, **quiet).writer.close()


def test_a_fresh_start_in_a_used_workdir_replaces_its_metrics(tmp_path):
    """Run twice in one workdir without checkpoints: the second run starts at step 0, and
    metrics.jsonl holds its steps once (it appended them after the first run's: 1-3, 1-3)."""
    cfg = from_config_dict({**TINY, "train": {**TINY["train"], "steps": 3, "log_every": 1,
                                              "eval_every": 0}})
    for _ in range(2):
        loop.train(cfg, str(tmp_path), data=SyntheticData(64, 32, steps=3), log=lambda *a: None)
    assert [r["step"] for r in _records(str(tmp_path))] == [1, 2, 3]


def test_dropped_token_slots_are_reported(tmp_path):
    """With capacity dropping (model.capacity_factor; expert-parallel buffers drop the same
    way) the step's metrics carry the dropped fraction of token-slots, the model's own figure
    averaged over the MoE layers; it was computed by the model and thrown away."""
    cfg = from_config_dict({**TINY, "model": {**TINY["model"], "capacity_factor": 0.5}})
    run = loop.setup(cfg, str(tmp_path), data=SyntheticData(64, 32, steps=1), log=lambda *a: None)
    batch = run.to_device(run.data.train.next_batch(8))
    _, aux = run.model.apply({"params": run.state.params, "balance": run.state.balance},
                             batch["inputs"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"], return_hidden=True)
    _, metrics = run.train_step(run.state, batch)
    want = float(np.mean(aux["dropped"]))
    assert want >= 0.2                               # half the mean load per expert is kept
    np.testing.assert_allclose(float(metrics["dropped"]), want, rtol=1e-6)
