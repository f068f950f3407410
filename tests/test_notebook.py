"""docs/probing_truebase.ipynb executes headless (nbclient) so that it cannot rot.

Two runs: `fallback` points the run directory at an empty folder (a random tiny model + a BPE
trained on a few stdlib modules); `variants` gives it truebase/base/preview directories (tiny
random models exported as Hugging Face dirs) so that loading and the variant comparison run.
Every plot cell runs and writes its PNG. Timeout 120 s per cell on this 2-core CPU.
"""
from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "docs", "probing_truebase.ipynb")
PLOTS = ("expert_usage_by_class", "logit_lens", "bias_effect", "ban_expert", "variants_loss_by_class")


def _fake_run(run_dir) -> None:
    """variants/{truebase,base,preview} as tiny random Hugging Face dirs with a stdlib BPE tokenizer
    (tj.load reads them like the quickstart's variants)."""
    import inspect
    import shlex
    import textwrap

    import jax
    import numpy as np

    import trinity_jax as tj
    from trinity_jax.config import model_config
    from trinity_jax.data.tokenizer import train_bpe
    from trinity_jax.model import abstract_variables

    tok = train_bpe([inspect.getsource(textwrap), inspect.getsource(shlex)], 384)
    cfg = model_config(vocab_size=384, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=3, num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, num_experts=4, num_experts_per_tok=2, sliding_window=16,
                       global_attn_every_n_layers=3, max_position_embeddings=256)
    for i, name in enumerate(("truebase", "base", "preview")):
        rng = np.random.default_rng(i)
        v = jax.tree_util.tree_map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32)
                                   if len(a.shape) > 1 else np.ones(a.shape, np.float32), abstract_variables(cfg))
        tj.export_hf(tj.LoadedModel(cfg, v, tok), str(run_dir / "variants" / name))


@pytest.mark.slow
@pytest.mark.parametrize("run", ["fallback", "variants"])
def test_probing_notebook_executes(tmp_path, monkeypatch, run):
    if run == "variants":
        _fake_run(tmp_path / "run")
    monkeypatch.setenv("TRINITY_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("TRINITY_PLOTS_DIR", str(tmp_path / "plots"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "docs")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    if run == "fallback":
        assert "RANDOMLY INITIALISED" in text                # the fallback says so
    else:
        assert "variants available: ['truebase', 'base', 'preview']" in text
        assert "--- preview" in text and "--- base" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(PLOTS)
    for name in PLOTS:
        assert (tmp_path / "plots" / f"probing_{name}.png").stat().st_size > 10_000
