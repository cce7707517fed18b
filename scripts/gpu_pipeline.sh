#!/usr/bin/env bash
# The pipeline on a GPU machine that lacks DVC/Prefect/GX: the same stage functions as
# `dvc repro`, through the `nla` CLI, with a params profile merged in.
#   RUN_DIR=<work dir> bash scripts/gpu_pipeline.sh [STAGE ...]
# The first call copies the repository to RUN_DIR and applies the profile; later calls continue
# there, so one run can span several calls. MODEL and PROFILE override the defaults.
# Results (metrics/, plots/, reports/samples.md, tables in results.tgz; stage times) go to $OUT.
# The quality gates run afterwards, on a machine with great_expectations, on the copied tables.
# On the lent GPU machines (the default MODEL and RUN_DIR, a run over several calls): docs/maintainers.md.
set -euo pipefail
MODEL=${MODEL:-/root/nla-model/model.gguf}
PROFILE=${PROFILE:-gpu}
RUN_DIR=${RUN_DIR:-/root/nla-run}
OUT=${OUT:-$PWD/gpu-out}
STAGES=${*:-extract split label av-sft ar-sft rl evaluate}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$RUN_DIR
if [ ! -f "$RUN_DIR/.prepared" ]; then
  [ -f data/corpus/documents.parquet ] || { echo "carry data/corpus/documents.parquet (gensim is missing here)"; exit 1; }
  rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR" && cp -r nla profiles params.yaml "$RUN_DIR/" && mkdir -p "$RUN_DIR/data/corpus"
  cp data/corpus/documents.parquet "$RUN_DIR/data/corpus/"
  (cd "$RUN_DIR" && python3 -c "
import sys
from nla.config import apply_profile, set_param
apply_profile('$PROFILE')
set_param('params.yaml', 'model.name', '$MODEL')
set_param('params.yaml', 'label.local_model', '$MODEL')
") && touch "$RUN_DIR/.prepared"
fi
cd "$RUN_DIR"
cp params.yaml "$OUT/params.yaml"
for stage in $STAGES; do
  t0=$(date +%s)
  python3 -m nla.cli "$stage" 2>&1 | tr '\r' '\n' | grep -vE "it/s\]$|s/it\]$" | tail -n 25
  echo "stage $stage: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/stage_times.txt"
done
# One archive: few files come back from $OUT (docs/maintainers.md).
results=$(ls -d metrics plots reports/samples.md data/split data/labels data/activations/nla_meta.yaml 2>/dev/null || true)
[ -n "$results" ] && tar czf "$OUT/results.tgz" $results
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader || true
