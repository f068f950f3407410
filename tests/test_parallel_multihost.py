"""Multi-process run: 2 processes × 4 CPU devices on localhost (gloo) == 1 process × 8 devices.

Each process initialises ``jax.distributed`` through ``parallel.distributed.initialize``
(TRINITY_* environment variables, as a launcher would set them), builds the same
replica×fsdp×expert×tensor = 1×2×4×1 mesh over the 8 global devices (fsdp crosses the two
processes, experts stay inside one), loads only its rows of each synthetic global batch
(``process_batch_slice`` + ``make_global_batch``) and runs 3 real train steps. The losses
must equal those of the same 3 steps in one process with 8 devices (rtol 1e-5).

This file is also the worker: ``python tests/test_parallel_multihost.py worker OUT.json``.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env

MODEL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_hidden_layers=2, num_dense_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=32, sliding_window=4, global_attn_every_n_layers=2,
             moe_impl="block_sparse")
B, S, STEPS = 8, 16, 3
MESH = dict(replica=1, fsdp=2, expert=4, tensor=1)


def _global_batch(step):
    rng = np.random.default_rng(100 + step)
    inputs = rng.integers(3, MODEL["vocab_size"], (B, S + 1)).astype(np.int32)
    return dict(inputs=inputs[:, :-1], targets=inputs[:, 1:],
                positions=np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
                segment_ids=np.ones((B, S), np.int32), loss_mask=np.ones((B, S), np.float32))


def run_steps():
    """3 train steps on the 8 global devices; returns the losses (same code in both set-ups)."""
    import jax
    from trinity_jax.config import ExperimentConfig, MeshConfig, OptimConfig, TrainConfig, model_config
    from trinity_jax.model import Transformer, abstract_variables
    from trinity_jax.model.transformer import init_boxed
    from trinity_jax.parallel import distributed, rules
    from trinity_jax.parallel.mesh import make_mesh, validate_mesh_for
    from trinity_jax.train import step as step_lib
    from trinity_jax.train.optimizer import make_optimizer
    from trinity_jax.train.schedules import group_schedules

    cfg = ExperimentConfig(model=model_config(**MODEL), mesh=MeshConfig(**MESH),
                           optim=OptimConfig(warmup_steps=0, decay="none", ns_steps=2),
                           train=TrainConfig(batch_size=B, seq_len=S))
    validate_mesh_for(cfg, jax.device_count())
    mesh = make_mesh(cfg.mesh)
    rng = np.random.default_rng(1)
    host = jax.tree_util.tree_map_with_path(     # random weights; norm gains around 1
        lambda p, a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32)
        + np.float32("scale" in jax.tree_util.keystr(p)), abstract_variables(cfg.model))
    shard = rules.param_shardings(jax.eval_shape(lambda r: init_boxed(cfg.model, r),
                                                 jax.random.key(0)), mesh)
    variables = jax.tree.map(lambda h, s: jax.make_array_from_callback(h.shape, s, lambda i: h[i]),
                             host, shard)
    model = Transformer(cfg.model)
    optimizer = make_optimizer(cfg.optim, host["params"], group_schedules(cfg.optim, total_steps=10))
    st_sh = step_lib.state_shardings(shard["params"], shard["balance"], optimizer, host["params"],
                                     rules.replicated(mesh))
    state = jax.jit(lambda v: step_lib.init_state(v, optimizer, jax.random.key(0)),
                    out_shardings=st_sh)(variables)
    step = step_lib.jit_train_step(step_lib.make_train_step(cfg, model, optimizer), st_sh,
                                   rules.batch_sharding(mesh))
    rows = distributed.process_batch_slice(B, mesh)
    losses = []
    with rules.use_mesh(mesh):
        for i in range(STEPS):
            local = {k: v[rows] for k, v in _global_batch(i).items()}
            state, metrics = step(state, distributed.make_global_batch(local, mesh))
            losses.append(float(metrics["loss"]))
    return losses, state, cfg


def _worker(out_path):
    from trinity_jax.parallel import distributed
    spec = distributed.initialize(platform="cpu")
    import jax
    assert jax.process_count() == spec.num_processes == 2 and jax.local_device_count() == 4
    losses, state, cfg = run_steps()
    # the variant callback of a multi-process run: every process writes its shards (it used to
    # be process 0 alone, whose device_get of arrays spanning both processes raised)
    from types import SimpleNamespace

    from trinity_jax.recipe import VariantCallback
    run = SimpleNamespace(state=state, data=SimpleNamespace(train=None), is_main=jax.process_index() == 0)
    VariantCallback(os.path.dirname(out_path), cfg, None, "base", step=None, log=lambda *a: None).export(run, STEPS)
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump(losses, f)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    portpicker = pytest.importorskip("portpicker")
    port = portpicker.pick_unused_port()
    out = tmp_path / "losses.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for pid in range(2):
        env = subprocess_env(None, TRINITY_COORDINATOR=f"127.0.0.1:{port}", TRINITY_NUM_PROCESSES="2",
                             TRINITY_PROCESS_ID=str(pid), TRINITY_LOCAL_DEVICE_COUNT="4")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(out)],
                                      env=env, cwd=root, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    multi = json.loads(out.read_text())
    single, state, _ = run_steps()             # this pytest process: 1 process × 8 devices
    assert len(multi) == STEPS and np.all(np.isfinite(multi))
    np.testing.assert_allclose(multi, single, rtol=1e-5)
    # the 2-process run's variant loads here (one process, other devices) and holds its params:
    # the single-process params rounded to the variant's bf16, to a bf16 step (the two runs'
    # params differ by float noise, which can cross a rounding boundary)
    import jax
    import trinity_jax as tj
    variant = tj.load(str(tmp_path / "variants" / "base"))
    assert variant.metadata["step"] == STEPS
    for got, want in zip(jax.tree.leaves(variant.params), jax.tree.leaves(jax.device_get(state.params))):
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)


def test_resolve_args_env_and_slurm():
    from trinity_jax.config import ConfigError
    from trinity_jax.parallel.distributed import expand_slurm_nodelist, resolve
    assert expand_slurm_nodelist("gpu[001-003,7],login5") == ["gpu001", "gpu002", "gpu003",
                                                                "gpu7", "login5"]
    s = resolve(env={"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NODELIST": "n[08-11]"})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("n08:12355", 4, 2, "slurm")
    env = {"TRINITY_COORDINATOR": "h:1", "TRINITY_NUM_PROCESSES": "2", "TRINITY_PROCESS_ID": "1",
           "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_NODELIST": "x1"}
    s = resolve(env=env)                                   # TRINITY_* wins over SLURM
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("h:1", 2, 1)
    s = resolve("c:9", 3, 0, env=env)                      # arguments win over both
    assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("c:9", 3, 0, "args")
    assert not resolve(env={}).multi_process
    with pytest.raises(ConfigError, match="needs a coordinator"):
        resolve(num_processes=2, process_id=0, env={})
    with pytest.raises(ConfigError, match="process_id=2: must be in"):
        resolve("c:9", 2, 2, env={})
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        resolve("c", 2, 0, env={})


def test_one_slurm_task_per_node_owns_every_gpu_of_its_node():
    """jax's SLURM detection gives each process the GPU of its SLURM_LOCALID: right for one
    task per GPU, but with one task per node (launch_slurm.sh) each node's process got GPU 0
    alone (256 nodes would build a 256-GPU mesh, not 2048); there it is switched off."""
    from trinity_jax.parallel.distributed import _device_ids_kwargs
    node = {"SLURM_PROCID": "3", "SLURM_NTASKS": "256", "SLURM_LOCALID": "0"}
    assert _device_ids_kwargs({**node, "SLURM_NTASKS_PER_NODE": "1"}) == {"cluster_detection_method": "deactivate"}
    assert _device_ids_kwargs({**node, "SLURM_NNODES": "256"}) == {"cluster_detection_method": "deactivate"}
    assert _device_ids_kwargs({**node, "SLURM_NTASKS_PER_NODE": "8"}) == {}   # one task per GPU
    assert _device_ids_kwargs({**node, "SLURM_NNODES": "32"}) == {}
    assert _device_ids_kwargs({}) == {}                                      # not under SLURM


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
