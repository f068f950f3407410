#!/usr/bin/env bash
# Check and time the Pallas MoE kernels on an NVIDIA GPU: scripts/bench_gpu.sh [--quick] [...]
# (all arguments go to scripts/bench_gpu.py; --cpu-smoke runs tiny shapes in interpret mode).
#
# Python: $PYTHON if set; else a python3 whose JAX already sees a GPU (the lent H200 image
# has jax 0.11 + the CUDA 13 plugin and no network, so nothing is installed there); else, only
# where nvidia-smi sees a GPU, a venv (.venv-gpu, or $BENCH_VENV) with `pip install
# "jax[cuda12]"` (needs network). Without a GPU it runs the checkout's .venv python, which
# exits 2 with a message (or runs --cpu-smoke / --help).
# pallas_kernels is imported from the checkout (PYTHONPATH); no package install is needed.
# Results: stdout, and $OUT/bench_gpu.txt when $OUT is set. Bounded to 7.5 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"

has_gpu_jax() {
  "$1" - <<'PY' >/dev/null 2>&1
import jax
assert jax.default_backend() == "gpu", jax.default_backend()
PY
}

no_gpu_needed=0
for a in "$@"; do
  case "$a" in --cpu-smoke|-h|--help) no_gpu_needed=1 ;; esac
done
local_python() {   # the checkout's venv if there is one, else python3
  if [[ -x "$REPO/.venv/bin/python" ]]; then echo "$REPO/.venv/bin/python"; else echo python3; fi
}

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ $no_gpu_needed == 1 ]]; then
  PY="$(local_python)"
elif command -v python3 >/dev/null && has_gpu_jax python3; then
  PY=python3
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  # A GPU but no CUDA-enabled JAX: build a venv (needs network).
  VENV="${BENCH_VENV:-$REPO/.venv-gpu}"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  if ! has_gpu_jax "$VENV/bin/python"; then
    echo "bench_gpu.sh: installing jax[cuda12] into $VENV" >&2
    timeout 240 "$VENV/bin/pip" install -q "jax[cuda12]" numpy || {
      echo "bench_gpu.sh: could not install jax[cuda12] (no network?)." >&2
      echo "  Set PYTHON=/path/to/python whose jax sees the GPU." >&2
      exit 2
    }
  fi
  PY="$VENV/bin/python"
else
  PY="$(local_python)"   # no GPU here: bench_gpu.py says so and exits 2
fi

echo "bench_gpu.sh: using $PY" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm \
  --format=csv,noheader >&2 || true
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 450 "$PY" "$REPO/scripts/bench_gpu.py" "$@"
