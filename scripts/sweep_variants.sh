#!/usr/bin/env bash
# Train and score variants of the default on one set of prepared data, each in its own run folder,
# through the `nla` CLI (no DVC), so a sweep runs on a machine without DVC/Prefect/GX too.
#   DATA=<folder with activations/ split/ labels/> RUN_ROOT=<dir> bash scripts/sweep_variants.sh QUEUE [DEADLINE_S]
# QUEUE: one variant per line, `name|from|stages|key=value ...`, e.g.
#   base|-|av-sft ar-sft rl evaluate|
#   ar600|base|ar-sft rl evaluate|ar_sft.max_steps=600
# `from` names an earlier variant whose checkpoints the stages not listed reuse (`-`: none). A variant
# that lists `label` writes its own labels, and the variants `from` it read them.
# OVERRIDES (space-separated key=value) apply to every variant, e.g. "model.device=cuda model.autocast=bfloat16".
# A variant that finished is skipped on a rerun; none starts after DEADLINE_S seconds. Each variant's
# params, metrics, reports/eval_details.json, reports/eval_rows.jsonl and reports/samples.md stay in
# RUN_ROOT/<name>; stage times go to RUN_ROOT/times.txt.
set -euo pipefail
queue=$(realpath "$1")
deadline=$(($(date +%s) + ${2:-86400}))
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${DATA:?set DATA to a folder holding activations/, split/ and labels/}" "${RUN_ROOT:?set RUN_ROOT}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=$repo
mkdir -p "$RUN_ROOT"
while IFS='|' read -r name from stages overrides; do
  [ -z "$name" ] || [ -f "$RUN_ROOT/$name/done" ] && continue
  if [ "$(date +%s)" -gt "$deadline" ]; then echo "deadline passed: $name not started"; continue; fi
  dir=$RUN_ROOT/$name
  mkdir -p "$dir/data/checkpoints"
  cp "$repo/params.yaml" "$dir/params.yaml"
  for part in activations split; do ln -sfn "$(realpath "$DATA/$part")" "$dir/data/$part"; done
  labels=$DATA/labels  # a variant that relabels writes its own; one whose `from` relabeled reads that one's
  [ "$from" != - ] && [ -d "$RUN_ROOT/$from/data/labels" ] && labels=$RUN_ROOT/$from/data/labels
  case " $stages " in *" label "*) ;; *) ln -sfn "$(realpath "$labels")" "$dir/data/labels" ;; esac
  for checkpoint in av_sft ar_sft rl; do  # the stages this variant does not rerun start from `from`'s outputs
    case " $stages " in *" ${checkpoint/_/-} "*) continue ;; esac
    source=$RUN_ROOT/$from/data/checkpoints/$checkpoint
    if [ "$from" != - ] && [ -d "$source" ] && [ ! -e "$dir/data/checkpoints/$checkpoint" ]; then
      cp -r "$source" "$dir/data/checkpoints/"
    fi
  done
  # shellcheck disable=SC2086  # word splitting is the point: one key=value per word
  (cd "$dir" && python3 - ${OVERRIDES:-} $overrides <<'PY'
import sys

import yaml

from nla.config import set_param

for pair in sys.argv[1:]:
    key, value = pair.split("=", 1)
    set_param("params.yaml", key, yaml.safe_load(value))  # validated: a bad key or value stops the sweep
PY
  )
  for stage in $stages; do
    start=$(date +%s)
    (cd "$dir" && python3 -m nla.cli "$stage" 2>&1 | tr '\r' '\n' | grep -vE "it/s\]$|s/it\]$" | tail -n 20) \
      >"$dir/$stage.log"
    echo "$name $stage $(($(date +%s) - start)) s" | tee -a "$RUN_ROOT/times.txt"
  done
  touch "$dir/done"
done <"$queue"
