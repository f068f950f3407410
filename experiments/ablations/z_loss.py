"""python -m trinity_jax ablate experiments/ablations/z_loss.py --workdir runs/ablations/z_loss

z-loss on/off (SPEC §4): `w · logsumexp(logits)²` per token with w = 1e-6 (Trinity) vs w = 0.

Look for: logit_max and logit_mean over steps in metrics.jsonl (the z-loss keeps the
log-partition near 0), then val loss; at 1e-6 and this length the difference is small.
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "z_loss": {},
    "no_z_loss": {"train.z_loss_weight": 0.0},
}


def get_config(variant="z_loss"):
    return ablation(VARIANTS, variant)
