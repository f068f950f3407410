"""Shared by the ablation groups (not an experiment: files starting with `_` are not run).

`short_tiny()` is `experiments/tiny.py` cut to a short pre-training run (no SFT, 2 validation
batches, 4 microbatches so BatchHet is measured) that reads one shared token cache, so the
corpus is tokenised once for every group and variant. `ablation(VARIANTS, name)` applies one
variant's field changes to it; a group file is then a docstring, a `VARIANTS` table and a
three-line `get_config(variant)`.
"""
from experiments import tiny
from trinity_jax.config import ConfigError

DATA_CACHE = "runs/ablations/_data"   # relative to the directory the command runs in


def short_tiny():
    """experiments/tiny.py for 120 steps (its three phases rescaled), no SFT, shared token cache."""
    c = tiny.get_config()
    c.train.steps = 120
    c.train.microbatches = 4           # BatchHet = max - mean of the 4 microbatch losses
    c.train.log_every = 5
    c.train.eval_batches = 2
    c.optim.warmup_steps = 20
    c.checkpoint.every = 40
    c.sft.steps = 0
    c.data.cache_dir = DATA_CACHE
    return c


def ablation(variants: dict, name: str, base=short_tiny):
    """`base()` with the fields of `variants[name]` ({"group.field": value}) changed."""
    if name not in variants:
        raise ConfigError(f"ablation variant {name!r}: allowed variants are {list(variants)}")
    c = base()
    for dotted, value in variants[name].items():
        group, field = dotted.split(".")
        if field not in c[group]:
            raise ConfigError(f"ablation variant {name!r}: unknown field {dotted}")
        c[group][field] = value
    return c
