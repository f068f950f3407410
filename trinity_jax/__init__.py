"""trinity_jax: Trinity-style sparse MoE language models (AFMoE) in JAX/Flax.

    import trinity_jax as tj
    m = tj.load("DIR")          # a variant dir or a Hugging Face AFMoE dir
    m.logits(tokens)
    tj.export_hf(m, "OUT")
"""
__version__ = "0.1.0"

__all__ = ["load", "export_hf", "LoadedModel", "__version__"]


def __getattr__(name):  # lazy: `import trinity_jax.malloc_env` (the launchers) must not import jax
    if name in ("load", "export_hf", "LoadedModel"):
        from trinity_jax import api
        return getattr(api, name)
    raise AttributeError(f"module 'trinity_jax' has no attribute {name!r}")
