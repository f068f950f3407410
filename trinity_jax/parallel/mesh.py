"""The device mesh ('replica', 'fsdp', 'expert', 'tensor') and its checks (DESIGN: parallel/).

HSDP + expert parallelism (SPEC §4 "Parallelism used"): parameters are sharded over
``fsdp`` and replicated over ``replica``; expert weights are additionally split over
``expert``; the batch is split over ``replica × fsdp × expert`` outside the MoE (the expert
axis is "borrowed" from data parallelism, as MaxText / torchtitan dp2ep do), and inside the
MoE the token-slots travel over ``expert`` to the devices that own their experts.

The mesh uses ``AxisType.Auto`` on every axis (GSPMD style: jit propagates shardings, we
only pin in/out shardings and a few constraints). ``jax.make_mesh`` now defaults to
Explicit axes, which would demand ``out_sharding=`` on every contraction over a sharded dim.

Device order: devices are sorted by (process_index, id) and reshaped row-major, so the
innermost axes (``tensor``, then ``expert``) stay inside one host (NVLink) and ``replica``
is the outermost (cross-node) axis.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from trinity_jax.config import ConfigError, ExperimentConfig, MeshConfig

__all__ = ["AXES", "DATA_AXES", "mesh_shape", "make_mesh", "validate_mesh_for",
           "data_parallel_size", "single_device_mesh"]

AXES = ("replica", "fsdp", "expert", "tensor")
DATA_AXES = ("replica", "fsdp", "expert")   # the batch is split over all three outside the MoE


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with the (at most one) -1 axis inferred; ConfigError if they don't fit."""
    mesh_cfg.validate()
    sizes = {a: int(getattr(mesh_cfg, a)) for a in AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    inferred = [a for a, v in sizes.items() if v == -1]
    if inferred:
        a = inferred[0]
        if n_devices % known:
            raise ConfigError(
                f"mesh.{a}=-1 cannot be inferred: {n_devices} devices are not divisible by the "
                f"product of the other axes {known} ({_fmt(sizes)})")
        sizes[a] = n_devices // known
    total = math.prod(sizes.values())
    if total != n_devices:
        raise ConfigError(
            f"mesh {_fmt(sizes)} has {total} devices but {n_devices} are available; "
            f"make replica*fsdp*expert*tensor = {n_devices} (or set one axis to -1)")
    return sizes


def _fmt(sizes: dict) -> str:
    return ",".join(f"{a}={v}" for a, v in sizes.items())


def make_mesh(mesh_cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 4-axis ('replica','fsdp','expert','tensor') Auto-typed mesh over ``devices`` (default: all)."""
    if devices is None:
        devices = jax.devices()
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    sizes = mesh_shape(mesh_cfg, len(devices))
    arr = np.empty(len(devices), dtype=object)
    arr[:] = devices
    arr = arr.reshape(tuple(sizes[a] for a in AXES))
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def single_device_mesh(device: Optional[jax.Device] = None) -> Mesh:
    """All four axes of size 1 on one device (the reference for equivalence tests)."""
    return make_mesh(MeshConfig(replica=1, fsdp=1, expert=1, tensor=1),
                     [device if device is not None else jax.devices()[0]])


def data_parallel_size(mesh_or_sizes) -> int:
    """How many ways the batch is split: replica * fsdp * expert."""
    shape = mesh_or_sizes.shape if isinstance(mesh_or_sizes, Mesh) else mesh_or_sizes
    return math.prod(int(shape[a]) for a in DATA_AXES)


def validate_mesh_for(cfg: ExperimentConfig, n_devices: Optional[int] = None) -> dict[str, int]:
    """Check the mesh against the model and batch before anything compiles; returns the sizes.

    Raises ConfigError (naming the fields and the numbers) when: the mesh product differs
    from the device count; ``expert`` does not divide ``model.num_experts``; ``tensor`` does
    not divide the query or kv heads, (expert parallel) the experts' width, or (multi-process)
    one process's devices; or the global (micro)batch is not divisible by the data-parallel
    size replica*fsdp*expert.
    """
    if n_devices is None:
        n_devices = jax.device_count()
    sizes = mesh_shape(cfg.mesh, n_devices)
    m = cfg.model
    if sizes["expert"] > 1:
        if m.num_moe_layers == 0:
            pass  # the expert axis then only splits the batch
        elif m.num_experts % sizes["expert"]:
            raise ConfigError(
                f"mesh.expert={sizes['expert']} must divide model.num_experts={m.num_experts}")
        elif m.moe_intermediate_size % sizes["tensor"]:    # the expert shard_map splits it
            raise ConfigError(
                f"mesh.tensor={sizes['tensor']} must divide model.moe_intermediate_size="
                f"{m.moe_intermediate_size} (with mesh.expert > 1 the experts' width is split over it)")
    t = sizes["tensor"]
    local = jax.local_device_count() if jax.process_count() > 1 else n_devices
    if local % t:
        # devices are ordered by process with tensor innermost: a tensor group spanning two
        # processes would need both to load the same batch rows (each loads its own)
        raise ConfigError(
            f"mesh.tensor={t} must divide the devices of one process ({local}): a tensor "
            f"group cannot span processes")
    if m.num_attention_heads % t:
        raise ConfigError(
            f"mesh.tensor={t} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.num_key_value_heads % t:
        raise ConfigError(
            f"mesh.tensor={t} must divide model.num_key_value_heads={m.num_key_value_heads}")
    dp = data_parallel_size(sizes)
    tr = cfg.train
    if tr.batch_size % dp:
        raise ConfigError(
            f"train.batch_size={tr.batch_size} must be divisible by the data-parallel size "
            f"replica*fsdp*expert={sizes['replica']}*{sizes['fsdp']}*{sizes['expert']}={dp}")
    micro = tr.batch_size // tr.microbatches
    if micro % dp:
        raise ConfigError(
            f"train.batch_size/train.microbatches={tr.batch_size}/{tr.microbatches}={micro} "
            f"(the microbatch) must be divisible by the data-parallel size "
            f"replica*fsdp*expert={dp}")
    for i, (_, bs) in enumerate(tr.batch_ramp):
        if bs % dp or (bs // tr.microbatches) % dp or bs % tr.microbatches:
            raise ConfigError(
                f"train.batch_ramp[{i}] batch_size={bs} must be divisible by "
                f"train.microbatches={tr.microbatches} times the data-parallel size {dp}")
    return sizes
