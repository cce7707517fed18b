"""Data-quality gates: Great Expectations suites between the data stages.

Each gate computes derived columns in pandas (vector dimension, finiteness, norm, splits per
document, explanation length, ...), runs one GX expectation suite on them, and writes a JSON
report with every expectation, its observed values and a few offending rows. The report is
written even when the gate fails; then `QualityGateError` is raised with one line naming the
failed expectations and their offending rows, which stops `dvc repro` and the Prefect flow.

Norm bounds are derived from the data and widened in log space (norms are multiplicative):
with quantiles ``lo = Q(q_low)``, ``hi = Q(q_high)`` and ``r = hi / lo``, a row passes when
``lo / r**margin <= ‖v‖ <= hi * r**margin``. The quantiles are taken inward (the low one
rounds up to a data point, the high one rounds down), so the most extreme row never sets its
own bound, even on tiny tables: a vector scaled ×100 or ×0.01 fails, a zero vector fails.

Explanation length is counted in tokens of the subject model's tokenizer: that is the unit the
AV writes explanations in (RL caps them in tokens) and the AR reads them in.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nla.config import NLAConfig, NLAError
from nla.extract import ACTIVATIONS_FILE, SPLIT_NAMES, SPLITS_FILE
from nla.io import read_table, write_json
from nla.sidecar import read_sidecar

EXPLANATIONS_FILE = "explanations.parquet"
EXPLANATION_COLUMNS = ("row_id", "doc_id", "split", "explanation", "backend", "n_features")
FORMAT_TAGS = ("analysis", "explanation", "concept")  # tags of the labeler and AV prompts
N_OFFENDING = 5  # offending rows kept per expectation in the report
N_MESSAGE = 3  # ... and shown in the error message
INDEX = "row_id"  # offending rows are named by this column


class QualityGateError(NLAError):
    """A data-quality gate failed: the message names the expectations and offending rows."""


# ----------------------------------------------------------------------------- running a suite


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and nested containers as plain JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # NaN/inf are not valid JSON
    return value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return str(value)


def run_suite(
    gate: str,
    frame: pd.DataFrame,
    expectations: list,
    *,
    extra_offending: dict[str, list[dict]] | None = None,
) -> list[dict[str, Any]]:
    """Validate `frame` against GX `expectations` (each with meta["name"]); one summary dict per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(gate).add_dataframe_asset(gate).add_batch_definition_whole_dataframe(gate)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=gate, expectations=expectations))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": N_OFFENDING,
        "unexpected_index_column_names": [INDEX],
    }
    validation = batch.validate(suite, result_format=result_format)

    by_name = {r.expectation_config.meta["name"]: r for r in validation.results}
    summaries = []
    for expectation in expectations:  # suite order, not GX's (it reorders results)
        name = expectation.meta["name"]
        r = by_name[name]
        config, result = r.expectation_config, dict(r.result)
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        offending = [
            {INDEX: row.get(INDEX), **{k: v for k, v in row.items() if k != INDEX}}
            for row in result.get("partial_unexpected_index_list") or []
        ]
        if not offending and not r.success:
            offending = (extra_offending or {}).get(name, [])
        summary = {
            "name": name,
            "expectation": config.type,
            "description": config.description,
            "kwargs": kwargs,
            "success": bool(r.success),
            "observed": {
                k: result[k]
                for k in (
                    "element_count",
                    "unexpected_count",
                    "unexpected_percent",
                    "missing_count",
                    "observed_value",
                    "partial_missing_list",
                )
                if k in result
            },
            "offending": offending,
        }
        if r.exception_info.get("raised_exception"):
            summary["success"] = False
            summary["observed"]["exception"] = str(r.exception_info.get("exception_message")).splitlines()[0]
        summaries.append(_plain(summary))
    return summaries


def expect(cls, name: str, description: str, **kwargs):
    """A GX expectation tagged with our short name (reports and messages use it)."""
    return cls(meta={"name": name}, description=description, **kwargs)


def _columns_of(config: Any) -> str:
    kwargs = {k: v for k, v in config.items() if k.startswith("column")}
    return ",".join(str(v) for v in kwargs.values())


def _describe_failure(s: dict[str, Any]) -> str:
    columns = _columns_of(s["kwargs"])
    head = f"{s['name']} {s['expectation']}" + (f"({columns})" if columns else "")
    obs = s["observed"]
    if "exception" in obs:
        return f"{head} raised {obs['exception']}"
    parts = []
    if "unexpected_count" in obs:
        parts.append(f"{obs['unexpected_count']} of {obs['element_count']} rows")
    elif "observed_value" in obs and obs["observed_value"] is not None:
        parts.append(f"observed {_short(obs['observed_value'])}")
    if obs.get("partial_missing_list"):
        parts.append(f"missing {obs['partial_missing_list']}")
    rows = []
    for row in s["offending"][:N_MESSAGE]:
        values = ", ".join(f"{k}={_short(v)}" for k, v in row.items() if k != INDEX)
        rows.append(f"{row.get(INDEX)} ({values})" if values else str(row.get(INDEX)))
    if rows:
        parts.append("e.g. " + "; ".join(rows))
    return f"{head}: " + ", ".join(parts) if parts else head


