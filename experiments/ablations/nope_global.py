"""python -m trinity_jax ablate experiments/ablations/nope_global.py --workdir runs/ablations/nope_global

Positional encoding of the global layers (SPEC §1.4): NoPE on global layers, RoPE on local
ones (Trinity) vs RoPE everywhere (`model.nope_global=False`). The tiny model has one global
layer (layer 3) and windows of 64 tokens at sequence length 256.

Look for: val loss at the training length; the difference Trinity relies on (context
extension through the NoPE layers) needs evaluation beyond the training length, which this
short run does not do.
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "nope_global": {},
    "rope_everywhere": {"model.nope_global": False},
}


def get_config(variant="nope_global"):
    return ablation(VARIANTS, variant)
