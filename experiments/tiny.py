"""Tiny Trinity: runs on 2 CPU cores in minutes; the quickstart's main job.

    python -m trinity_jax train --config experiments/tiny.py --workdir runs/tiny

Expect: the loss falls from ~ln(vocab)=8.3 to well below the corpus unigram entropy within a few
hundred steps, MaxVio stays below ~0.5 with SMEBU, and variants/{truebase,base,preview} appear.
Shape: d=128, 4 layers (1 dense + 3 MoE; the 4th is global), 16 experts top-4 + 1 shared.
"""
from trinity_jax.config import default_config_dict


def get_config():
    c = default_config_dict()
    m = c.model
    m.vocab_size = 4096
    m.hidden_size = 128
    m.intermediate_size = 384
    m.moe_intermediate_size = 64
    m.num_hidden_layers = 4
    m.num_dense_layers = 1
    m.num_attention_heads = 4
    m.num_key_value_heads = 2
    m.head_dim = 32
    m.num_experts = 16
    m.num_experts_per_tok = 4
    m.num_shared_experts = 1
    m.route_scale = 2.826
    m.sliding_window = 64
    m.global_attn_every_n_layers = 4
    m.max_position_embeddings = 1024
    c.optim.warmup_steps = 30
    c.optim.muon_lr = 0.01
    c.optim.adam_lr = 3e-3
    c.optim.decay = "linear_to_zero"
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.log_every = 10
    c.train.eval_batches = 8
    c.checkpoint.every = 100
    c.sft.steps = 60
    c.sft.warmup_steps = 6
    c.sft.batch_size = 16
    c.data.sources = {"lib": "stdlib:lib", "tests": "stdlib:tests", "docs": "stdlib:docs"}
    c.data.phases = [
        {"name": "phase1", "tokens": 11_000_000, "mixture": {"lib": 0.8, "tests": 0.2}},
        {"name": "phase2", "tokens": 3_400_000, "mixture": {"lib": 0.5, "tests": 0.3, "docs": 0.2}},
        {"name": "phase3", "tokens": 2_550_000, "mixture": {"lib": 0.4, "tests": 0.2, "docs": 0.4}},
    ]
    return c
