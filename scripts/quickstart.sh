#!/usr/bin/env bash
# The main job on the embedded default data: tokenize the stdlib corpus, train the tiny Trinity
# through its three phases, write TrueBase / Base / Preview, sample from each, summarise.
# Creates .venv and installs if needed. A second run resumes or skips finished work.
#   scripts/quickstart.sh [--workdir runs/quickstart] [--config.train.steps=100 ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv ""
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL=2
exec "$VENV/bin/python" -m trinity_jax quickstart "$@"
