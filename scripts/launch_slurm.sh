#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, each owning the node's 8 GPUs;
# jax.distributed over NCCL, coordinated by the first node (docs/distributed.md §4).
#
#   sbatch --nodes=256 scripts/launch_slurm.sh experiments/large.py /shared/runs/large \
#       --config.mesh.replica=16 --config.mesh.fsdp=16 --config.mesh.expert=8
#
# trinity_jax.parallel.distributed.initialize reads SLURM_NTASKS / SLURM_PROCID and the first
# host of SLURM_JOB_NODELIST (port TRINITY_COORDINATOR_PORT, default 12355). Outside SLURM,
# pass --coordinator HOST:PORT --num-processes N --process-id I to `python -m trinity_jax train`
# (or set TRINITY_COORDINATOR / TRINITY_NUM_PROCESSES / TRINITY_PROCESS_ID).
#SBATCH --job-name=trinity
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: launch_slurm.sh CONFIG WORKDIR [--config.a.b=v ...]}
WORKDIR=${2:?usage: launch_slurm.sh CONFIG WORKDIR [--config.a.b=v ...]}
shift 2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-"$ROOT/.venv/bin/python"}

export TRINITY_COORDINATOR_PORT=${TRINITY_COORDINATOR_PORT:-12355}
export JAX_PLATFORMS=cuda
# let XLA overlap FSDP collectives with compute; keep the defaults otherwise
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# print the parameter / FLOP counts once (and fail fast on a bad config) before launching
"$PYTHON" -m trinity_jax plan --config "$CONFIG" \
    --devices "$(( SLURM_JOB_NUM_NODES * 8 ))" "$@" || true

srun --kill-on-bad-exit=1 "$PYTHON" -m trinity_jax train \
    --config "$CONFIG" --workdir "$WORKDIR" "$@"
