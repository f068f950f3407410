"""python -m trinity_jax ablate experiments/ablations/dense_layers.py --workdir runs/ablations/dense_layers

Leading dense layers (SPEC §1.2): 1 dense + 3 MoE layers (tiny's default) vs 3 dense + 1 MoE
(`model.num_dense_layers=3`). The tiny model has 4 layers, so the second variant keeps a single
MoE layer; active parameters per token change too (dense MLP width 384 vs 4×64 routed + 64
shared), see `python -m trinity_jax plan --config experiments/ablations/dense_layers.py:dense3`.

Look for: val loss per token and tokens/s; MaxVio over fewer MoE layers.
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "dense1": {},
    "dense3": {"model.num_dense_layers": 3},
}


def get_config(variant="dense1"):
    return ablation(VARIANTS, variant)
