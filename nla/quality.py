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

from nla.config import NLAConfig
from nla.data import ACTIVATIONS_FILE, EXPLANATIONS_FILE, FOREIGN, ROW_SPLITS, SPLIT_NAMES, SPLITS_FILE
from nla.errors import NLAError
from nla.expectations import N_OFFENDING, expect, finish_gate, run_suite
from nla.io import read_table
from nla.models import load_tokenizer, resolve_source
from nla.sidecar import read_sidecar

EXPLANATION_COLUMNS = ("row_id", "doc_id", "split", "explanation", "backend", "n_features")
FORMAT_TAGS = ("analysis", "explanation", "concept")  # tags of the labeler and AV prompts
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
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    report_path: str | Path,
    *,
    provenance_path: str | Path | None = None,
) -> dict[str, Any]:
    """Gate on the activations table and its splits; returns the report, raises QualityGateError on failure."""
    started = time.perf_counter()  # the gate's time (its provenance) includes the GX import
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
            f"splits are among {list(ROW_SPLITS)}",
            column="split",
            value_set=list(ROW_SPLITS),
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
    return finish_gate("activations", summaries, report_path, started, len(frame), details, provenance_path)


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
    cfg: NLAConfig,
    labels_dir: str | Path,
    report_path: str | Path,
    *,
    tokenizer=None,
    provenance_path: str | Path | None = None,
) -> dict[str, Any]:
    """Gate on the warm-start explanations; `tokenizer` defaults to the subject model's (cfg.model)."""
    started = time.perf_counter()  # the gate's time (its provenance) includes the GX import
    import great_expectations.expectations as gxe

    q, inj = cfg.quality, cfg.injection
    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_source(cfg.model.name, cfg.model.gguf_file, cfg.model.revision))
    frame = explanation_frame(labels_dir, tokenizer)
    required = [s for s in cfg.label.splits if s != FOREIGN]  # a corpus may have no foreign set
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
            f"every labeled split of the corpus has explanations: {required}",
            column="split",
            value_set=required,
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
    return finish_gate("explanations", summaries, report_path, started, len(frame), details, provenance_path)
