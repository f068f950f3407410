"""parallel/planner.py: analytic per-device memory / comms / time, checked against XLA."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest

from trinity_jax.config import (ConfigError, ExperimentConfig, MeshConfig, OptimConfig,
                                TrainConfig, from_config_dict, load_config_file, model_config)
from trinity_jax.parallel import planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE_MESH = dict(replica=16, fsdp=16, expert=8)    # HSDP groups of 128 = fsdp×expert, EP 8


def _large():
    return from_config_dict(load_config_file(os.path.join(ROOT, "experiments", "large.py")))


def test_400b_per_device_state():
    """398.6B params; dense weights and experts both split 128 ways (fsdp×expert), replicated
    over the 16 replica groups: fp32 master ≈ 4 B × 398.6B / 128 per device."""
    cfg = _large()
    p = planner.plan(cfg, LARGE_MESH, 2048)
    c = p["counts"]
    assert abs(c["total"] / 1e9 - 398.6) < 0.1 and abs(c["active"] / 1e9 - 13.4) < 0.05
    assert p["params_bytes"] == pytest.approx(4 * c["total"] / 128, rel=0.005)
    assert p["grads_bytes"] == p["params_bytes"]
    # Muon (1 buffer) holds nearly everything; AdamW (2 buffers) the embeddings and norms
    emb = c["embedding"] / 128
    assert p["opt_bytes"] == pytest.approx(4 * (c["total"] / 128 + emb), rel=0.005)


def test_fixed_buffers_vs_ragged_all_to_all():
    cfg = _large()
    dropless = planner.plan(cfg, LARGE_MESH, 2048)
    assert dropless["a2a_bytes_per_moe_layer"] == pytest.approx(
        8 * dropless["a2a_ragged_bytes_per_moe_layer"])
    capped = planner.plan(dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, ep_buffer_factor=1.5)),
                          LARGE_MESH, 2048)
    assert capped["a2a_bytes_per_moe_layer"] == pytest.approx(
        1.5 * capped["a2a_ragged_bytes_per_moe_layer"])
    assert capped["hw_flops_step"] < dropless["hw_flops_step"]
    # a factor above ep is what the code caps it at (expert.buffer_rows): the dropless plan
    over = planner.plan(dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, ep_buffer_factor=16)),
                        LARGE_MESH, 2048)
    assert over["hw_flops_step"] == pytest.approx(dropless["hw_flops_step"])
    assert over["a2a_bytes_per_moe_layer"] == pytest.approx(dropless["a2a_bytes_per_moe_layer"])


def test_mesh_must_match_device_count():
    with pytest.raises(ConfigError, match="has 16384 devices but 2048"):
        planner.plan(_large(), dict(replica=16, fsdp=128, expert=8), 2048)


def test_format_plan_table():
    txt = planner.format_plan(_large(), LARGE_MESH, 2048, peak_flops=2.25e15, interconnect_bw=400e9)
    for row in ("parameters (fp32 master)", "optimizer (Muon 1×fp32, AdamW 2×fp32)",
                "all-to-all per MoE layer", "step lower bound"):
        assert row in txt


SMALL = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_hidden_layers=4, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
             sliding_window=32, global_attn_every_n_layers=2, remat_policy="full",
             moe_impl="block_sparse")


@pytest.mark.slow
def test_memory_matches_xla_memory_analysis():
    """Depth-reduced (1 dense + 1 MoE layer) small config compiled for a 1×2×4×1 mesh of
    emulated CPU devices: the train state equals XLA's argument bytes (0.5%), and state +
    gradients + activations is within 20% of XLA's arguments + temporaries."""
    from trinity_jax.model import Transformer, abstract_variables
    from trinity_jax.model.transformer import init_boxed
    from trinity_jax.parallel import rules
    from trinity_jax.parallel.mesh import make_mesh
    from trinity_jax.train import step as step_lib
    from trinity_jax.train.optimizer import make_optimizer
    from trinity_jax.train.schedules import group_schedules

    sizes = dict(replica=1, fsdp=2, expert=4, tensor=1)
    cfg = planner.depth_reduced(ExperimentConfig(
        model=model_config(**SMALL), mesh=MeshConfig(**sizes), optim=OptimConfig(ns_steps=1),
        train=TrainConfig(batch_size=16, seq_len=128, loss_chunk_size=256)), 1, 1)
    p = planner.plan(cfg, sizes)

    mesh = make_mesh(cfg.mesh)
    shard = rules.param_shardings(jax.eval_shape(lambda r: init_boxed(cfg.model, r),
                                                 jax.random.key(0)), mesh)
    av = abstract_variables(cfg.model)
    opt = make_optimizer(cfg.optim, av["params"], group_schedules(cfg.optim, total_steps=10))
    st_sh = step_lib.state_shardings(shard["params"], shard["balance"], opt, av["params"],
                                     rules.replicated(mesh))
    state = jax.eval_shape(lambda v: step_lib.init_state(v, opt, jax.random.key(0)), av)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, st_sh)
    bs = rules.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((16, 128), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=bs) for k in step_lib.BATCH_KEYS}
    step = step_lib.jit_train_step(step_lib.make_train_step(cfg, Transformer(cfg.model), opt), st_sh, bs)
    with rules.use_mesh(mesh):
        ma = step.lower(state, batch).compile().memory_analysis()
    batch_bytes = 5 * 16 * 128 * 4 // 8
    assert p["state_bytes"] == pytest.approx(ma.argument_size_in_bytes - batch_bytes, rel=0.005)
    xla_total = ma.argument_size_in_bytes + ma.temp_size_in_bytes
    assert p["total_bytes"] == pytest.approx(xla_total, rel=0.2), (p["total_bytes"], xla_total)
