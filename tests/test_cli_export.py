"""`export` / `convert-hf` / HF import: nothing on disk is changed or lost unless asked.

- `export --hf OUT` leaves the source variant byte-for-byte as it was (no silent bf16 re-save, its
  experiment.json kept); `--dtype` re-saves it and keeps experiment.json;
- an existing non-empty directory that is not an earlier output of the same kind is refused (exit 2,
  named, nothing written); an earlier export is replaced, and a sibling `OUT.old` is not touched;
- subcommands without a config refuse `--config.*` overrides instead of ignoring them;
- keys missing from an HF config.json take transformers' AfmoeConfig defaults, as `from_pretrained` does.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import trinity_jax as tj
from trinity_jax.checkpoint import hf, variants
from trinity_jax.cli import main
from trinity_jax.config import model_config
from trinity_jax.model import abstract_variables

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=16,
           num_hidden_layers=2, num_dense_layers=1, global_attn_every_n_layers=2, num_attention_heads=2,
           num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
           sliding_window=8, max_position_embeddings=64, mup_enabled=True)
EXPERIMENT = {"model": CFG, "train": {"steps": 4}}
TRIMMED = ("mup_enabled", "sliding_window", "num_experts_per_tok", "max_position_embeddings")


def _random_model(seed: int = 0) -> tj.LoadedModel:
    cfg = model_config(**CFG)
    rng = np.random.default_rng(seed)
    v = jax.tree_util.tree_map(lambda a: (0.15 * rng.standard_normal(a.shape)).astype(np.float32)
                               if len(a.shape) > 1 else (1 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                               abstract_variables(cfg))
    v["balance"] = jax.tree_util.tree_map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                                          v["balance"])
    return tj.LoadedModel(cfg, v)


def _snapshot(path) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir with a float32 `base` variant that has an experiment.json."""
    w = tmp_path_factory.mktemp("work")
    variants.save_variant(_random_model(), str(w / "variants" / "base"), name="base", dtype="float32",
                          metadata={"step": 4}, experiment=EXPERIMENT)
    return w


@pytest.fixture
def fresh_workdir(workdir, tmp_path):
    """A private copy of `workdir` (for tests that re-save the variant)."""
    import shutil

    shutil.copytree(workdir, tmp_path / "work")
    return tmp_path / "work"


def test_export_hf_leaves_the_variant_untouched(workdir, tmp_path):
    base = workdir / "variants" / "base"
    before = _snapshot(base)
    assert main(["export", "--workdir", str(workdir), "--variant", "base", "--hf", str(tmp_path / "hf")]) == 0
    assert _snapshot(base) == before                      # same files, same bytes
    assert json.loads((base / "metadata.json").read_text())["dtype"] == "float32"
    assert json.loads((base / "experiment.json").read_text()) == EXPERIMENT
    assert tj.load(str(tmp_path / "hf")).config == model_config(**CFG)


