#!/usr/bin/env bash
# The full pipeline on a GPU machine without DVC/Prefect/GX (the lent H100 lacks them): the same
# stage functions as `dvc repro`, driven through the `nla` CLI with the gpu profile merged in.
# Run from the repository root, after the two-call start of ../shared/ENVIRONMENT.md:
#   bash scripts/gpu_pipeline.sh [MODEL] [PROFILE]
# Writes metrics/, plots/, reports/ and copies them (plus the per-stage log) to $OUT.
# The quality gates run afterwards on a machine with great_expectations, on the copied tables.
set -euo pipefail
MODEL=${1:-/root/nla-model/model.gguf}
PROFILE=${2:-gpu}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
python3 - "$PROFILE" "$MODEL" <<'PY'
import sys, yaml
from nla.config import apply_profile
apply_profile(sys.argv[1], "params.yaml")
params = yaml.safe_load(open("params.yaml"))
params["model"]["name"] = sys.argv[2]
params["label"]["local_model"] = sys.argv[2]
open("params.yaml", "w").write(yaml.safe_dump(params, sort_keys=False))
PY
cp params.yaml "$OUT/params.yaml"
[ -f data/corpus/documents.parquet ] || { echo "carry data/corpus/documents.parquet (gensim is missing here)"; exit 1; }
start=$(date +%s)
for stage in extract split label av-sft ar-sft rl evaluate; do
  t0=$(date +%s)
  python3 -m nla.cli "$stage" 2>&1 | grep -v "it/s]$" | tail -n 40
  echo "stage $stage: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/stage_times.txt"
done
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT/stage_times.txt"
python3 -c "import torch; print(f'peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (last process)')" || true
cp -r metrics plots "$OUT/" && cp reports/samples.md "$OUT/"
tar czf "$OUT/tables.tgz" data/activations data/split data/labels
