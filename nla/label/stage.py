"""`run_label`: the label stage wired from its parts (rows -> backend -> parser -> four files).

Outputs in `out_dir`, written together or not at all:

    explanations.parquet   row_id, doc_id, split, explanation, backend, n_features
    failed.parquet         row_id, reason, raw (the first RAW_KEEP characters)
    label_stats.json       counts and failure reasons
    nla_meta.yaml          the activations' sidecar plus what produced the labels (never the API key)

How this run went (timing, cache hits, requests, retries, status codes, tokens generated)
goes to a provenance file instead (`nla.provenance`): a rerun answered from the cache then
writes the same four files, and DVC reruns nothing downstream of a change to, say,
`label.openai.concurrency`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

import nla.distributed as distributed
from nla.config import NLAConfig
from nla.data import EXPLANATIONS_FILE, ROW_SPLITS, load_rows
from nla.errors import NLAError
from nla.io import atomic_dir, write_json, write_table
from nla.label.backends import BACKENDS, BackendStats, Result
from nla.label.backends.base import RowProgress
from nla.label.backends.openai import redact_url
from nla.label.parse import ANALYSIS_CLOSE, ANALYSIS_OPEN, FEATURE_SEP, parse_response
from nla.label.progress import LabelProgress
from nla.label.prompt import FEW_SHOT, context_of
from nla.provenance import beside, write_provenance
from nla.sidecar import make_meta, read_sidecar, write_sidecar

log = logging.getLogger(__name__)

FAILED_FILE = "failed.parquet"
STATS_FILE = "label_stats.json"
RAW_KEEP = 1000  # characters of a failed row's raw response kept in failed.parquet


def labeler_description(cfg: NLAConfig, model: str) -> dict[str, Any]:
    """What produced the labels, for the sidecar: backend, model, prompt verbatim. Never the API key."""
    lab = cfg.label
    desc: dict[str, Any] = {
        "backend": lab.backend,
        "model": model,
        "instruction": lab.instruction,
        "user_template": lab.user_template,
        "few_shot": [list(ex) for ex in FEW_SHOT] if lab.backend in ("local", "openai") else [],
        "answer_tags": [ANALYSIS_OPEN, ANALYSIS_CLOSE],
        "feature_separator": FEATURE_SEP,
        "context_tokens": lab.context_tokens,
        "min_features": lab.min_features,
        "temperature": lab.temperature,
    }
    if lab.backend == "local":
        desc.update(max_new_tokens=lab.max_new_tokens, seed=lab.seed, dtype=lab.dtype)
    if lab.backend == "openai":
        desc.update(
            base_url=redact_url(lab.openai.base_url),
            api_key_env=lab.openai.api_key_env,
            max_tokens=lab.openai.max_tokens,
        )
    return desc


def run_label(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    out_dir: str | Path,
    *,
    provenance_path: str | Path | None = None,
) -> pd.DataFrame:
    """Label the rows of `label.splits`; write explanations, failed rows, stats and the sidecar.

    The run's own facts go to `provenance_path` (default: `<out_dir>_provenance.json` beside it).
    """
    lab = cfg.label
    unknown = sorted(set(lab.splits) - set(ROW_SPLITS))
    if unknown or not lab.splits:
        raise NLAError(f"label.splits={lab.splits} must be a non-empty subset of {list(ROW_SPLITS)}; fix params.yaml")
    rows = load_rows(activations_dir, splits_dir, lab.splits)
    if rows.empty:
        raise NLAError(f"no activation rows in splits {lab.splits}; check split.fractions and label.splits")
    contexts = [context_of(p, lab.context_tokens) for p in rows.prefix]
    tokens = rows.token.tolist()

    started = time.perf_counter()
    stats = BackendStats()
    next_tokens = rows.next_tokens.map(list).tolist() if "next_tokens" in rows.columns else None
    stats.progress = progress = LabelProgress(cfg, len(rows), stats)

    def ask_once() -> tuple[list[Result], BackendStats]:
        results = BACKENDS[lab.backend](cfg, contexts, tokens, stats, next_tokens)
        return results, replace(stats, progress=RowProgress())  # the live bar stays with this process

    try:
        if lab.backend == "local":  # shares its decoding batches out over the processes of a launch
            results = BACKENDS[lab.backend](cfg, contexts, tokens, stats, next_tokens)
        else:  # a server or a rule does the work: ask once, not once per process
            results, stats = distributed.main_computes(ask_once)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started

    good, bad = [], []
    for row, result in zip(rows.itertuples(index=False), results, strict=True):
        if result.raw is None:
            bad.append({"row_id": row.row_id, "reason": f"request_failed:{result.error}", "raw": ""})
            continue
        parsed = parse_response(result.raw, lab.min_features, cfg.injection.marker_ranges, cfg.injection.marker_char)
        if parsed.reason is None:
            good.append(
                {
                    "row_id": row.row_id,
                    "doc_id": row.doc_id,
                    "split": row.split,
                    "explanation": parsed.explanation,
                    "backend": lab.backend,
                    "n_features": parsed.n_features,
                }
            )
        else:
            bad.append({"row_id": row.row_id, "reason": parsed.reason, "raw": result.raw[:RAW_KEEP]})
    explanations = pd.DataFrame(good, columns=["row_id", "doc_id", "split", "explanation", "backend", "n_features"])
    explanations["n_features"] = explanations.n_features.astype("int64")
    failed = pd.DataFrame(bad, columns=["row_id", "reason", "raw"]).astype(str)

    reasons = Counter(failed.reason)
    label_stats = {
        "rows": len(rows),
        "labeled": len(explanations),
        "failed": len(failed),
        "failed_by_reason": dict(sorted(reasons.items())),
        "malformed_rate": sum(n for r, n in reasons.items() if not r.startswith("request_failed")) / len(rows),
        "labeled_by_split": {s: int((explanations.split == s).sum()) for s in lab.splits if (rows.split == s).any()},
        "backend": lab.backend,
        "model": stats.model,
    }
    run_facts = {
        "seconds": round(elapsed, 3),
        "rows_per_s": round(len(rows) / max(elapsed, 1e-9), 3),
        "cache_hits": stats.cache_hits,
        "requests": stats.requests,
        "retries": stats.retries,
        "retry_seconds": round(stats.retry_seconds, 3),
        "status_codes": dict(sorted(stats.status_codes.items())),
        "peak_inflight": stats.peak_inflight,
        "generated_tokens": stats.generated_tokens,
    }
    if lab.backend == "openai":
        label_stats["retry_budget_s"] = lab.openai.retry_budget_s
    meta = read_sidecar(activations_dir)
    meta.update(
        make_meta(
            "nla_dataset",
            "label",
            labeler=labeler_description(cfg, stats.model),
            rows=len(explanations),
            documents=int(explanations.doc_id.nunique()),
            failed_rows=len(failed),
            labeled_by_split=label_stats["labeled_by_split"],
            parents=[str(activations_dir), str(splits_dir)],
        )
    )
    if distributed.is_main():
        with atomic_dir(out_dir) as tmp:  # the four files appear together or not at all
            write_table(tmp / EXPLANATIONS_FILE, explanations)
            write_table(tmp / FAILED_FILE, failed)
            write_json(tmp / STATS_FILE, label_stats)
            write_sidecar(tmp, meta)
        write_provenance(provenance_path or beside(out_dir), "label", **run_facts)
    distributed.barrier()
    log.info("labeled %d/%d rows (%s), failed %s", len(explanations), len(rows), lab.backend, dict(reasons))
    return explanations
