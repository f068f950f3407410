"""Notebook-facing API: `tj.load(dir)` -> LoadedModel, `tj.export_hf(model, out_dir)`."""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trinity_jax.config import ModelConfig
from trinity_jax.model import Transformer


class LoadedModel:
    """A model config + variables, with jitted entry points for probing and generation."""

    def __init__(self, config: ModelConfig, variables: dict, tokenizer: Any = None,
                 metadata: dict | None = None, path: str | None = None):
        self.config = config
        self.variables = variables
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})
        self.path = path
        self.module = Transformer(config)

    @property
    def params(self) -> dict:
        return self.variables["params"]

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda v, t, p, s: self.module.apply(v, t, positions=p, segment_ids=s)[0])

    def logits(self, tokens, positions=None, segment_ids=None) -> np.ndarray:
        """int [B, S] -> float32 [B, S, V] (full forward, no cache).

        For packed rows (several documents per row, as the data pipeline's batches are) pass
        the batch's ``positions`` and ``segment_ids`` [B, S]: each document then attends only
        to itself from position 0, as in training. Default: one document per row (positions
        0..S-1)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected an int array [batch, seq], got shape {tokens.shape}")
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"tokens: ids must be in [0, vocab_size={self.config.vocab_size})")
        b, s = tokens.shape
        extra = {}
        for name, value, default in (("positions", positions, jnp.arange(s, dtype=jnp.int32)),
                                     ("segment_ids", segment_ids, jnp.ones((s,), jnp.int32))):
            value = jnp.broadcast_to(default, (b, s)) if value is None else jnp.asarray(value, jnp.int32)
            if value.shape != (b, s):
                raise ValueError(f"{name}: expected shape {(b, s)} like tokens, got {value.shape}")
            extra[name] = value
        return np.asarray(self._logits_fn(self.variables, tokens, extra["positions"], extra["segment_ids"]))

    # ------------------------------------------------------------------ generation and probing
    def generate(self, prompt, max_new_tokens: int = 64, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 chat: bool = False, stream: bool = False, seed: int = 0, interventions: Any = None):
        """Text -> generated text (a generator of pieces with stream=True).

        Unset sampling settings take the Preview defaults (temperature 0.15, top_k 50, top_p 0.75,
        min_p 0.06; SPEC §5); temperature=0 is greedy. chat=True wraps `prompt` (a string or a
        list of {"role", "content"} messages) in the chat template and stops at <|end|>;
        otherwise the prompt is prefixed with <bos> and generation stops at <eos>.
        """
        from trinity_jax.inference.generate import generate_text

        return generate_text(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, chat=chat, stream=stream, seed=seed, interventions=interventions)

    def generate_tokens(self, token_ids, max_new_tokens: int = 16, *, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                        seed: int = 0, stop_tokens=None, interventions: Any = None) -> np.ndarray:
        """int [B, S] -> int [B, S + max_new_tokens] (KV-cached; temperature 0.0 = greedy).

        With `stop_tokens`, a row that emits one is padded with pad_token_id afterwards.
        """
        from trinity_jax.inference.generate import generate_tokens

        return generate_tokens(self, token_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, min_p=min_p, seed=seed, stop_tokens=stop_tokens,
                               interventions=interventions)

    def probe(self, tokens, *, interventions: Any = None, logit_lens: bool = True):
        """Residual stream, attention gates, router scores/choices, expert_bias and a logit lens per
        layer, optionally under interventions (see `trinity_jax.inference.probe`)."""
        from trinity_jax.inference.probe import probe

        return probe(self, tokens, interventions=interventions, logit_lens=logit_lens)

    def __repr__(self) -> str:
        c = self.config
        return (f"LoadedModel(d={c.hidden_size}, layers={c.num_hidden_layers}, experts={c.num_experts}, "
                f"k={c.num_experts_per_tok}, vocab={c.vocab_size}, path={self.path!r})")


def load(path: str) -> LoadedModel:
    """Load our variant directory or a Hugging Face AFMoE directory (auto-detected)."""
    from trinity_jax.checkpoint import hf

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if hf.is_hf_dir(path):
        cfg, variables = hf.load_hf_dir(path)
        variables = jax.tree_util.tree_map(jnp.asarray, variables)
        tok = None
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from trinity_jax.data.tokenizer import load_tokenizer
            tok = load_tokenizer(os.path.join(path, "tokenizer.json"), cfg.vocab_size, pad_id=cfg.pad_token_id,
                                 bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)   # the config's ids
        return LoadedModel(cfg, variables, tok, {"format": "huggingface"}, path)
    try:
        from trinity_jax.checkpoint import variants
    except ImportError:
        variants = None
    if variants is not None and variants.is_variant_dir(path):
        return variants.load_variant(path)
    raise ValueError(f"{path}: neither a Hugging Face AFMoE directory (config.json with model_type 'afmoe') "
                     "nor a trinity_jax variant directory")


def export_hf(model: LoadedModel, out_dir: str) -> str:
    """Write `model` as a Hugging Face AFMoE directory (loadable by AfmoeForCausalLM.from_pretrained)."""
    from trinity_jax.checkpoint import hf

    return hf.save_hf_dir(model.config, jax.device_get(model.variables), out_dir, tokenizer=model.tokenizer)
