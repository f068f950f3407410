"""python -m trinity_jax ablate experiments/ablations/sandwich_norm.py --workdir runs/ablations/sandwich_norm

Sandwich norm (SPEC §1.3: pre- and depth-scaled post-norms around attention and the MLP) vs
pre-norm only (`model.sandwich_norm=False`: no post-attention / post-MLP norms).

Look for: grad_norm and loss spikes early in training (metrics.jsonl), then val loss.
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "sandwich": {},
    "pre_norm": {"model.sandwich_norm": False},
}


def get_config(variant="sandwich"):
    return ablation(VARIANTS, variant)
