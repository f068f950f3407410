"""Generation: jitted prefill + cached decode, sampling, stop tokens, streaming text.

- `generate_tokens(model, ids [B, S], max_new_tokens, ...)` -> int [B, S + max_new_tokens]: the
  whole loop (prefill, then a `lax.while_loop` of single-token decode steps that stops early once
  every row has emitted a stop token) is one jitted call. Rows that stopped are filled with pad.
- `stream_tokens(...)`: the same prefill, then a jitted single-token step called from Python,
  yielding each step's tokens as they are produced.
- `generate_text(model, prompt, ...)`: text in, text out (or a generator of text pieces with
  `stream=True`); `chat=True` wraps the prompt in the Preview chat template
  (`trinity_jax.data.encode_chat`) and stops at `<|end|>`. Plain prompts start with `<bos>`
  (documents are `<bos> … <eos>` in training) and stop at `<eos>`.

All rows of a batch share one prompt length (the cache keeps a single length). Prompts are
right-padded to a multiple of `CACHE_BUCKET` (padding is never written to a local ring and is
overwritten in a global buffer before any query sees it) and the output and KV-cache lengths
are bucketed the same way, so prompts and lengths of similar size reuse compiled code. Expert / attention-gate interventions (`probe.Interventions`,
without residual patches) apply to generation too.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trinity_jax.config import ModelConfig
from trinity_jax.inference.decoder import Hooks, forward, prepare_decode
from trinity_jax.inference.kv_cache import init_cache
from trinity_jax.inference.sampling import PREVIEW_DEFAULTS, SamplingParams, sample, sampling_params

__all__ = ["generate_tokens", "stream_tokens", "generate_text", "get_tokenizer", "CACHE_BUCKET"]

CACHE_BUCKET = 64   # prompt, output and cache lengths are rounded up to multiples of this


# ----------------------------------------------------------------------------- jitted pieces

@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def _prefill(variables, tokens, valid_len, key, sp: SamplingParams, hooks: Hooks, *, cfg: ModelConfig,
             max_len: int):
    """Prompt [B, S_pad] (first valid_len real) -> (first new token [B], cache holding the prompt)."""
    cache = init_cache(cfg, tokens.shape[0], max_len)
    logits, cache, _ = forward(variables, cfg, tokens, cache=cache, hooks=hooks, last_only=True,
                               valid_len=valid_len)
    return sample(key, logits[:, -1], sp), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_step(variables, cache, token, key, sp: SamplingParams, hooks: Hooks, *, cfg: ModelConfig):
    """One token per row [B] at position cache.length -> (next token [B], cache, next key)."""
    logits, cache, _ = forward(variables, cfg, token[:, None], cache=cache, hooks=hooks)
    key, sub = jax.random.split(key)
    return sample(sub, logits[:, -1], sp), cache, key


@functools.partial(jax.jit, static_argnames=("cfg", "out_len", "max_len"))
def _generate_loop(variables, tokens, valid_len, max_new, key, sp: SamplingParams, stop_ids, pad_id,
                   hooks: Hooks, *, cfg: ModelConfig, out_len: int, max_len: int):
    """Prefill + while_loop of decode steps -> new tokens [B, out_len]; the first max_new are
    generated (pad after a row's stop token, and beyond max_new)."""
    b = tokens.shape[0]
    variables = prepare_decode(variables, cfg, b)       # once, outside the loop
    key, sub = jax.random.split(key)
    first, cache = _prefill(variables, tokens, valid_len, sub, sp, hooks, cfg=cfg, max_len=max_len)
    out = jnp.full((b, out_len), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(state):
        i, _, _, _, _, done = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, cache, prev, key, out, done = state
        logits, cache, _ = forward(variables, cfg, prev[:, None], cache=cache, hooks=hooks)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample(sub, logits[:, -1], sp))
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        return i + 1, cache, tok, key, out, done | jnp.isin(tok, stop_ids)

    state = (jnp.int32(1), cache, first, key, out, done)
    return jax.lax.while_loop(cond, body, state)[4]


_prepare = jax.jit(prepare_decode, static_argnames=("cfg", "batch"))


def _bucket(n: int) -> int:
    return -(-n // CACHE_BUCKET) * CACHE_BUCKET


def _padded(ids: np.ndarray, max_new: int, pad_id: int) -> tuple[np.ndarray, int, int]:
    """Prompt padded to a bucket, the bucketed output length and cache length (few compiles)."""
    s_pad = _bucket(ids.shape[1])
    tokens = np.full((ids.shape[0], s_pad), pad_id, np.int32)
    tokens[:, :ids.shape[1]] = ids
    return tokens, _bucket(max_new), _bucket(max(s_pad, ids.shape[1] + max_new))


# ----------------------------------------------------------------------------- checks

def _check_tokens(cfg: ModelConfig, tokens, max_new_tokens: int) -> np.ndarray:
    ids = np.asarray(tokens)
    if ids.ndim == 1:
        raise ValueError(f"token_ids: expected an int array [batch, seq], got shape {ids.shape} "
                         "(wrap a single prompt as [ids])")
    if ids.ndim != 2 or ids.shape[1] < 1 or ids.shape[0] < 1:
        raise ValueError(f"token_ids: expected a non-empty int array [batch, seq], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids: expected integer ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token_ids: ids must be in [0, vocab_size={cfg.vocab_size}), "
                         f"got range [{ids.min()}, {ids.max()}]")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be an integer >= 1")
    total = ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds model.max_position_embeddings={cfg.max_position_embeddings}")
    return ids.astype(np.int32)


def _hooks(model, interventions) -> Hooks:
    if interventions is None:
        return Hooks()
    from trinity_jax.inference.probe import as_interventions, build_hooks

    iv = as_interventions(interventions)
    if iv.patch_residual:
        raise ValueError("interventions.patch_residual: residual patches apply to probe() only, "
                         "not to generation")
    return build_hooks(model.config, iv, seq_len=None, batch=None)


def _stop_array(stop_tokens: Sequence[int] | None, vocab: int) -> jax.Array:
    stops = [int(t) for t in (stop_tokens or [])]
    for t in stops:
        if not 0 <= t < vocab:
            raise ValueError(f"stop_tokens: id {t} is not in [0, vocab_size={vocab})")
    return jnp.asarray(stops or [-1], jnp.int32)


def _device_variables(model) -> dict:
    return jax.tree_util.tree_map(jnp.asarray, model.variables)


# ----------------------------------------------------------------------------- token API

def generate_tokens(model, token_ids, max_new_tokens: int = 16, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    seed: int = 0, stop_tokens: Sequence[int] | None = None, interventions: Any = None
                    ) -> np.ndarray:
    """int [B, S] -> int [B, S + max_new_tokens]; greedy when temperature == 0.

    Without `stop_tokens` exactly max_new_tokens are generated; with them, a row that emits one
    keeps it and is padded (model.pad_token_id) afterwards.
    """
    cfg = model.config
    ids = _check_tokens(cfg, token_ids, max_new_tokens)
    sp = sampling_params(temperature, top_k, top_p, min_p)
    stops = _stop_array(stop_tokens, cfg.vocab_size)
    hooks = _hooks(model, interventions)
    tokens, out_len, max_len = _padded(ids, int(max_new_tokens), cfg.pad_token_id)
    new = _generate_loop(_device_variables(model), jnp.asarray(tokens), jnp.int32(ids.shape[1]),
                         jnp.int32(max_new_tokens), jax.random.key(seed), sp, stops, jnp.int32(cfg.pad_token_id),
                         hooks, cfg=cfg, out_len=out_len, max_len=max_len)
    return np.concatenate([ids, np.asarray(new)[:, :max_new_tokens]], axis=1)


def stream_tokens(model, token_ids, max_new_tokens: int = 16, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  seed: int = 0, stop_tokens: Sequence[int] | None = None, interventions: Any = None
                  ) -> Iterator[np.ndarray]:
    """Like generate_tokens, but yields each step's new tokens [B] as soon as they exist; stops
    when every row has produced a stop token (rows that stopped yield pad)."""
    cfg = model.config
    ids = _check_tokens(cfg, token_ids, max_new_tokens)
    sp = sampling_params(temperature, top_k, top_p, min_p)
    stops = set(int(t) for t in np.asarray(_stop_array(stop_tokens, cfg.vocab_size)))
    hooks = _hooks(model, interventions)
    return _stream(model, ids, int(max_new_tokens), sp, stops, hooks, seed)


def _stream(model, ids, max_new, sp, stops, hooks, seed) -> Iterator[np.ndarray]:
    cfg = model.config
    variables = _prepare(_device_variables(model), cfg=cfg, batch=ids.shape[0])
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    tokens, _, max_len = _padded(ids, max_new, cfg.pad_token_id)
    tok, cache = _prefill(variables, jnp.asarray(tokens), jnp.int32(ids.shape[1]), sub, sp, hooks, cfg=cfg,
                          max_len=max_len)
    done = np.zeros(ids.shape[0], bool)
    for i in range(max_new):
        nxt = None
        if i + 1 < max_new:     # dispatch the next step first: it runs while this token goes to the host
            nxt, cache, key = _decode_step(variables, cache, tok, key, sp, hooks, cfg=cfg)
        host = np.where(done, cfg.pad_token_id, np.asarray(tok))
        yield host
        done |= np.isin(host, list(stops))
        if done.all():
            return
        tok = nxt


# ----------------------------------------------------------------------------- text API

def get_tokenizer(model):
    """The model's tokenizer as a `trinity_jax.data.Tokenizer` (wrapping a raw `tokenizers` one)."""
    from trinity_jax.data.tokenizer import Tokenizer

    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.path or 'this model'}: no tokenizer (tokenizer.json) to encode text; "
                         "use generate_tokens with token ids")
    if isinstance(tok, Tokenizer):
        return tok
    cfg = model.config
    return Tokenizer(tok, model.path or "", pad_id=cfg.pad_token_id, bos_id=cfg.bos_token_id,
                     eos_id=cfg.eos_token_id)


