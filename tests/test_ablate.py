"""The ablation runner: a 2-variant micro group runs, is compared, and is skipped when finished.

The runs go through the CLI in a subprocess on one CPU device with the persistent compilation
cache (as tests/test_checkpoint_resume.py); the two variants differ only in the init seed, so
the second one reuses the first one's compiled steps (about 30 s with a warm cache, 85 s cold,
on 2 loaded CPU cores: marked slow).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import subprocess_env

from trinity_jax import ablate
from trinity_jax.config import ConfigError, to_config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = """
\"\"\"python -m trinity_jax ablate {path} --workdir WORKDIR

A micro group for tests: two init seeds.
\"\"\"
from trinity_jax.config import default_config_dict

VARIANTS = ("seed0", "seed1")


def get_config(variant="seed0"):
    c = default_config_dict()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.moe_intermediate_size = 320, 32, 64, 16
    m.num_hidden_layers, m.num_dense_layers, m.num_attention_heads, m.num_key_value_heads = 2, 1, 2, 1
    m.head_dim, m.num_experts, m.num_experts_per_tok, m.sliding_window = 16, 4, 2, 8
    m.global_attn_every_n_layers, m.max_position_embeddings = 2, 64
    m.moe_impl = "dense_reference"   # the cheapest MoE to compile; dispatch is tested in test_moe
    c.optim.warmup_steps = 2
    c.train.steps, c.train.batch_size, c.train.seq_len, c.train.log_every = 4, 8, 32, 1
    c.train.eval_batches, c.train.peak_flops = 1, 1e11
    c.train.seed = int(variant[-1])
    c.checkpoint.every = 4
    c.data.sources = {{"text": "{corpus}"}}
    return c
"""


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    d = tmp_path_factory.mktemp("ablate")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    docs = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(30 + i % 11)) for i in range(200)]
    corpus = d / "corpus.txt"
    corpus.write_text("\n<|endoftext|>\n".join(docs))
    path = d / "micro.py"
    path.write_text(textwrap.dedent(GROUP.format(path=path, corpus=corpus)))
    return d, str(path)


def _ablate(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "trinity_jax", "ablate", *args], env=subprocess_env(1), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


@pytest.mark.slow
def test_runs_every_variant_then_skips_finished_ones(group):
    d, path = group
    workdir = str(d / "runs")
    _ablate(path, "--workdir", workdir)

    table = open(os.path.join(workdir, "comparison.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split("|")[1].strip() for r in rows] == ["seed0", "seed1"]
    assert all(r.split("|")[2].strip() == "4" for r in rows)          # steps
    assert rows[0].split("|")[3] != rows[1].split("|")[3]             # each ran its own config
    summary = json.load(open(os.path.join(workdir, "comparison.json")))
    for png in ("loss.png", "max_vio.png"):
        assert open(os.path.join(workdir, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert summary["plots"][png] == ["seed0", "seed1"]             # one line per variant
    for v in ("seed0", "seed1"):
        assert summary["variants"][v]["val_loss"] is not None
        assert ablate.is_finished(os.path.join(workdir, v), 4)
    assert os.path.isdir(os.path.join(workdir, "_data"))              # one shared token cache

    before = {v: _lines(os.path.join(workdir, v, "metrics.jsonl")) for v in ("seed0", "seed1")}
    second = _ablate(path, "--workdir", workdir)
    assert second.stderr.count("finished, skipped") == 2
    assert {v: _lines(os.path.join(workdir, v, "metrics.jsonl")) for v in ("seed0", "seed1")} == before
    assert second.stdout.count("| seed") == 2                          # the table, printed again


def test_refuses_a_workdir_of_another_config_before_running(group, tmp_path):
    _, path = group
    workdir = str(tmp_path / "runs")
    cfg = ablate.variant_configs(path, {})["seed0"]                    # train.steps = 4
    os.makedirs(os.path.join(workdir, "seed0"))
    with open(os.path.join(workdir, "seed0", "config.json"), "w") as f:
        json.dump(to_config_dict(ablate._with_shared_cache(cfg, workdir)), f)
    ablate.check_resumable(ablate._with_shared_cache(cfg, workdir), os.path.join(workdir, "seed0"))  # same: ok
    with pytest.raises(ConfigError, match="train.steps: 4 in the run, 5 asked for"):
        ablate.main([path, "--workdir", workdir, "--config.train.steps=5"])
    assert sorted(os.listdir(workdir)) == ["seed0"]                     # nothing ran, nothing written


def test_a_group_without_variants_is_rejected(tmp_path):
    path = tmp_path / "g.py"
    path.write_text('"""python -m trinity_jax ablate g.py"""\nfrom trinity_jax.config import default_config_dict\n'
                    "def get_config():\n    return default_config_dict()\n")
    with pytest.raises(ConfigError, match="defines no VARIANTS"):
        ablate.group_variants(str(path))
