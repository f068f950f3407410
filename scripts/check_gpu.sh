#!/usr/bin/env bash
# One prepared run for a lent NVIDIA GPU: scripts/check_gpu.sh [PART ...]
#
# Parts (default: all, in the order below, bench after variants; each under its own time limit,
# so one hang costs only its own share):
#   env      versions of python, jax, flax, optax, orbax, grain, torch, transformers; the devices
#   kernels  scripts/bench_gpu.sh --quick: the Pallas kernels compiled on the GPU, checked
#            against their references, and timed at Trinity-Large expert shapes
#   tests    the GPU tests (Pallas kernels compiled, ragged_all_to_all) with JAX_PLATFORMS=cuda
#   bench    scripts/bench_train.py on the GPU, bench shape: ours bf16 (AdamW, Muon) vs HF bf16
#   big      scripts/bench_train.py --size gpu: ours bf16 (AdamW, Muon) vs HF bf16 at a GPU-sized
#            shape
#   profile  scripts/profile_train.py --size gpu: the step's kernel time by part of the model
#   variants the --size gpu step with attention_impl=dot_product_attention (cuDNN) and with
#            moe_impl=ragged_dot instead of the defaults (ours only)
#   cli      python -m trinity_jax train --config experiments/tiny.py on the GPU (data pipeline,
#            checkpoints, variants)
# All parts together need more than one 10-minute call. Seen on an H200 (session 9): env 11 s,
# tests ~50 s, a --size gpu build ~40 s of compile; the kernels' timing needs more than 120 s.
# E.g. `env kernels tests big` (timeout_s 600), then `profile variants cli bench`.
#
# Python: $PYTHON, else python3 (the lent H200 image's python3 has jax with the CUDA plugin and
# torch, and no network). Wheels under .whl/ (pinned versions of what the image lacks: grain,
# ml-collections, tensorboardX, portpicker, and our flax/optax/orbax/transformers pins) are
# installed into /tmp/site first and put ahead on PYTHONPATH. Fetch them here (pip works on the
# dev box, not on the GPU machine), then carry .whl in the device call:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl flax==0.12.8 \
#     optax==0.2.8 orbax-checkpoint==0.12.8 grain==0.2.18 array_record==0.8.6 \
#     ml_collections==1.1.0 tensorboardX==2.6.5 portpicker==1.6.0 transformers==5.24.0
# Logs: $OUT/<part>.log (or ./gpu_out/; bench_gpu.py adds bench_gpu.txt); the tail of each
# log is echoed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON="$PY"
# jax and torch share the card in the bench: leave torch room beside XLA's pool
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"

part() {   # part NAME LIMIT_S CMD...
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t))s"
  tail -n "${TAIL:-20}" "$OUT/$name.log" | cut -c1-240
  return 0
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
  "$PYTHON" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections",
          "tensorstore", "torch", "transformers"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(m, "IMPORT FAILED:", repr(e))
import jax
print("backend", jax.default_backend(), jax.devices())
PY
}

export -f env_report

PARTS=("$@")
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(env kernels tests big profile variants bench cli)
for p in "${PARTS[@]}"; do
  case "$p" in
    env) part env 60 bash -c env_report ;;
    kernels) part kernels 180 bash scripts/bench_gpu.sh --quick ;;
    tests) part tests 120 env JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_pallas_gmm.py tests/test_pallas_routing.py \
        tests/test_parallel_expert.py::test_ragged_all_to_all_on_accelerator ;;
    bench) part bench 200 "$PY" scripts/bench_train.py --dtypes bfloat16 --steps 5 --warmup 1 \
        --model '{"scan_unroll": 0}' ;;
    big) part big 240 "$PY" scripts/bench_train.py --size gpu --dtypes bfloat16 \
        --optimizers adamw,muon --steps 5 --warmup 1 ;;
    profile) part profile 120 "$PY" scripts/profile_train.py --size gpu --steps 3 ;;
    variants) part variants 200 bash -c "\"$PY\" scripts/bench_train.py --size gpu \
        --dtypes bfloat16 --optimizers adamw --skip-hf --steps 5 --warmup 1 \
        --model '{\"attention_impl\": \"dot_product_attention\"}' && \"$PY\" \
        scripts/bench_train.py --size gpu --dtypes bfloat16 --optimizers adamw --skip-hf \
        --steps 5 --warmup 1 --model '{\"moe_impl\": \"ragged_dot\"}'" ;;
    cli) part cli 180 "$PY" -m trinity_jax train --config experiments/tiny.py \
        --workdir /tmp/check_gpu_wd --config.train.steps=30 --config.sft.steps=10 ;;
    *) echo "check_gpu.sh: unknown part '$p' (allowed: env kernels tests big profile variants bench cli)" >&2
       exit 2 ;;
  esac
done
