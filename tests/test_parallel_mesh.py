"""parallel/mesh.py and parallel/rules.py: mesh construction, up-front checks, the one rules table."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from trinity_jax.config import ConfigError, ExperimentConfig, MeshConfig, TrainConfig, model_config
from trinity_jax.parallel import mesh as mesh_lib
from trinity_jax.parallel import rules

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=2, num_dense_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=64, sliding_window=8, global_attn_every_n_layers=2)


def _exp(mesh=MeshConfig(), batch=8, micro=1, **model):
    return ExperimentConfig(model=model_config(**{**SMALL, **model}), mesh=mesh,
                            train=TrainConfig(batch_size=batch, microbatches=micro, seq_len=16))


def test_single_device_mesh_all_axes_one():
    m = mesh_lib.make_mesh(MeshConfig(replica=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
    assert m.axis_names == mesh_lib.AXES and m.devices.shape == (1, 1, 1, 1)
    assert m.axis_types == (AxisType.Auto,) * 4


def test_inferred_axis_and_order():
    m = mesh_lib.make_mesh(MeshConfig(replica=2, fsdp=-1, expert=2, tensor=1))
    assert dict(m.shape) == dict(replica=2, fsdp=2, expert=2, tensor=1)
    assert [d.id for d in m.devices.reshape(-1)] == sorted(d.id for d in jax.devices())
    assert mesh_lib.data_parallel_size(m) == 8


@pytest.mark.parametrize("mesh, kw, msg", [
    (MeshConfig(replica=3, fsdp=1, expert=1, tensor=1), {}, "has 3 devices but 8"),
    (MeshConfig(replica=1, fsdp=-1, expert=3, tensor=1), {}, "not divisible by the product"),
    (MeshConfig(replica=1, fsdp=1, expert=8, tensor=1), dict(num_experts=12), "mesh.expert=8 must divide model.num_experts=12"),
    (MeshConfig(replica=1, fsdp=2, expert=1, tensor=4), {}, "mesh.tensor=4 must divide model.num_key_value_heads=2"),
    (MeshConfig(replica=1, fsdp=1, expert=1, tensor=8), {}, "mesh.tensor=8 must divide model.num_attention_heads=4"),
    (MeshConfig(replica=2, fsdp=4, expert=1, tensor=1), dict(batch=4), "train.batch_size=4 must be divisible by the data-parallel size replica*fsdp*expert=2*4*1=8"),
    (MeshConfig(replica=2, fsdp=4, expert=1, tensor=1), dict(batch=16, micro=4), "the microbatch) must be divisible"),
    (MeshConfig(replica=1, fsdp=2, expert=2, tensor=2), dict(moe_intermediate_size=15),
     "mesh.tensor=2 must divide model.moe_intermediate_size=15"),
])
def test_validate_mesh_errors_name_the_numbers(mesh, kw, msg):
    batch, micro = kw.pop("batch", 8), kw.pop("micro", 1)
    with pytest.raises(ConfigError, match=None) as e:
        mesh_lib.validate_mesh_for(_exp(mesh, batch, micro, **kw), 8)
    assert msg in str(e.value), str(e.value)


def test_validate_ok():
    sizes = mesh_lib.validate_mesh_for(_exp(MeshConfig(replica=1, fsdp=2, expert=2, tensor=2)), 8)
    assert sizes == dict(replica=1, fsdp=2, expert=2, tensor=2)


def test_table_covers_every_logical_name_once_per_meaning():
    names = {n for n, _ in rules.LOGICAL_AXIS_RULES}
    assert set(rules.PARAM_AXES) <= names and set(rules.ACTIVATION_AXES) <= names
    from trinity_jax.model import logical_axes
    used = {n for spec in jax.tree.leaves(logical_axes(model_config(**SMALL)),
                                          is_leaf=lambda x: isinstance(x, P))
            for n in spec if n is not None}
    assert used <= names, used - names


def test_fit_spec_falls_back_to_replication():
    m = mesh_lib.make_mesh(MeshConfig(replica=1, fsdp=2, expert=2, tensor=2))
    assert rules.fit_spec(P(("fsdp", "expert"), "tensor"), (8, 6), m) == P(("fsdp", "expert"), "tensor")
    assert rules.fit_spec(P(("fsdp", "expert"), "tensor"), (6, 5), m) == P("fsdp")   # 6 % 4, 5 % 2
    assert rules.fit_spec(P("tensor"), (3,), m) == P()


def _shardings(mesh_cfg, **model):
    from trinity_jax.model.transformer import init_boxed
    cfg = model_config(**{**SMALL, **model})
    mesh = mesh_lib.make_mesh(mesh_cfg)
    boxed = jax.eval_shape(lambda r: init_boxed(cfg, r), jax.random.key(0))
    return mesh, cfg, boxed, rules.param_shardings(boxed, mesh)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(replica=1, fsdp=8, expert=1, tensor=1),
                                      MeshConfig(replica=1, fsdp=2, expert=2, tensor=2),
                                      MeshConfig(replica=2, fsdp=1, expert=4, tensor=1)])
def test_no_large_tensor_fully_replicated(mesh_cfg):
    """Every param of >= 4096 elements is sharded; expert weights over 'expert' (when > 1)."""
    mesh, cfg, boxed, shard = _shardings(mesh_cfg)
    import flax.linen as nn
    shapes = nn.unbox(boxed)
    flat = jax.tree_util.tree_flatten_with_path(shard)[0]
    shape_of = dict((jax.tree_util.keystr(p), s.shape) for p, s in
                    jax.tree_util.tree_flatten_with_path(shapes)[0])
    for path, s in flat:
        key = jax.tree_util.keystr(path)
        n = int(np.prod(shape_of[key]))
        per_dev = int(np.prod(s.shard_shape(shape_of[key])))
        if n >= 4096 and mesh.shape["fsdp"] * mesh.shape["expert"] * mesh.shape["tensor"] > 1:
            assert per_dev < n, (key, s.spec)
        if "['experts']" in key and mesh.shape["expert"] > 1:
            assert s.spec[1] == "expert", (key, s.spec)


def test_expert_weights_layout_and_vocab_fallback():
    mesh, cfg, boxed, shard = _shardings(MeshConfig(replica=1, fsdp=2, expert=2, tensor=2),
                                         vocab_size=513)
    p = shard["params"]
    assert p["moe_layers"]["mlp"]["experts"]["gate_proj"].spec == P(None, "expert", "fsdp", "tensor")
    assert p["moe_layers"]["mlp"]["experts"]["down_proj"].spec == P(None, "expert", "tensor", "fsdp")
    assert p["dense_layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, ("fsdp", "expert"), "tensor")
    assert p["embed_tokens"]["embedding"].spec == P(None, ("fsdp", "expert"))   # 513 % tensor != 0
    assert shard["balance"]["moe_layers"]["mlp"]["expert_bias"].spec == P(None, "expert")


def test_jit_init_with_out_shardings():
    from trinity_jax.model.transformer import init_variables
    mesh, cfg, boxed, _ = _shardings(MeshConfig(replica=1, fsdp=2, expert=2, tensor=2))
    import flax.linen as nn
    shard = rules.param_shardings(boxed, mesh)
    with rules.use_mesh(mesh):
        v = jax.jit(lambda r: init_variables(cfg, r), out_shardings=shard)(jax.random.key(0))
    g = v["params"]["moe_layers"]["mlp"]["experts"]["up_proj"]
    assert g.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert g.addressable_shards[0].data.shape == (1, 4, 32, 16)


def test_batch_sharding_splits_rows():
    m = mesh_lib.make_mesh(MeshConfig(replica=2, fsdp=2, expert=2, tensor=1))
    a = jax.device_put(np.arange(16 * 3).reshape(16, 3), rules.batch_sharding(m))
    assert a.addressable_shards[0].data.shape == (2, 3)


def test_tensor_group_must_stay_inside_a_process(monkeypatch):
    """2 processes x 1 device with tensor=2: each process loads its own batch rows, but a tensor
    group needs the same rows on all its devices (it failed later at batch assembly, "Invalid
    host data"); refused up front. 2 processes x 4 devices with tensor=2 is fine."""
    monkeypatch.setattr(mesh_lib.jax, "process_count", lambda: 2)
    monkeypatch.setattr(mesh_lib.jax, "local_device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"mesh\.tensor=2 must divide the devices of one process \(1\)"):
        mesh_lib.validate_mesh_for(_exp(MeshConfig(replica=1, fsdp=1, expert=1, tensor=2), batch=2), 2)
    monkeypatch.setattr(mesh_lib.jax, "local_device_count", lambda: 4)
    mesh_lib.validate_mesh_for(_exp(MeshConfig(replica=1, fsdp=2, expert=2, tensor=2)), 8)
