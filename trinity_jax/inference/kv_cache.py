"""KV cache per layer type (SPEC §1.2): global layers keep every position, local layers a ring buffer.

A global (full-attention) layer stores keys/values for every position up to the cache length
`[batch, max_len, kv_heads, head_dim]`; a local (sliding-window) layer only ever needs the last
`sliding_window` positions, so it stores a ring buffer `[batch, min(window, max_len), kv_heads,
head_dim]` where position p lives in slot p % size. All rows of a batch share one length.

`bytes_per_token` / `plan_rows` give the memory the cache costs per token (for `plan`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trinity_jax.config import ModelConfig

__all__ = ["KVCache", "init_cache", "ring_size", "ring_positions", "bytes_per_token", "cache_bytes",
           "plan_rows", "format_bytes"]


class KVCache(NamedTuple):
    """Per-layer keys/values (tuples of length num_hidden_layers) and the number of positions written."""

    k: tuple        # layer i: [batch, max_len | ring, kv_heads, head_dim]
    v: tuple
    length: jax.Array  # int32 scalar: positions already in the cache


def ring_size(cfg: ModelConfig, max_len: int) -> int:
    """Slots of a local layer's ring buffer: the window, or fewer if the cache is shorter."""
    return int(min(cfg.sliding_window, max_len))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions (zeros; dtype = compute dtype)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shapes = [(batch, max_len if cfg.is_global_layer(i) else ring_size(cfg, max_len),
               cfg.num_key_value_heads, cfg.head_dim) for i in range(cfg.num_hidden_layers)]
    return KVCache(tuple(jnp.zeros(s, dtype) for s in shapes), tuple(jnp.zeros(s, dtype) for s in shapes),
                   jnp.zeros((), jnp.int32))


def ring_positions(length: jax.Array, size: int) -> jax.Array:
    """Absolute position held by each ring slot j after `length` positions were written in order
    (p ≡ j mod size, the latest p < length); negative where the slot is still empty. [size] int32."""
    j = jnp.arange(size, dtype=jnp.int32)
    n = jnp.asarray(length, jnp.int32)
    return n - 1 - jnp.mod(n - 1 - j, size)


# ----------------------------------------------------------------------------- memory accounting

def bytes_per_token(cfg: ModelConfig, dtype="bfloat16") -> dict[str, int]:
    """KV-cache bytes one token adds per sequence: {'global', 'local', 'window'}.

    Keys + values: 2 · kv_heads · head_dim · itemsize per layer. Local layers stop growing after
    `window` tokens (the ring buffer is full); global layers grow with every token.
    """
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * np.dtype(jnp.dtype(dtype)).itemsize
    n_global = sum(cfg.is_global_layer(i) for i in range(cfg.num_hidden_layers))
    n_local = cfg.num_hidden_layers - n_global
    return {"global": n_global * per_layer, "local": n_local * per_layer, "window": cfg.sliding_window,
            "global_layers": n_global, "local_layers": n_local}


def cache_bytes(cfg: ModelConfig, seq_len: int, batch: int = 1, dtype="bfloat16") -> int:
    """Total KV-cache bytes for `batch` sequences of `seq_len` tokens."""
    b = bytes_per_token(cfg, dtype)
    return batch * (b["global"] * seq_len + b["local"] * min(seq_len, cfg.sliding_window))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plan_rows(cfg: ModelConfig, seq_len: int, dtype="bfloat16") -> list[tuple[str, str]]:
    """Rows for `trinity plan`: KV cache per token (global vs local) and per sequence of seq_len."""
    b = bytes_per_token(cfg, dtype)
    name = jnp.dtype(dtype).name
    layers = lambda n: f"{n} layer{'s' if n != 1 else ''}"  # noqa: E731
    return [(f"KV cache / token ({name})",
             f"{format_bytes(b['global'])} global ({layers(b['global_layers'])}, every token) + "
             f"{format_bytes(b['local'])} local ({layers(b['local_layers'])}, first {b['window']} tokens only)"),
            (f"KV cache / sequence of {seq_len}", format_bytes(cache_bytes(cfg, seq_len, 1, dtype)))]
