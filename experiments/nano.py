"""Trinity Nano (6.1B total / 1.0B active parameters; SPEC §2), published values.

    python -m trinity_jax plan --config experiments/nano.py
    python -m trinity_jax train --config experiments/nano.py --workdir runs/nano   # on a GPU cluster

`plan` prints the parameter/FLOP counts (expect 6.1B / 1.0B) and, with --mesh, per-device
memory and step-time bounds. Training at this size needs a multi-host GPU mesh (docs/distributed.md).
"""
from trinity_jax.config import default_config_dict


def get_config():
    c = default_config_dict()
    m = c.model
    m.vocab_size = 200192
    m.hidden_size = 1024
    m.intermediate_size = 3072
    m.moe_intermediate_size = 256
    m.num_hidden_layers = 56
    m.num_dense_layers = 2
    m.num_attention_heads = 8
    m.num_key_value_heads = 2
    m.head_dim = 128
    m.num_experts = 128
    m.num_experts_per_tok = 8
    m.num_shared_experts = 1
    m.route_scale = 2.826
    m.sliding_window = 2048
    m.global_attn_every_n_layers = 4
    m.max_position_embeddings = 4096
    m.rope_theta = 10000.0
    m.rms_norm_eps = 1e-5
    m.mup_enabled = True
    m.dtype = "bfloat16"
    m.remat_policy = "save_dots_except_moe"
    c.optim.muon_lr = 0.001
    c.optim.adam_lr = 0.0003
    c.optim.warmup_steps = 2000
    c.optim.decay = "linear_to_zero"
    c.optim.decay_final_fraction = 0.0
    c.train.seq_len = 4096
    c.train.batch_size = 4096
    c.train.balance = "sign"
    c.train.batch_ramp = ((2000000000000, 8192),)
    c.train.steps = 596046
    c.mesh.replica = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 8
    c.data.phases = [
        {"name": "phase1", "tokens": 7000000000000, "mixture": {"stdlib": 1.0}},
        {"name": "phase2", "tokens": 1800000000000, "mixture": {"stdlib": 1.0}},
        {"name": "phase3", "tokens": 1200000000000, "mixture": {"stdlib": 1.0}},
    ]
    return c
