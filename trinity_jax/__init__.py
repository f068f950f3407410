"""trinity_jax: Trinity-style sparse MoE language models (AFMoE) in JAX/Flax.

    import trinity_jax as tj
    m = tj.load("DIR")          # a variant dir or a Hugging Face AFMoE dir
    m.logits(tokens)
    tj.export_hf(m, "OUT")
"""
__version__ = "0.1.0"

from trinity_jax.api import LoadedModel, export_hf, load  # noqa: E402

__all__ = ["load", "export_hf", "LoadedModel", "__version__"]
