"""Inference: KV cache, sampling, generation and probing (docs/contracts.md, DESIGN "Python API").

    from trinity_jax.inference import generate_tokens, generate_text, probe, Interventions
    from trinity_jax.inference.kv_cache import bytes_per_token, plan_rows

Most users go through `LoadedModel.generate / generate_tokens / probe` (trinity_jax.api).
"""
from trinity_jax.inference.decoder import Hooks, forward
from trinity_jax.inference.generate import generate_text, generate_tokens, stream_tokens
from trinity_jax.inference.kv_cache import KVCache, bytes_per_token, cache_bytes, init_cache, plan_rows
from trinity_jax.inference.probe import Interventions, ProbeResult, probe
from trinity_jax.inference.sampling import PREVIEW_DEFAULTS, filter_logits, sample, sampling_params

__all__ = ["forward", "Hooks", "KVCache", "init_cache", "bytes_per_token", "cache_bytes", "plan_rows",
           "generate_tokens", "generate_text", "stream_tokens", "probe", "Interventions", "ProbeResult",
           "PREVIEW_DEFAULTS", "filter_logits", "sample", "sampling_params"]