def finish_gate(
    gate: str,
    summaries: list[dict[str, Any]],
    report_path: str | Path,
    started: float,
    rows: int,
    details: dict[str, Any],
) -> dict[str, Any]:
    """Write the report (always) and raise QualityGateError when any expectation failed."""
    failed = [s for s in summaries if not s["success"]]
    report = {
        "gate": gate,
        "success": not failed,
        "rows": rows,
        "evaluated": len(summaries),
        "failed": [s["name"] for s in failed],
        "elapsed_s": round(time.perf_counter() - started, 3),
        "details": _plain(details),
        "expectations": summaries,
    }
    write_json(report_path, report)
    if failed:
        reasons = " | ".join(_describe_failure(s) for s in failed)
        raise QualityGateError(
            f"quality gate '{gate}' failed {len(failed)} of {len(summaries)} expectations: {reasons} "
            f"(full report: {report_path}; fix the upstream stage or the quality.* params)"
        )
    return report


# ----------------------------------------------------------------------------- activations


def norm_bounds(norms: np.ndarray, q_low: float, q_high: float, margin: float) -> tuple[float, float]:
    """Bounds for plausible norms, widened in log space; computed on finite positive norms only."""
    good = np.log(norms[np.isfinite(norms) & (norms > 0)])
    if len(good) == 0:
        return 0.0, 0.0  # nothing plausible to learn from: every row fails the bound
    lo = np.quantile(good, q_low, method="higher")  # inward: the smallest row never sets the low bound
    hi = np.quantile(good, q_high, method="lower")  # inward: the largest row never sets the high bound
    width = hi - lo
    return float(np.exp(lo - margin * width)), float(np.exp(hi + margin * width))


