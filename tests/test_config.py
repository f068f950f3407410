"""Config validation: one clear error naming the field and the rule; overrides; experiment files."""
import glob

import pytest

from trinity_jax.config import (ConfigError, apply_overrides, default_config_dict, from_config_dict,
                                load_config_file, to_config_dict)


def _cfg(**model):
    cd = default_config_dict()
    for k, v in model.items():
        cd.model[k] = v
    return from_config_dict(cd)


@pytest.mark.parametrize("fields,pattern", [
    (dict(num_experts=8, num_experts_per_tok=9), r"model\.num_experts_per_tok=9 must be <= model\.num_experts=8"),
    (dict(num_attention_heads=6, num_key_value_heads=4), r"model\.num_key_value_heads=4 must divide model\.num_attention_heads=6"),
    (dict(sliding_window=0), r"model\.sliding_window=0: must be >= 1"),
    (dict(num_hidden_layers=4, num_dense_layers=5), r"model\.num_dense_layers=5: must be in \[0, num_hidden_layers=4\]"),
    (dict(moe_impl="magic"), r"model\.moe_impl='magic': allowed values are"),
    (dict(head_dim=15), r"model\.head_dim=15: must be even"),
])
def test_invalid_model_values_name_field_and_rule(fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _cfg(**fields)


def test_unknown_field_is_named():
    cd = default_config_dict().to_dict()
    cd["model"]["num_expert"] = 3
    with pytest.raises(ConfigError, match=r"unknown field model\.num_expert; allowed fields of model"):
        from_config_dict(cd)


def test_unknown_group_is_named():
    cd = default_config_dict().to_dict()
    cd["optimiser"] = {}
    with pytest.raises(ConfigError, match=r"unknown config group 'optimiser'"):
        from_config_dict(cd)


def test_wrong_type_is_named():
    cd = default_config_dict().to_dict()
    cd["model"]["hidden_size"] = "big"
    with pytest.raises(ConfigError, match=r"model\.hidden_size='big': expected an int, got str"):
        from_config_dict(cd)
    cd = default_config_dict().to_dict()
    cd["model"]["mup_enabled"] = 1
    with pytest.raises(ConfigError, match=r"model\.mup_enabled=1: expected a bool"):
        from_config_dict(cd)


def test_override_syntax_and_unknown_override():
    cd = load_config_file("experiments/tiny.py", {"model.num_experts": "32", "train.steps": "50",
                                                   "optim.muon_lr": "2e-3", "model.dtype": "bfloat16"})
    cfg = from_config_dict(cd)
    assert (cfg.model.num_experts, cfg.train.steps, cfg.optim.muon_lr, cfg.model.dtype) == (32, 50, 2e-3, "bfloat16")
    with pytest.raises(ConfigError, match=r"--config\.model\.expertz: unknown field model\.expertz"):
        apply_overrides(default_config_dict(), {"model.expertz": "3"})


def test_phase_mixture_with_unknown_source_is_rejected():
    cd = load_config_file("experiments/tiny.py")
    cd.data.phases = [{"name": "p", "tokens": 10, "mixture": {"nope": 1.0}}]
    with pytest.raises(ConfigError, match=r"data\.phases\[0\]\.mixture names unknown source 'nope'"):
        from_config_dict(cd)


def test_batch_not_divisible_by_microbatches():
    cd = default_config_dict()
    cd.train.batch_size, cd.train.microbatches = 10, 4
    with pytest.raises(ConfigError, match=r"train\.microbatches=4 must divide train\.batch_size=10"):
        from_config_dict(cd)


@pytest.mark.parametrize("override,pattern", [
    ({"train.batch_ramp": "[1000, 32]"}, r"train\.batch_ramp\[0\]=1000: expected a \(tokens_seen, batch_size\) pair"),
    ({"train.batch_ramp": "[(1000, None)]"}, r"train\.batch_ramp\[0\]=None: expected an int"),
    ({"train.batch_ramp": "[(1000.7, 32)]"}, r"train\.batch_ramp\[0\]=1000\.7: expected an int"),
    ({"data.phases.0.mixture.lib": "'x'"}, r"data\.phases\[0\]\.mixture\.lib='x': expected a number"),
    ({"data.phases.7.tokens": "5"}, r"--config\.data\.phases\.7\.tokens: data\.phases\.7 is not an index .* 0\.\.2"),
    ({"optim.decay_start_phase": "3"}, r"optim\.decay_start_phase=3: the data plan has 3 phase\(s\).*-3\.\.2"),
    ({"optim.decay_start_phase": "0"}, r"optim\.decay_start_phase=0: the decay would start in the first data phase"),
])
def test_bad_ramp_mixture_phase_index_and_decay_phase_are_named(override, pattern):
    """Malformed values of list-shaped fields, list indices and the decay phase: one ConfigError
    naming the entry (they were tracebacks, silently truncated floats, or a TrueBase taken
    after the decay had begun)."""
    with pytest.raises(ConfigError, match=pattern):
        from_config_dict(load_config_file("experiments/tiny.py", override))


def test_overrides_reach_list_entries_and_whole_ramp_thresholds():
    cfg = from_config_dict(load_config_file("experiments/tiny.py", {
        "data.phases.1.tokens": "123", "train.batch_ramp": "[(4.9e12, 16)]"}))
    assert cfg.data.phases[1].tokens == 123 and cfg.train.batch_ramp == ((4_900_000_000_000, 16),)


EXPERIMENTS = sorted(p for p in glob.glob("experiments/*.py") + glob.glob("experiments/ablations/*.py")
                     if not p.endswith("__init__.py") and not p.split("/")[-1].startswith("_"))


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_every_experiment_file_validates_and_documents_its_command(path):
    src = open(path).read()
    assert "python -m trinity_jax" in src.split('"""')[1], f"{path}: docstring must start with the command"
    cfg = from_config_dict(load_config_file(path))
    assert from_config_dict(to_config_dict(cfg)) == cfg     # round trip through plain dicts
