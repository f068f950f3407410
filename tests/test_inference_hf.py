"""Greedy generation equals transformers' `generate(do_sample=False)` with the same weights
(exported with `tj.export_hf`), past the sliding window, batch 2; and the CLI streams it."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import trinity_jax as tj  # noqa: E402
from trinity_jax.config import model_config  # noqa: E402
from trinity_jax.model import abstract_variables  # noqa: E402

CFG = dict(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
           max_position_embeddings=128, num_hidden_layers=4, num_dense_layers=1, global_attn_every_n_layers=2,
           num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
           sliding_window=5, route_scale=2.826)
TEXT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)
'''


def _random_model(cfg, seed=0, std=0.15) -> tj.LoadedModel:
    """Weights re-randomised with a larger std than the init (sharper, tie-free argmaxes)."""
    rng = np.random.default_rng(seed)
    v = jax.tree_util.tree_map(lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32)
                               if len(a.shape) > 1 else (1 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                               abstract_variables(cfg))
    v["balance"] = jax.tree_util.tree_map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                                          v["balance"])
    return tj.LoadedModel(cfg, v)


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from trinity_jax.data.tokenizer import train_bpe

    return train_bpe([TEXT] * 4, CFG["vocab_size"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = _random_model(model_config(**CFG))
    m.tokenizer = _tokenizer()
    out = tj.export_hf(m, str(tmp_path_factory.mktemp("hf") / "model"))
    return m, out


@pytest.mark.slow
def test_greedy_equals_transformers_generate(exported):
    ours, out = exported
    hf = transformers.AfmoeForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    prompt = np.random.default_rng(1).integers(7, CFG["vocab_size"], (2, 6))
    with torch.no_grad():
        want = hf.generate(torch.as_tensor(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0).numpy()
    got = ours.generate_tokens(prompt, 20)           # 26 positions: the window-5 rings wrap 5 times
    np.testing.assert_array_equal(got, want)
    loaded = tj.load(out)                             # and after a round trip through the HF directory
    np.testing.assert_array_equal(loaded.generate_tokens(prompt, 20), want)


@pytest.mark.slow
def test_text_generation_and_cli_streaming(exported, capsys):
    from trinity_jax.cli import main

    _, out = exported
    m = tj.load(out)                                  # raw tokenizers.Tokenizer from tokenizer.json
    text = m.generate("def fib", max_new_tokens=12, temperature=0.0)
    pieces = list(m.generate("def fib", max_new_tokens=12, temperature=0.0, stream=True))
    assert "".join(pieces) == text and len(pieces) >= 2
    assert main(["generate", "--model", out, "--prompt", "def fib", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text + "\n"
    # chat: the prompt goes through the chat template; sampling defaults are Preview's
    assert main(["generate", "--model", out, "--prompt", "What is a stack?", "--chat",
                 "--max-new-tokens", "6"]) == 0
    assert isinstance(m.generate("What is a stack?", max_new_tokens=6, chat=True), str)


def test_chat_prompt_is_the_chat_template(exported):
    from trinity_jax.data import encode_chat
    from trinity_jax.inference.generate import encode_prompt

    m, _ = exported
    ids, stops = encode_prompt(m, "hi", chat=True)
    want, _ = encode_chat(m.tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    np.testing.assert_array_equal(ids, want)
    assert stops == [m.config.eos_token_id, m.tokenizer.token_to_id("<|end|>")]
    ids, stops = encode_prompt(m, "hi", chat=False)
    assert ids[0] == m.config.bos_token_id and stops == [m.config.eos_token_id]
