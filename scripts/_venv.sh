# Sourced by quickstart.sh and test.sh: create .venv if missing and install the package.
# Usage: ensure_venv EXTRAS   (EXTRAS = "" or "[dev]")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRINITY_VENV:-$ROOT/.venv}"
ensure_venv() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.trinity-installed${extras}"
  if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
    echo "==> installing trinity_jax${extras} into $VENV (first time: ~2 minutes)"
    "$VENV/bin/pip" install --disable-pip-version-check -q --upgrade pip setuptools wheel >/dev/null
    # torch is pinned to the CPU wheel (2.13.0); never let pip pick a CUDA build here
    "$VENV/bin/pip" install --disable-pip-version-check -q -e "$ROOT${extras}" 2> >(grep -v "WARNING: Location" >&2)
    touch "$stamp"
  fi
}