def test_export_dtype_resaves_and_keeps_experiment_json(fresh_workdir):
    base = fresh_workdir / "variants" / "base"
    assert main(["export", "--workdir", str(fresh_workdir), "--variant", "base", "--dtype", "bfloat16"]) == 0
    meta = json.loads((base / "metadata.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["step"] == 4
    assert json.loads((base / "experiment.json").read_text()) == EXPERIMENT
    assert not [p for p in os.listdir(base.parent) if p.startswith(".tmp")]


def test_export_refuses_an_unrelated_directory(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--workdir", str(workdir), "--variant", "base", "--hf", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err and "not empty" in err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out"]         # no temp dir left behind
    # an earlier HF export holding one file an export never writes is refused too
    hf_out = tmp_path / "hf"
    hf.save_hf_dir(_random_model().config, _random_model().variables, str(hf_out))
    (hf_out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        hf.save_hf_dir(_random_model().config, _random_model().variables, str(hf_out))
    assert (hf_out / "notes.txt").read_text() == "mine"


def test_save_variant_refuses_an_unrelated_directory(tmp_path):
    out = tmp_path / "v"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"v: directory is not empty and is not an earlier variant"):
        variants.save_variant(_random_model(), str(out), name="v")
    assert os.listdir(out) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["v"]


def test_earlier_export_is_replaced_and_sibling_old_kept(workdir, tmp_path):
    out, sibling = tmp_path / "hf", tmp_path / "hf.old"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("mine")             # a fixed `OUT.old` scratch name used to be deleted
    for _ in range(2):
        assert main(["export", "--workdir", str(workdir), "--variant", "base", "--hf", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert (sibling / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.old"]


@pytest.mark.parametrize("cmd", ["export", "generate", "convert-hf"])
def test_subcommands_without_config_refuse_overrides(workdir, tmp_path, capsys, cmd):
    argv = {"export": ["--workdir", str(workdir), "--variant", "base", "--hf", str(tmp_path / "hf")],
            "generate": ["--model", str(tmp_path / "nope"), "--prompt", "x"],
            "convert-hf": ["--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]}[cmd]
    assert main([cmd, *argv, "--config.model.dtype=bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --config.model.dtype=bfloat16: the {cmd} command takes no --config overrides "
                   "(only train, sft and plan do)")
    assert os.listdir(tmp_path) == []                     # nothing written


def _trimmed_hf_dir(tmp_path) -> str:
    out = hf.save_hf_dir(_random_model().config, _random_model().variables, str(tmp_path / "hf"))
    path = os.path.join(out, "config.json")
    with open(path) as f:
        c = json.load(f)
    for k in TRIMMED:
        c.pop(k)
    with open(path, "w") as f:
        json.dump(c, f)
    return out


def test_missing_hf_keys_take_afmoe_defaults(tmp_path):
    cfg = tj.load(_trimmed_hf_dir(tmp_path)).config
    got = {k: getattr(cfg, k) for k in TRIMMED}
    assert got == {"mup_enabled": False, "sliding_window": 1024, "num_experts_per_tok": 6,
                   "max_position_embeddings": 16384}
    assert got == {k: hf.AFMOE_DEFAULTS[k] for k in TRIMMED}


def test_afmoe_defaults_table_matches_transformers():
    transformers = pytest.importorskip("transformers")
    c = transformers.AfmoeConfig()
    assert set(hf._HF_FIELDS) | {"rope_theta"} == set(hf.AFMOE_DEFAULTS)
    for k, v in hf.AFMOE_DEFAULTS.items():
        if k == "rope_theta":
            assert c.rope_parameters["rope_theta"] == v
        elif k == "num_key_value_heads":
            assert v is None and c.num_key_value_heads == c.num_attention_heads
        else:
            assert getattr(c, k) == v, k


def test_trimmed_config_logits_equal_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _trimmed_hf_dir(tmp_path)
    ref_model = transformers.AfmoeForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, CFG["vocab_size"], (1, 12))
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(tj.load(path).logits(tokens), ref, atol=1e-4)


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"type": "linear", "factor": 4.0}},                         # old-style key
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
     "rope_scaling": {"rope_type": "linear", "factor": 4.0}},                     # beside a default
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}},
])
def test_rope_scaling_is_refused_not_ignored(rope):
    """transformers turns each of these into scaled RoPE (inv_freq / 4); import used to accept
    them and run plain RoPE (logits 3e-3 off HF's, growing with position)."""
    hf_cfg = hf.config_to_hf(model_config(**CFG))
    if "rope_parameters" not in rope:           # the old-style file has only rope_scaling
        del hf_cfg["rope_parameters"]
    hf_cfg.update(rope)
    with pytest.raises(hf.HFFormatError, match=r"rope_(scaling|parameters)=.*RoPE scaling is not supported"):
        hf.config_from_hf(hf_cfg)
    plain = hf.config_from_hf(hf.config_to_hf(model_config(**CFG)))
    assert plain.rope_theta == model_config(**CFG).rope_theta


def test_hf_directory_tokenizer_takes_the_configs_special_ids(tmp_path):
    """tj.load of an HF directory: the tokenizer's bos/eos/pad are config.json's ids (generation
    stops at eos_token_id); they were the built-in BPE's 1/2/0 whatever the config said."""
    import tokenizers
    cfg = model_config(**CFG, bos_token_id=7, eos_token_id=9, pad_token_id=8)
    out = str(tmp_path / "hf")
    hf.save_hf_dir(cfg, jax.device_get(_random_model().variables), out)
    vocab = {f"w{i}": i for i in range(CFG["vocab_size"])}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w3")).save(os.path.join(out, "tokenizer.json"))
    tok = tj.load(out).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (7, 9, 8)
