"""Flax Linen AFMoE model (SPEC §1)."""
from trinity_jax.model.moe import (ExpertWeights, available_moe_impls, get_moe_impl, register_moe_impl,
                                   route)
from trinity_jax.model import moe_pallas  # noqa: F401  (registers the 'pallas' MoE impl)
from trinity_jax.model.transformer import (Transformer, abstract_variables, init_boxed, init_variables,
                                           logical_axes)

__all__ = ["Transformer", "init_variables", "init_boxed", "abstract_variables", "logical_axes",
           "ExpertWeights", "route", "register_moe_impl", "get_moe_impl", "available_moe_impls"]