def vector_stats(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dimension, all-finite flag, L2 norm) per row; rows may have different lengths."""
    dims = np.fromiter((len(v) for v in vectors), dtype=np.int64, count=len(vectors))
    if len(vectors) and (dims == dims[0]).all():
        matrix = np.stack(vectors).astype(np.float64)
        return dims, np.isfinite(matrix).all(axis=1), np.linalg.norm(matrix, axis=1)
    rows = [np.asarray(v, dtype=np.float64) for v in vectors]
    finite = np.array([np.isfinite(v).all() for v in rows], dtype=bool)
    norms = np.array([np.linalg.norm(v) for v in rows], dtype=np.float64)
    return dims, finite, norms


def activation_frame(activations_dir: str | Path, splits_dir: str | Path) -> pd.DataFrame:
    """The activations table joined (left) with its split, plus the derived columns the suite checks."""
    path = Path(activations_dir) / ACTIVATIONS_FILE
    split_path = Path(splits_dir) / SPLITS_FILE
    for p, stage in ((path, "extract"), (split_path, "split")):
        if not p.is_file():
            raise NLAError(f"{p} not found; run the {stage} stage first (`dvc repro {stage}`)")
    table = read_table(path, columns=["row_id", "doc_id", "position", "n_tokens", "norm", "vector"])
    splits = read_table(split_path, columns=["row_id", "split"]).drop_duplicates("row_id")
    frame = table.merge(splits, on="row_id", how="left")
    dims, finite, norms = vector_stats(frame.pop("vector").to_numpy())
    frame["vector_dim"] = dims
    frame["is_finite"] = finite
    frame["stored_norm"] = frame.pop("norm").astype(np.float64)
    frame["norm"] = norms
    scale = np.maximum(np.maximum(frame.stored_norm, frame.norm), 1e-12)  # symmetric: the error lies in [0, 1]
    frame["norm_rel_error"] = (frame.stored_norm - frame.norm).abs() / scale
    frame["n_splits_per_doc"] = frame.groupby("doc_id").split.transform("nunique")
    return frame


def validate_activations(
    cfg: NLAConfig, activations_dir: str | Path, splits_dir: str | Path, report_path: str | Path
) -> dict[str, Any]:
    """Gate on the activations table and its splits; returns the report, raises QualityGateError on failure."""
    started = time.perf_counter()  # the report's elapsed_s includes the GX import
    import great_expectations.expectations as gxe

    q = cfg.quality
    d_model = read_sidecar(activations_dir)["d_model"]
    frame = activation_frame(activations_dir, splits_dir)
    low, high = norm_bounds(frame.norm.to_numpy(), q.norm_quantile_low, q.norm_quantile_high, q.norm_margin)
    required_splits = [s for s in SPLIT_NAMES if cfg.split.fractions[s] > 0]

    expectations = [
        expect(gxe.ExpectTableRowCountToBeBetween, "table_not_empty", "at least one activation row", min_value=1),
        expect(gxe.ExpectColumnValuesToNotBeNull, "row_id_present", "every row has a row_id", column="row_id"),
        expect(gxe.ExpectColumnValuesToBeUnique, "row_id_unique", "row_ids are unique", column="row_id"),
        expect(gxe.ExpectColumnValuesToNotBeNull, "doc_id_present", "every row has a doc_id", column="doc_id"),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "vector_finite",
            "no NaN/inf in any vector",
            column="is_finite",
            value_set=[True],
        ),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "vector_dim",
            f"vector length equals the sidecar's d_model={d_model}",
            column="vector_dim",
            value_set=[d_model],
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "vector_nonzero",
            "no all-zero vectors",
            column="norm",
            min_value=0,
            strict_min=True,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "norm_bounds",
            f"norms inside [{low:.4g}, {high:.4g}] (quantiles {q.norm_quantile_low}/{q.norm_quantile_high}, "
            f"log margin {q.norm_margin})",
            column="norm",
            min_value=low,
            max_value=high,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "norm_column_consistent",
            "stored norm equals the vector's norm",
            column="norm_rel_error",
            max_value=q.max_norm_rel_error,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "position_after_min",
            f"positions >= extract.min_position={cfg.extract.min_position}",
            column="position",
            min_value=cfg.extract.min_position,
        ),
        expect(
            gxe.ExpectColumnPairValuesAToBeGreaterThanB,
            "position_inside_doc",
            "position < n_tokens of its document",
            column_A="n_tokens",
            column_B="position",
        ),
        expect(gxe.ExpectColumnValuesToNotBeNull, "split_assigned", "every row has a split", column="split"),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "split_known",
            f"splits are among {list(SPLIT_NAMES)}",
            column="split",
            value_set=list(SPLIT_NAMES),
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "splits_disjoint_by_doc",
            "each document lies in exactly one split",
            column="n_splits_per_doc",
            min_value=1,
            max_value=1,
        ),
        expect(
            gxe.ExpectColumnDistinctValuesToContainSet,
            "splits_non_empty",
            f"every split with a positive fraction has rows: {required_splits}",
            column="split",
            value_set=required_splits,
        ),
    ]
    summaries = run_suite("activations", frame, expectations)
    finite_norms = frame.norm[np.isfinite(frame.norm)]
    details = {
        "d_model": d_model,
        "norm_bounds": [low, high],
        "norm_quantiles": {str(p): float(np.quantile(finite_norms, p)) for p in (0.0, 0.01, 0.5, 0.99, 1.0)}
        if len(finite_norms)
        else {},
        "split_rows": {str(k): int(v) for k, v in frame.split.value_counts().items()},
        "documents": int(frame.doc_id.nunique()),
    }
    return finish_gate("activations", summaries, report_path, started, len(frame), details)


# ----------------------------------------------------------------------------- explanations


def _char_class(ranges: list[tuple[int, int]], extra: str | None) -> str:
    parts = [f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges]
    if extra:
        parts += [f"\\U{ord(c):08x}" for c in extra]
    return "[" + "".join(parts) + "]"


def malformed_regex(special_tokens: list[str], prompt_texts: list[str]) -> str:
    """Leftover format tags (labeler/prompt tags, even unclosed) or special tokens of the tokenizer."""
    tags = set(FORMAT_TAGS) | {m for text in prompt_texts for m in re.findall(r"</?\s*([A-Za-z_]\w*)\s*>", text)}
    alternatives = [r"</?\s*(?:" + "|".join(sorted(tags)) + r")\b"]
    alternatives += [re.escape(t) for t in sorted(set(special_tokens)) if t]
    return "|".join(alternatives)


def dedup_key(texts: pd.Series) -> pd.Series:
    """Explanations compared for duplicates: case and whitespace do not make a text new."""
    return texts.fillna("").str.lower().str.split().str.join(" ")


def explanation_frame(labels_dir: str | Path, tokenizer) -> pd.DataFrame:
    path = Path(labels_dir) / EXPLANATIONS_FILE
    if not path.is_file():
        raise NLAError(f"{path} not found; run the label stage first (`dvc repro label`)")
    frame = read_table(path)
    missing = [c for c in EXPLANATION_COLUMNS if c not in frame.columns]
    if missing:
        raise NLAError(f"{path} lacks columns {missing}; rebuild it with the label stage of this version of nla")
    frame = frame[list(EXPLANATION_COLUMNS)].copy()
    texts = frame.explanation.fillna("").astype(str).tolist()
    frame["n_tokens"] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    frame["dedup_key"] = dedup_key(frame.explanation)
    return frame


def validate_explanations(
    cfg: NLAConfig, labels_dir: str | Path, report_path: str | Path, *, tokenizer=None
) -> dict[str, Any]:
    """Gate on the warm-start explanations; `tokenizer` defaults to the subject model's (cfg.model)."""
    started = time.perf_counter()  # the report's elapsed_s includes the GX import
    import great_expectations.expectations as gxe

    q, inj = cfg.quality, cfg.injection
    if tokenizer is None:
        from nla.models import load_tokenizer, resolve_source

        tokenizer = load_tokenizer(resolve_source(cfg.model.name, cfg.model.gguf_file, cfg.model.revision))
    frame = explanation_frame(labels_dir, tokenizer)
    marker = _char_class(inj.marker_ranges, inj.marker_char)
    prompts = [cfg.prompts.av_user, cfg.prompts.av_answer_open, cfg.prompts.av_answer_close]
    malformed = malformed_regex(list(tokenizer.all_special_tokens), prompts)

    counts = frame.dedup_key.value_counts()
    duplicated = counts[counts > 1]
    duplicate_rate = 1 - len(counts) / len(frame) if len(frame) else 0.0
    top_duplicates = [
        {"row_id": ",".join(frame.row_id[frame.dedup_key == key].head(3)), "explanation": key, "count": int(n)}
        for key, n in duplicated.head(N_OFFENDING).items()
    ]

    expectations = [
        expect(gxe.ExpectTableRowCountToBeBetween, "table_not_empty", "at least one explanation", min_value=1),
        expect(gxe.ExpectColumnValuesToNotBeNull, "row_id_present", "every explanation has a row_id", column="row_id"),
        expect(
            gxe.ExpectColumnValuesToBeUnique, "row_id_unique", "one explanation per activation row", column="row_id"
        ),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "split_labeled",
            f"splits are among label.splits={cfg.label.splits}",
            column="split",
            value_set=list(cfg.label.splits),
        ),
        expect(
            gxe.ExpectColumnDistinctValuesToContainSet,
            "splits_non_empty",
            f"every labeled split has explanations: {cfg.label.splits}",
            column="split",
            value_set=list(cfg.label.splits),
        ),
        expect(
            gxe.ExpectColumnValuesToNotBeNull, "explanation_present", "no missing explanation", column="explanation"
        ),
        expect(
            gxe.ExpectColumnValuesToNotMatchRegex,
            "explanation_non_empty",
            "no empty/whitespace-only explanation",
            column="explanation",
            regex=r"^\s*$",
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "explanation_token_length",
            f"{q.min_explanation_tokens}..{q.max_explanation_tokens} tokens of the subject model's tokenizer",
            column="n_tokens",
            min_value=q.min_explanation_tokens,
            max_value=q.max_explanation_tokens,
        ),
        expect(
            gxe.ExpectColumnValuesToNotMatchRegex,
            "explanation_well_formed",
            "no leftover <analysis>/prompt tags or special tokens",
            column="explanation",
            regex=malformed,
        ),
        expect(
            gxe.ExpectColumnValuesToNotMatchRegex,
            "no_marker_char",
            "no character of injection.marker_ranges/marker_char (it would add injection sites)",
            column="explanation",
            regex=marker,
        ),
        expect(
            gxe.ExpectColumnValuesToNotBeNull,
            "n_features_present",
            "every row counts its features",
            column="n_features",
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "min_features",
            f"n_features >= quality.min_features={q.min_features}",
            column="n_features",
            min_value=q.min_features,
        ),
        expect(
            gxe.ExpectColumnProportionOfUniqueValuesToBeBetween,
            "duplicate_rate",
            f"duplicate rate <= quality.max_duplicate_rate={q.max_duplicate_rate}",
            column="dedup_key",
            min_value=1 - q.max_duplicate_rate,
        ),
    ]
    summaries = run_suite("explanations", frame, expectations, extra_offending={"duplicate_rate": top_duplicates})
    details = {
        "duplicate_rate": duplicate_rate,
        "top_duplicates": top_duplicates,
        "token_length": {
            "min": int(frame.n_tokens.min()),
            "median": float(frame.n_tokens.median()),
            "max": int(frame.n_tokens.max()),
        }
        if len(frame)
        else {},
        "split_rows": {str(k): int(v) for k, v in frame.split.value_counts().items()},
        "backends": {str(k): int(v) for k, v in frame.backend.value_counts().items()},
        "marker_regex": marker,
        "malformed_regex": malformed,
    }
    return finish_gate("explanations", summaries, report_path, started, len(frame), details)
