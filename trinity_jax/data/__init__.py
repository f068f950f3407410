"""Data: tokenizer, corpora, token shards (tensorstore) and the grain pipeline (packing, RSDB,
phases, exact resume), plus SFT chat data. Entry point: ``build_data`` (see pipeline.py)."""
from trinity_jax.data.errors import DataError
from trinity_jax.data.phases import Phase, plan_phases, ramp_batch_size
from trinity_jax.data.pipeline import DataModule, TrainIterator, build_data
from trinity_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataError", "DataModule", "TrainIterator", "build_data", "Phase", "plan_phases",
           "ramp_batch_size", "Tokenizer", "load_tokenizer", "build_sft", "format_chat",
           "encode_chat"]


def __getattr__(name):   # sft is imported lazily (it parses the stdlib with ast)
    if name in ("build_sft", "format_chat", "encode_chat"):
        from trinity_jax.data import sft
        return getattr(sft, name)
    raise AttributeError(name)
