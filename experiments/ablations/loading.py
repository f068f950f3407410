"""python -m trinity_jax ablate experiments/ablations/loading.py --workdir runs/ablations/loading

Sequence layout (SPEC §4): plain packing (documents concatenated in stream order and cut) vs
RSDB, the random sequential document buffer of Large's phase 3 (`data.loading=rsdb`, buffer
`data.rsdb_buffer` = 64 documents). Both read the same document stream and token cache.

Look for: BatchHet (max − mean of the 4 microbatch losses of a step; the report saw 4.2× less
with RSDB) and the step-to-step variance of the train loss (2.4× less), then val loss (the
validation batches are the same for both).
"""
from experiments.ablations._base import ablation

VARIANTS = {
    "packed": {},
    "rsdb": {"data.loading": "rsdb"},
}


def get_config(variant="packed"):
    return ablation(VARIANTS, variant)