def encode_prompt(model, prompt, chat: bool) -> tuple[np.ndarray, list[int]]:
    """Prompt -> (ids [S], stop ids). chat: a string (one user turn) or a list of messages."""
    from trinity_jax.data.sft import encode_chat

    tok = get_tokenizer(model)
    cfg = model.config
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
        return np.asarray(ids, np.int32), [cfg.eos_token_id, tok.token_to_id("<|end|>")]
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a string (or a list of messages with chat=True), got {type(prompt).__name__}")
    return np.asarray([cfg.bos_token_id] + tok.encode(prompt), np.int32), [cfg.eos_token_id]


def generate_text(model, prompt, max_new_tokens: int = 64, *, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  chat: bool = False, stream: bool = False, seed: int = 0, interventions: Any = None):
    """Text -> generated text (without the prompt and the stop token); with stream=True a
    generator of text pieces. Unset sampling settings take the Preview defaults (SPEC §5)."""
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    settings = {k: (PREVIEW_DEFAULTS[k] if v is None else v) for k, v in settings.items()}
    ids, stops = encode_prompt(model, prompt, chat)
    tok = get_tokenizer(model)
    if stream:
        steps = stream_tokens(model, ids[None], max_new_tokens, seed=seed, stop_tokens=stops,
                              interventions=interventions, **settings)
        return _stream_text(tok, steps, stops)
    out = generate_tokens(model, ids[None], max_new_tokens, seed=seed, stop_tokens=stops,
                          interventions=interventions, **settings)[0, len(ids):]
    new = []
    for t in out.tolist():
        if t in stops:
            break
        new.append(t)
    return tok.decode(new)


def _stream_text(tok, steps: Iterator[np.ndarray], stops: list[int]) -> Iterator[str]:
    """Token steps -> text pieces; holds back a piece while it ends inside a UTF-8 sequence."""
    new, emitted = [], ""
    for step in steps:
        t = int(step[0])
        if t in stops:
            break
        new.append(t)
        text = tok.decode(new)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
        emitted = text
    text = tok.decode(new)
    if len(text) > len(emitted):
        yield text[len(emitted):]
