"""THE logical-axis table: every logical axis name used by the model -> mesh axes.

This is the only place that says how a tensor is sharded (DESIGN: "the mapping to mesh
axes lives in one table in parallel/"). Parameter names come from docs/contracts.md.

Rules are ordered pairs ``(logical name, mesh axes)`` read by flax's
``nn.logical_to_mesh_axes``: for each array the rules are scanned in order and a rule is
taken only if none of its mesh axes is already used by another dimension of the same
array. A logical name may therefore appear twice, the second entry being the fallback:

* ``embed`` -> ('fsdp', 'expert') for the dense weights (the FSDP group is fsdp×expert,
  e.g. 16×8 = 128 devices as in Trinity Large's HSDP), but expert weights
  ``[E, d, Im]`` claim ``expert`` for ``exp`` first, so their ``embed`` falls back to 'fsdp'.
* ``act_batch`` claims ('replica','fsdp','expert'), so an activation ``[tokens, E]`` leaves
  ``act_exp`` unsharded.

Non-divisible dims: ``param_shardings`` checks every parameter against the mesh and keeps
only the mesh axes (in order) whose running product divides the dimension; a dimension
nothing divides is replicated (e.g. vocab 200192 over tensor=3). Activation constraints
inside jit may be uneven (GSPMD pads), so they need no such fallback; the batch itself is
checked up front by ``mesh.validate_mesh_for``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trinity_jax.parallel.mesh import DATA_AXES

__all__ = ["LOGICAL_AXIS_RULES", "PARAM_AXES", "ACTIVATION_AXES", "logical_to_mesh_spec",
           "param_shardings", "param_specs", "batch_sharding", "replicated", "with_rules",
           "use_mesh", "fit_spec"]

# ---------------------------------------------------------------------------- THE TABLE
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations (batch first so it wins the 'expert' axis over act_exp)
    ("act_batch", DATA_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_exp", "expert"),
    ("act_vocab", "tensor"),
    # parameters (exp before embed so expert weights keep 'expert' for the expert dim)
    ("exp", "expert"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("moe_mlp", "tensor"),
    ("router", None),
    ("norm", None),
    ("layers", None),
)

PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "moe_mlp", "exp",
              "router", "norm", "layers")
ACTIVATION_AXES = ("act_batch", "act_seq", "act_embed", "act_heads", "act_kv_heads",
                   "act_mlp", "act_exp", "act_vocab")


def with_rules(rules: Optional[Sequence] = None):
    """Context in which flax's logical constraints / partitioning use our table."""
    return nn.logical_axis_rules(tuple(rules) if rules is not None else LOGICAL_AXIS_RULES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Optional[Sequence] = None, ep_buffer_factor: float = 0.0,
             ep_exchange: str = "all_to_all"):
    """The context to trace init / apply / train_step in: ``jax.set_mesh(mesh)``, our rules,
    and the expert-parallel options (``mesh.ep_buffer_factor`` of the config).

    The options are read while tracing; a jitted function traced under one setting keeps it.
    """
    from trinity_jax.parallel.expert import ep_options
    with jax.set_mesh(mesh), with_rules(rules), ep_options(ep_buffer_factor, ep_exchange):
        yield mesh


def _axes_tuple(a) -> tuple:
    if a is None:
        return ()
    return tuple(a) if isinstance(a, (tuple, list)) else (a,)


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
    """Drop mesh axes that don't divide their dimension (running product, in order).

    Size-1 mesh axes are dropped too (they shard nothing). A dim that no axis divides is
    replicated. ``mesh`` is a Mesh or a mapping of axis sizes (the planner's).
    """
    sizes = mesh.shape if hasattr(mesh, "shape") else mesh
    out = []
    for i, dim in enumerate(shape):
        axes = _axes_tuple(spec[i]) if i < len(spec) else ()
        kept, prod = [], 1
        for a in axes:
            n = sizes[a]
            if n > 1 and dim % (prod * n) == 0:
                kept.append(a)
                prod *= n
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_to_mesh_spec(names: Sequence[Optional[str]], rules: Optional[Sequence] = None) -> P:
    """Logical names of one array -> mesh PartitionSpec (unmatched names -> None)."""
    return nn.logical_to_mesh_axes(tuple(names), tuple(rules) if rules is not None
                                   else LOGICAL_AXIS_RULES)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_specs(tree: Any, mesh: Mesh, rules: Optional[Sequence] = None, shapes: Any = None) -> Any:
    """Mesh PartitionSpecs for a tree of boxed (``nn.LogicallyPartitioned``) abstract variables.

    ``tree`` is what ``jax.eval_shape(init)`` returns (boxes carry the logical names) or a
    tree of logical ``PartitionSpec`` s; in the latter case give ``shapes`` (a matching
    tree of arrays / ShapeDtypeStructs) to apply the divisibility fallback. Unboxed leaves
    are replicated.
    """
    leaves = jax.tree.leaves(tree, is_leaf=_is_spec)
    if leaves and all(_is_spec(x) for x in leaves):
        logical = tree
        if shapes is None:
            raise ValueError("param_specs: a tree of logical PartitionSpecs needs `shapes`")
    else:
        logical = nn.get_partition_spec(tree)
    if shapes is None:
        shapes = nn.unbox(tree)
    rules = tuple(rules) if rules is not None else LOGICAL_AXIS_RULES

    def one(lspec, arr):
        shape = getattr(arr, "shape", ())
        names = tuple(lspec) + (None,) * (len(shape) - len(lspec))
        return fit_spec(logical_to_mesh_spec(names, rules), shape, mesh)

    return jax.tree.map(one, logical, shapes, is_leaf=_is_spec)


def param_shardings(tree: Any, mesh: Mesh, rules: Optional[Sequence] = None, shapes: Any = None) -> Any:
    """NamedShardings for a parameter / variable tree (see ``param_specs``).

    Use as ``out_shardings`` of a jitted init and as the in/out shardings of the train step.
    """
    specs = param_specs(tree, mesh, rules, shapes)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (dim 0) split over replica×fsdp×expert, everything else replicated."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
