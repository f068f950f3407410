"""python -m trinity_jax ablate experiments/ablations/balancing.py --workdir runs/ablations/balancing

Router balancing (SPEC §4): SMEBU (Large) vs the sign rule (Nano/Mini) vs no bias update, and
SMEBU without the sequence-wise balance loss (α = 0). One variant alone:
`python -m trinity_jax train --config experiments/ablations/balancing.py:sign --workdir DIR`.

Look for: MaxVio (final and over steps) — with `none` only the tiny α = 1e-4 loss pushes
towards balance, so expect the highest MaxVio; the bias rules should pull it down. Train/val
loss should differ little at this scale. docs/results/balancing/ has a measured run.
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "smebu": {},
    "sign": {"train.balance": "sign"},
    "none": {"train.balance": "none"},
    "no_seq_loss": {"train.balance_loss_weight": 0.0},
}


def get_config(variant="smebu"):
    return ablation(VARIANTS, variant)
