"""Trinity Large (398.6B total / 13.4B active parameters; SPEC §2), published values.

    python -m trinity_jax plan --config experiments/large.py
    python -m trinity_jax train --config experiments/large.py --workdir runs/large   # on a GPU cluster

`plan` prints the parameter/FLOP counts (expect 398.6B / 13.4B) and, with --mesh, per-device
memory and step-time bounds. Training at this size needs a multi-host GPU mesh (docs/distributed.md).
"""
from trinity_jax.config import default_config_dict


def get_config():
    c = default_config_dict()
    m = c.model
    m.vocab_size = 200192
    m.hidden_size = 3072
    m.intermediate_size = 12288
    m.moe_intermediate_size = 3072
    m.num_hidden_layers = 60
    m.num_dense_layers = 6
    m.num_attention_heads = 48
    m.num_key_value_heads = 8
    m.head_dim = 128
    m.num_experts = 256
    m.num_experts_per_tok = 4
    m.num_shared_experts = 1
    m.route_scale = 2.448
    m.sliding_window = 4096
    m.global_attn_every_n_layers = 4
    m.max_position_embeddings = 8192
    m.rope_theta = 10000.0
    m.rms_norm_eps = 1e-5
    m.mup_enabled = True
    m.dtype = "bfloat16"
    m.remat_policy = "save_dots_except_moe"
    c.optim.muon_lr = 0.0008
    c.optim.adam_lr = 0.0002
    c.optim.warmup_steps = 2000
    c.optim.decay = "cosine_to_fraction"
    c.optim.decay_final_fraction = 0.1
    c.train.seq_len = 8192
    c.train.loss_chunk_size = 256   # loss fwd+bwd peak 0.07x the full fp32 logits (0.26x at 1024)
    c.train.batch_size = 12288
    c.train.balance = "smebu"
    c.train.batch_ramp = ((4900000000000, 16384),)
    c.train.steps = 168383
    c.mesh.replica = -1   # HSDP: FSDP groups of 16 x 8 (expert) = 128 devices, replicated
    c.mesh.fsdp = 16
    c.mesh.expert = 8
    c.data.phases = [
        {"name": "phase1", "tokens": 11000000000000, "mixture": {"stdlib": 1.0}},
        {"name": "phase2", "tokens": 3400000000000, "mixture": {"stdlib": 1.0}},
        {"name": "phase3", "tokens": 2550000000000, "mixture": {"stdlib": 1.0}},
    ]
    return c
