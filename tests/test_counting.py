"""Parameter counts reproduce the report (SPEC §2) and the real parameter tree."""
import jax
import numpy as np
import pytest

from trinity_jax.config import from_config_dict, load_config_file, model_config
from trinity_jax.model import abstract_variables
from trinity_jax.model.counting import count_params, mean_attended_keys


@pytest.mark.parametrize("name,total,active,tol_total,tol_active", [
    ("large", 398.6e9, 13.4e9, 0.005, 0.01),
    ("mini", 26.1e9, 3.5e9, 0.005, 0.01),
    ("nano", 6.1e9, 1.0e9, 0.005, 0.025),   # report rounds 1.02B to "1.0B"
])
def test_published_sizes(name, total, active, tol_total, tol_active):
    c = count_params(from_config_dict(load_config_file(f"experiments/{name}.py")).model)
    assert abs(c["total"] / total - 1) < tol_total, c["total"]
    assert abs(c["active"] / active - 1) < tol_active, c["active"]


def test_count_equals_the_real_parameter_tree():
    cfg = model_config(vocab_size=300, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                       num_hidden_layers=5, num_dense_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, num_experts=6, num_experts_per_tok=2, num_shared_experts=2)
    leaves = jax.tree_util.tree_leaves(abstract_variables(cfg)["params"])
    assert sum(int(np.prod(x.shape)) for x in leaves) == count_params(cfg)["total"]


def test_mean_attended_keys():
    assert mean_attended_keys(4, None) == 2.5                    # (1+2+3+4)/4
    assert mean_attended_keys(6, 2) == (1 + 2 + 2 + 2 + 2 + 2) / 6
