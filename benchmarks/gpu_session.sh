#!/usr/bin/env bash
# The benchmarks on a GPU machine, in one command, from the repository root:
#   bash benchmarks/gpu_session.sh
# Writes to $OUT (or ./gpu-out): results-cuda.md, bench.jsonl, tests.log, env.txt, session.log.
# Knobs: MODEL (a GGUF file or any model.name), SIZE (gpu), DEVICE (cuda), CORPUS (documents
# file), ONLY (e.g. "rollout rl"), SKIP_TESTS=1. A CPU dry run of this script:
#   PATH=.venv/bin:$PATH DEVICE=cpu SIZE=small MODEL=embedded ONLY=ar SKIP_TESTS=1 bash benchmarks/gpu_session.sh
# On the lent GPU machines (the default MODEL, how to start one): docs/maintainers.md.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
MODEL=${MODEL:-/root/nla-model/model.gguf}
SIZE=${SIZE:-gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the project without installing it
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec > >(tee "$OUT/session.log") 2>&1
start=$(date +%s)

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c 'import sys, torch, transformers, peft; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
} | tee "$OUT/env.txt"

# 1. Nothing on the benchmarks' import path may need the pipeline-only packages (GPU machines lack them).
python3 - <<'EOF' || { echo "FAIL: a benchmark imports a pipeline-only package"; exit 1; }
import importlib.abc, sys
BLOCKED = {"prefect", "dvc", "great_expectations", "gensim"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is imported on the benchmark path")
sys.meta_path.insert(0, Block())
sys.path.insert(0, "benchmarks")
import run_all  # noqa: F401  (imports every benchmark and nla module they use)
print("import check: ok (no prefect/dvc/great_expectations/gensim)")
EOF

# 2. The sampler against generate on CUDA (float32 tiny models, CUDA-graph path), if pytest is here.
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  if python3 -c 'import pytest' 2>/dev/null; then
    python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py -k cuda 2>&1 | tail -25 | tee "$OUT/tests.log"
  else
    echo "pytest missing: tests skipped (stage it: EXTRA_WHEELS='pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.3')" | tee "$OUT/tests.log"
  fi
fi

# 3. Corpus for the extraction and AR benchmarks: gensim (the embedded corpus) may be missing, so it is carried.
CORPUS=${CORPUS:-data/corpus/documents.parquet}
[ -f "$CORPUS" ] || { echo "FAIL: $CORPUS not found; carry it (run 'nla corpus' here first) or set CORPUS"; exit 1; }

# 4. All benchmarks, ours vs the transformers baseline in the same process.
python3 benchmarks/run_all.py --size "$SIZE" --device "$DEVICE" --model "$MODEL" --corpus "$CORPUS" \
  --results-dir "$OUT" --out "$OUT/bench.jsonl" ${ONLY:+--only $ONLY}
status=$?
echo "gpu_session: exit $status after $(( $(date +%s) - start )) s; results in $OUT/results-$DEVICE.md"
exit $status
