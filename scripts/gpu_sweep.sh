#!/usr/bin/env bash
# Variants of the CPU default on one GPU, in parallel: the data (extract, split, label) is prepared once
# with the CPU default's params, then each lane of QUEUE runs through scripts/sweep_variants.sh at once.
#   OUT=<results dir> bash scripts/gpu_sweep.sh QUEUE [DEADLINE_S]
# QUEUE: sweep_variants.sh's format. A variant whose `from` is in the queue joins its parent's lane and
# runs after it; every other variant opens a lane. All lanes share one run folder, ROOT. Needs data/corpus/documents.parquet (from `nla corpus`).
# OVERRIDES (default: the CPU default's numerics on CUDA, fp32 weights and bf16 autocast, with the model
# file MODEL) apply to preparation and to every variant. Results: $OUT/sweep.tgz (each variant's params, metrics, reports, logs)
# and $OUT/times.txt; one archive, since few files come back from the lent machines.
set -euo pipefail
queue=$(realpath "$1")
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${OUT:?set OUT}"
PREP=${PREP:-/root/nla-sweep-data}
ROOT=${ROOT:-/root/nla-sweep}
MODEL=${MODEL:-/root/nla-model/model.gguf}
export OVERRIDES=${OVERRIDES:-model.device=cuda model.dtype=float32 model.autocast=bfloat16 model.name=$MODEL}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$repo
if [ ! -f "$PREP/done" ]; then
  mkdir -p "$PREP/data/corpus"
  cp "$repo/params.yaml" "$PREP/" && cp "$repo/data/corpus/documents.parquet" "$PREP/data/corpus/"
  # shellcheck disable=SC2086  # one key=value per word
  (cd "$PREP" && python3 -c '
import sys, yaml
from nla.config import set_param
for pair in sys.argv[1:]:
    key, value = pair.split("=", 1)
    set_param("params.yaml", key, yaml.safe_load(value))
' $OVERRIDES)
  for stage in extract split label; do
    start=$(date +%s)
    (cd "$PREP" && python3 -m nla.cli "$stage" 2>&1 | tr '\r' '\n' | tail -n 2)
    echo "prepare $stage $(($(date +%s) - start)) s"
  done
  touch "$PREP/done"
fi
lanes=$(mktemp -d)
awk -F'|' -v dir="$lanes" 'NF >= 3 {
  lane = ($2 in lane_of) ? lane_of[$2] : $1; lane_of[$1] = lane
  print >> (dir "/" lane ".txt")
}' "$queue"
mkdir -p "$ROOT"
pids=()
for lane in "$lanes"/*.txt; do
  DATA=$PREP/data RUN_ROOT=$ROOT bash "$repo/scripts/sweep_variants.sh" "$lane" "${2:-86400}" \
    >"$ROOT/lane-$(basename "$lane" .txt).log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
mkdir -p "$OUT"
cp "$ROOT/times.txt" "$OUT/times.txt" 2>/dev/null || true
(cd "$ROOT" && tar czf "$OUT/sweep.tgz" --exclude=data --exclude=done .)
exit $status
