#!/usr/bin/env bash
# Main job: set up (idempotent) and run the whole pipeline on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no spinning OpenMP threads on shared cores
dvc repro "$@"
dvc metrics show
