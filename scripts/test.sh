#!/usr/bin/env bash
# The whole test suite on CPU with 8 emulated devices. Creates .venv and installs '.[dev]' if needed.
#   scripts/test.sh                 # everything
#   scripts/test.sh tests/test_moe.py -k pallas   # any pytest arguments
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv "[dev]"
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=2
if [ "$#" -eq 0 ]; then set -- tests; fi
# --dist loadscope: a module's tests stay on one worker, so module-scoped fixtures (a trained
# tiny run, a reference CLI run) are built once, not once per worker.
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadscope --durations=25 "$@"
