#!/usr/bin/env bash
# Tests: set up (idempotent) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m pytest -q "$@"
