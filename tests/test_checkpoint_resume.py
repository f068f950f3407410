"""Checkpoints: exact resume after SIGKILL (also during async saves), SIGTERM, corruption, resharding.

Every run is the CLI (`python -m trinity_jax train`) on a tiny config and a small text corpus, in
a subprocess; the persistent compilation cache keeps restarts cheap. Per-step losses after a
resume must be bit-identical to an uninterrupted run (CPU is deterministic).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12

CONFIG = """
from trinity_jax.config import default_config_dict

def get_config():
    c = default_config_dict()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.moe_intermediate_size = 384, 32, 64, 16
    m.num_hidden_layers, m.num_dense_layers, m.num_attention_heads, m.num_key_value_heads = 2, 1, 2, 1
    m.head_dim, m.num_experts, m.num_experts_per_tok, m.sliding_window = 16, 4, 2, 8
    m.global_attn_every_n_layers, m.max_position_embeddings = 2, 64
    m.moe_impl = "dense_reference"   # the cheapest MoE to compile (~6 s less a cold run); dispatch: test_moe
    c.mesh.fsdp = -1
    c.optim.warmup_steps = 2
    c.train.steps, c.train.batch_size, c.train.seq_len, c.train.log_every = {steps}, 8, 32, 1
    c.train.eval_batches = 1
    c.train.peak_flops = 1e11
    c.checkpoint.every = {every}
    c.checkpoint.keep = 3
    c.data.sources = {{"text": "{corpus}"}}
    c.data.phases = [{{"name": "p1", "tokens": 2, "mixture": {{"text": 1.0}}}},
                     {{"name": "p2", "tokens": 1, "mixture": {{"text": 1.0}}}}]
    return c
"""


def _env(devices: int = 8) -> dict:
    return subprocess_env(devices)


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    corpus = d / "corpus.txt"
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
             "sigma tau upsilon phi chi psi omega").split()
    docs = []
    for i in range(300):
        docs.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 13)))
    corpus.write_text("\n<|endoftext|>\n".join(docs))
    return d, corpus


def _config(d, corpus, every: int, name: str) -> str:
    path = d / f"{name}.py"
    path.write_text(textwrap.dedent(CONFIG.format(steps=STEPS, every=every, corpus=corpus)))
    return str(path)


def _cmd(config: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trinity_jax", "train", "--config", config, "--workdir", workdir,
            "--config.sft.steps=0", *extra]


def _losses(workdir) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[int(r["step"])] = r["loss"]
    return out


def _run(cmd, env, timeout=600):
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def reference(setup_dir):
    d, corpus = setup_dir
    cfg = _config(d, corpus, every=3, name="ref")
    work = d / "ref"
    _run(_cmd(cfg, str(work)), _env())
    losses = _losses(work)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return cfg, losses, work


def _wait_for(path_fn, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path_fn():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _checkpoint_steps(work) -> list[int]:
    d = os.path.join(work, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["first_checkpoint_tmp", "second_checkpoint"])
def test_sigkill_then_resume_is_bit_identical(setup_dir, reference, kill_after, tmp_path):
    cfg, ref_losses, _ = reference
    work = tmp_path / "run"
    proc = subprocess.Popen(_cmd(cfg, str(work)), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckdir = os.path.join(work, "checkpoints")
    if kill_after == "first_checkpoint_tmp":   # kill while the first async save is being written
        cond = lambda: os.path.isdir(ckdir) and any("tmp" in x for x in os.listdir(ckdir))  # noqa: E731
    else:
        cond = lambda: len(_checkpoint_steps(work)) >= 2  # noqa: E731
    _wait_for(cond, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run(_cmd(cfg, str(work)), _env())
    losses = _losses(work)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref_losses          # bit-identical (JSON floats round-trip exactly)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(setup_dir, reference, tmp_path):
    cfg, ref_losses, _ = reference
    work = tmp_path / "run"
    proc = subprocess.Popen(_cmd(cfg, str(work), "--config.checkpoint.every=100"), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: os.path.isfile(work / "metrics.jsonl") and len(_losses(work)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    err, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = _checkpoint_steps(work)
    assert saved and "SIGTERM: saved step" in err
    _run(_cmd(cfg, str(work), "--config.checkpoint.every=100"), _env())
    assert _losses(work) == ref_losses


def test_corrupted_checkpoint_is_reported_and_skipped(setup_dir, reference, tmp_path):
    cfg, ref_losses, ref_work = reference
    work = tmp_path / "run"
    shutil.copytree(ref_work, work)               # a finished run (checkpoints kept: the last 3)
    steps = _checkpoint_steps(work)
    last = steps[-1]
    # corrupt every array file of the newest checkpoint
    for root, _, files in os.walk(os.path.join(work, "checkpoints", str(last), "state")):
        for fn in files:
            p = os.path.join(root, fn)
            with open(p, "r+b") as f:
                f.truncate(max(0, os.path.getsize(p) // 3))
    p = _run(_cmd(cfg, str(work)), _env())
    assert f"checkpoint {os.path.join(work, 'checkpoints', str(last))} is incomplete or corrupted" in p.stderr + p.stdout
    assert f"resumed from checkpoint step {steps[-2]}" in p.stderr + p.stdout
    assert _losses(work) == ref_losses


@pytest.mark.slow
@pytest.mark.parametrize("devices,mesh", [(8, ("--config.mesh.replica=2", "--config.mesh.fsdp=4")),
                                          (1, ("--config.mesh.fsdp=1",))])
def test_restore_onto_a_different_mesh(setup_dir, reference, devices, mesh, tmp_path):
    """Saved on 8 devices (fsdp=8), resumed on a 2x4 mesh and on 1 device: same losses to 1e-5
    (different meshes reduce in a different order, so bit-identity is not expected)."""
    cfg, ref_losses, ref_work = reference
    work = tmp_path / "run"
    shutil.copytree(ref_work, work)               # saved on 8 devices by the reference run
    for s in _checkpoint_steps(work):
        if s > 6:
            shutil.rmtree(os.path.join(work, "checkpoints", str(s)))
    _run(_cmd(cfg, str(work), *mesh), _env(devices))
    losses = _losses(work)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for s in range(7, STEPS + 1):
        assert abs(losses[s] - ref_losses[s]) < 1e-5 * max(1.0, abs(ref_losses[s])), (s, losses[s], ref_losses[s])
