"""Multi-host start-up (``jax.distributed``) and per-process batches -> global arrays.

Where the coordinates come from, first match wins, per field:
1. explicit arguments (the CLI flags ``--coordinator HOST:PORT --num_processes N
   --process_id I [--local_device_count D]``);
2. environment: ``TRINITY_COORDINATOR``, ``TRINITY_NUM_PROCESSES``, ``TRINITY_PROCESS_ID``,
   ``TRINITY_LOCAL_DEVICE_COUNT``;
3. SLURM: ``SLURM_NTASKS`` (processes), ``SLURM_PROCID`` (this process), the first host of
   ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST`` as coordinator on port
   ``TRINITY_COORDINATOR_PORT`` (default 12355).

With none of them, ``initialize`` does nothing (single process). On CPU it selects gloo
collectives and (if given) the emulated device count before the backend starts; on GPU the
collectives are NCCL (jax's default).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from trinity_jax.config import ConfigError

__all__ = ["DistributedSpec", "resolve", "initialize", "expand_slurm_nodelist",
           "make_global_batch", "process_batch_slice", "DEFAULT_PORT"]

DEFAULT_PORT = 12355


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    coordinator_address: Optional[str]
    num_processes: int
    process_id: int
    local_device_count: Optional[int] = None
    source: str = "none"          # args | env | slurm | none

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'node[001-003,7],gpu5' -> ['node001','node002','node003','node7','gpu5'] (no scontrol)."""
    hosts, i, parts, depth, cur = [], 0, [], 0, ""
    for ch in nodelist:                   # split on commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                for n in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    v = env.get(key)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment {key}={v!r}: expected an integer") from None


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, local_device_count: Optional[int] = None,
            env: Optional[Mapping[str, str]] = None) -> DistributedSpec:
    """Merge arguments, TRINITY_* variables and SLURM variables into one checked spec."""
    env = os.environ if env is None else env
    source = "args" if coordinator_address or num_processes or process_id is not None else "none"
    if coordinator_address is None:
        coordinator_address = env.get("TRINITY_COORDINATOR") or None
        if coordinator_address and source == "none":
            source = "env"
    if num_processes is None:
        num_processes = _int(env, "TRINITY_NUM_PROCESSES")
    if process_id is None:
        process_id = _int(env, "TRINITY_PROCESS_ID")
    if local_device_count is None:
        local_device_count = _int(env, "TRINITY_LOCAL_DEVICE_COUNT")
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        if num_processes is None:
            num_processes = _int(env, "SLURM_NTASKS")
        if process_id is None:
            process_id = _int(env, "SLURM_PROCID")
        if coordinator_address is None:
            nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
            hosts = expand_slurm_nodelist(nodes) if nodes else []
            if hosts:
                port = _int(env, "TRINITY_COORDINATOR_PORT") or DEFAULT_PORT
                coordinator_address = f"{hosts[0]}:{port}"
                if source == "none":
                    source = "slurm"
    num_processes = 1 if num_processes is None else num_processes
    process_id = 0 if process_id is None else process_id
    if num_processes < 1:
        raise ConfigError(f"num_processes={num_processes}: must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id}: must be in [0, num_processes={num_processes})")
    if num_processes > 1 and not coordinator_address:
        raise ConfigError(f"num_processes={num_processes} needs a coordinator address: pass "
                          "--coordinator HOST:PORT or set TRINITY_COORDINATOR")
    if coordinator_address and not re.fullmatch(r"[^:\s]+:\d+", coordinator_address):
        raise ConfigError(f"coordinator={coordinator_address!r}: expected HOST:PORT")
    if local_device_count is not None and local_device_count < 1:
        raise ConfigError(f"local_device_count={local_device_count}: must be >= 1")
    return DistributedSpec(coordinator_address, num_processes, process_id, local_device_count,
                           source if num_processes > 1 else "none")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_count: Optional[int] = None,
               platform: Optional[str] = None, timeout_s: int = 300) -> DistributedSpec:
    """Start jax.distributed if this is a multi-process run; must run before any jax op.

    ``platform`` ('cpu' / 'gpu'; default from ``JAX_PLATFORMS``) decides the CPU set-up:
    gloo collectives and ``local_device_count`` emulated devices per process.
    """
    spec = resolve(coordinator_address, num_processes, process_id, local_device_count)
    platform = platform or (os.environ.get("JAX_PLATFORMS") or "").split(",")[0] or None
    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if spec.local_device_count:
            jax.config.update("jax_num_cpu_devices", spec.local_device_count)
    if not spec.multi_process:
        return spec
    kwargs: dict[str, Any] = dict(coordinator_address=spec.coordinator_address,
                                  num_processes=spec.num_processes, process_id=spec.process_id,
                                  initialization_timeout=timeout_s, **_device_ids_kwargs(os.environ))
    jax.distributed.initialize(**kwargs)
    return spec


def _device_ids_kwargs(env: Mapping[str, str]) -> dict:
    """Which local devices a process takes. Under SLURM, jax's cluster detection restricts each
    process to the GPU of its SLURM_LOCALID (right for one task per GPU); with one task per
    node (scripts/launch_slurm.sh) that left each node's process with GPU 0 alone, so the
    detection is switched off there and the process owns every GPU of its node. Everything it
    would detect (coordinator, process count and id) is already resolved."""
    if "SLURM_PROCID" not in env:
        return {}
    per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    if per_node is None:
        tasks, nodes = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_NNODES")
        per_node = tasks // nodes if tasks and nodes and tasks % nodes == 0 else None
    return {"cluster_detection_method": "deactivate"} if per_node == 1 else {}


def process_batch_slice(global_batch: int, mesh: Optional[Mesh] = None) -> slice:
    """Rows of the global batch this process must load (contiguous, process-major).

    The mesh orders devices by process, and the batch is split over the data axes in that
    order, so process p owns rows [p*B/P, (p+1)*B/P) whenever ``tensor`` lives inside a host.
    """
    n, p = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ConfigError(f"train.batch_size={global_batch} must be divisible by the "
                          f"number of processes {n}")
    per = global_batch // n
    return slice(p * per, (p + 1) * per)


def make_global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows (numpy, dim 0) -> global jax.Arrays sharded over the data axes."""
    from trinity_jax.parallel.rules import batch_sharding
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
