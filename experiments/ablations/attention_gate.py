"""python -m trinity_jax ablate experiments/ablations/attention_gate.py --workdir runs/ablations/attention_gate

Gated attention on/off (SPEC §1.4): `o = Wo(attn * sigmoid(Wg x))` vs plain `o = Wo(attn)`
(`model.attention_gate`; the gate projection disappears with it).

Look for: val loss, the smoothness of the loss curve and grad_norm; logit_max in
metrics.jsonl as an early sign of instability.
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "gate": {},
    "no_gate": {"model.attention_gate": False},
}


def get_config(variant="gate"):
    return ablation(VARIANTS, variant)
