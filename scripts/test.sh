#!/usr/bin/env bash
# Tests: set up (idempotent) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no spinning OpenMP threads on shared cores
python -m pytest -q "$@"
