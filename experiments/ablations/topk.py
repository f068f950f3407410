"""python -m trinity_jax ablate experiments/ablations/topk.py --workdir runs/ablations/topk

Routing granularity at equal active parameters: 64 experts, top-4 of width 64 vs top-8 of
width 32 (half). The shared expert is `moe_intermediate_size × num_shared_experts` wide, so the
k=8 variant takes 2 shared experts to keep it at width 64: active expert width per token is
4×64 + 64 = 8×32 + 2×32 = 320 in both (total expert parameters halve for k=8). Check with
`python -m trinity_jax plan --config experiments/ablations/topk.py:k8_of_64`.

Look for: val loss at equal active parameters, MaxVio (twice the token-slots spread over
the same 64 experts) and tokens/s (twice the token-slots to dispatch).
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "k4_of_64": {"model.num_experts": 64, "model.num_experts_per_tok": 4},
    "k8_of_64": {"model.num_experts": 64, "model.num_experts_per_tok": 8,
                 "model.moe_intermediate_size": 32, "model.num_shared_experts": 2},
}


def get_config(variant="k4_of_64"):
    return ablation(VARIANTS, variant)
