"""Data: tokenizer, corpora, token shards (tensorstore) and the grain pipeline (packing, RSDB,
phases, exact resume), plus SFT chat data. Entry points: ``build_data`` (pipeline.py) and
``build_sft`` (sft.py)."""
from trinity_jax.data.errors import DataError
from trinity_jax.data.phases import Phase, plan_phases, ramp_batch_size
from trinity_jax.data.pipeline import DataModule, TrainIterator, build_data
from trinity_jax.data.sft import SFTData, build_sft, encode_chat, format_chat
from trinity_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataError", "DataModule", "TrainIterator", "build_data", "Phase", "plan_phases",
           "ramp_batch_size", "Tokenizer", "load_tokenizer", "SFTData", "build_sft",
           "format_chat", "encode_chat"]
