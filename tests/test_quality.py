"""Data-quality gates: real GX suites pass on good data, and each expectation fails on bad data.

Tables are small synthetic ones written with nla.io/nla.sidecar (real parquet + sidecar), so
the gates read exactly what the extract/split/label stages write.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from nla.config import InjectionConfig, NLAConfig
from nla.data import ACTIVATIONS_FILE, EXPLANATIONS_FILE, SPLIT_NAMES, SPLITS_FILE
from nla.errors import NLAError
from nla.expectations import QualityGateError
from nla.io import write_table
from nla.quality import (
    norm_bounds,
    validate_activations,
    validate_explanations,
)
from nla.sidecar import make_meta, write_sidecar

D = 16
N_DOCS = 40
POSITIONS = (8, 12, 20)
ROW = "doc-05:12"  # the row each bad-data case corrupts


# ----------------------------------------------------------------------------- activations


def good_activations() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows = []
    for d in range(N_DOCS):
        for p in POSITIONS:
            direction = rng.standard_normal(D)
            vector = (direction / np.linalg.norm(direction) * np.exp(rng.normal(np.log(10.0), 0.05))).astype(np.float32)
            rows.append(
                {
                    "row_id": f"doc-{d:02d}:{p}",
                    "doc_id": f"doc-{d:02d}",
                    "position": p,
                    "n_tokens": 32,
                    "token_id": 5,
                    "token": " x",
                    "prefix": "text x",
                    "norm": float(np.linalg.norm(vector)),
                    "vector": vector,
                }
            )
    table = pd.DataFrame(rows)
    splits = table[["row_id", "doc_id"]].copy()
    splits["split"] = [SPLIT_NAMES[int(doc[-2:]) % 4] for doc in splits.doc_id]
    return table, splits


def write_activations(root, table: pd.DataFrame, splits: pd.DataFrame, d_model: int = D):
    act, split = root / "act", root / "split"
    write_table(act / ACTIVATIONS_FILE, table)
    write_sidecar(act, make_meta("nla_dataset", "extract", base_model="synthetic", d_model=d_model, layer=2))
    write_table(split / SPLITS_FILE, splits)
    return act, split


def set_vector(table: pd.DataFrame, row_id: str, vector: np.ndarray, keep_norm: bool = False) -> None:
    i = table.index[table.row_id == row_id][0]
    table.at[i, "vector"] = vector.astype(np.float32)
    if not keep_norm:
        table.at[i, "norm"] = float(np.linalg.norm(vector))


def vector_of(table, row_id):
    return table.vector[table.row_id == row_id].iloc[0].copy()


def nan_vector(t, s):
    v = vector_of(t, ROW)
    v[3] = np.nan
    set_vector(t, ROW, v)


def inf_vector(t, s):
    v = vector_of(t, ROW)
    v[0] = np.inf
    set_vector(t, ROW, v)


def zero_vector(t, s):
    set_vector(t, ROW, np.zeros(D))


def scaled_up(t, s):
    set_vector(t, ROW, vector_of(t, ROW) * 100)


def scaled_down(t, s):
    set_vector(t, ROW, vector_of(t, ROW) / 100)


def stale_norm(t, s):
    set_vector(t, ROW, vector_of(t, ROW) * 1.2, keep_norm=True)


def position_past_end(t, s):
    t.loc[t.row_id == ROW, "position"] = 32


def position_too_early(t, s):
    t.loc[t.row_id == ROW, "position"] = 2


def doc_in_two_splits(t, s):
    other = "eval" if s.split[s.row_id == ROW].iloc[0] != "eval" else "rl"
    s.loc[s.row_id == ROW, "split"] = other


def unknown_split(t, s):
    s.loc[s.doc_id == "doc-05", "split"] = "test"


def duplicate_row_id(t, s):
    t.loc[t.row_id == "doc-05:20", "row_id"] = ROW
    s.loc[s.row_id == "doc-05:20", "row_id"] = ROW


def unsplit_row(t, s):
    s.loc[s.doc_id == "doc-05", "row_id"] = "lost"  # the split table no longer covers doc-05's rows


def empty_split(t, s):
    s.loc[s.split == "rl", "split"] = "eval"


ACTIVATION_CASES = [
    # (corruption, expectation name, GX expectation type, text that must appear: the offending row or value)
    (nan_vector, "vector_finite", "expect_column_values_to_be_in_set", ROW),
    (inf_vector, "vector_finite", "expect_column_values_to_be_in_set", ROW),
    (zero_vector, "vector_nonzero", "expect_column_values_to_be_between", ROW),
    (scaled_up, "norm_bounds", "expect_column_values_to_be_between", ROW),
    (scaled_down, "norm_bounds", "expect_column_values_to_be_between", ROW),
    (stale_norm, "norm_column_consistent", "expect_column_values_to_be_between", ROW),
    (
        position_past_end,
        "position_inside_doc",
        "expect_column_pair_values_a_to_be_greater_than_b",
        f"{ROW} (n_tokens=32, position=32)",
    ),
    (position_too_early, "position_after_min", "expect_column_values_to_be_between", f"{ROW} (position=2)"),
    (doc_in_two_splits, "splits_disjoint_by_doc", "expect_column_values_to_be_between", "n_splits_per_doc=2"),
    (unknown_split, "split_known", "expect_column_values_to_be_in_set", "split='test'"),
    (duplicate_row_id, "row_id_unique", "expect_column_values_to_be_unique", ROW),
    (unsplit_row, "split_assigned", "expect_column_values_to_not_be_null", "doc-05:8"),
    (empty_split, "splits_non_empty", "expect_column_distinct_values_to_contain_set", "missing ['rl']"),
]


def test_activations_gate_passes_on_good_data(tmp_path):
    act, split = write_activations(tmp_path, *good_activations())
    report = validate_activations(NLAConfig(), act, split, tmp_path / "report.json")
    assert report["success"] and report["failed"] == []
    assert report["evaluated"] == 15 and report["rows"] == N_DOCS * len(POSITIONS)
    low, high = report["details"]["norm_bounds"]
    assert 5 < low < 9 and 11 < high < 20  # log-normal norms around 10 ± 5%
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["success"] and {e["name"] for e in on_disk["expectations"]} >= {
        "norm_bounds",
        "splits_disjoint_by_doc",
    }


@pytest.mark.parametrize(
    ("corrupt", "name", "gx_type", "shown"), ACTIVATION_CASES, ids=[c[0].__name__ for c in ACTIVATION_CASES]
)
def test_activations_gate_fails_on_bad_data(tmp_path, corrupt, name, gx_type, shown):
    table, splits = good_activations()
    corrupt(table, splits)
    act, split = write_activations(tmp_path, table, splits)
    with pytest.raises(QualityGateError) as err:
        validate_activations(NLAConfig(), act, split, tmp_path / "report.json")
    message = str(err.value)
    assert "\n" not in message
    assert f"{name} {gx_type}" in message and shown in message
    report = json.loads((tmp_path / "report.json").read_text())  # written even on failure
    assert not report["success"] and name in report["failed"]
    failed = next(e for e in report["expectations"] if e["name"] == name)
    assert not failed["success"]


def test_activations_gate_checks_sidecar_dimension(tmp_path):
    act, split = write_activations(tmp_path, *good_activations(), d_model=2 * D)
    with pytest.raises(
        QualityGateError,
        match=r"vector_dim expect_column_values_to_be_in_set\(vector_dim\): 120 of 120 rows, e\.g\. doc-00:8 \(vector_dim=16\)",
    ):
        validate_activations(NLAConfig(), act, split, tmp_path / "report.json")


def test_activations_gate_names_missing_inputs(tmp_path):
    act, _ = write_activations(tmp_path, *good_activations())
    with pytest.raises(NLAError, match="splits.parquet not found; run the split stage"):
        validate_activations(NLAConfig(), act, tmp_path / "nowhere", tmp_path / "report.json")


def test_norm_bounds_ignore_their_own_outliers():
    norms = np.array([10.0, 10.5, 9.5, 10.2, 9.8, 1000.0, 0.0, np.nan])
    low, high = norm_bounds(norms, 0.01, 0.99, 1.0)
    assert 8 < low < 9.5 and 10.5 < high < 12  # neither the ×100 row, nor zero, nor NaN moved the bounds


# ----------------------------------------------------------------------------- explanations

LABEL_SPLITS = ("av_sft", "ar_sft", "eval")
ROW_L = "doc-07:8"  # the row each bad-label case corrupts


def good_explanations(n: int = 60) -> pd.DataFrame:
    topics = ["a court ruling", "rainfall in Sydney", "a cricket match", "interest rates", "a bushfire", "an election"]
    rows = [
        {
            "row_id": f"doc-{i:02d}:8",
            "doc_id": f"doc-{i:02d}",
            "split": LABEL_SPLITS[i % 3],
            "explanation": f"A news report about {topics[i % 6]}; the text lists item {i}. The last token is 'word{i}'.",
            "backend": "baseline",
            "n_features": 2 + i % 2,
        }
        for i in range(n)
    ]
    return pd.DataFrame(rows)


def write_labels(root, frame: pd.DataFrame):
    write_table(root / "labels" / EXPLANATIONS_FILE, frame)
    return root / "labels"


def set_text(text):
    def corrupt(f):
        f.loc[f.row_id == ROW_L, "explanation"] = text

    corrupt.__name__ = f"text_{text!r}"[:40]
    return corrupt


def null_text(f):
    f["explanation"] = f.explanation.astype(object)
    f.loc[f.row_id == ROW_L, "explanation"] = None


def too_few_features(f):
    f.loc[f.row_id == ROW_L, "n_features"] = 1


def many_duplicates(f):
    f.loc[f.index[:40], "explanation"] = "A news report; the last token is 'the'."


def unlabeled_split(f):
    f.loc[f.row_id == ROW_L, "split"] = "rl"


def duplicate_label(f):
    f.loc[f.row_id == "doc-08:8", "row_id"] = ROW_L


def no_eval_rows(f):
    f.loc[f.split == "eval", "split"] = "av_sft"


EXPLANATION_CASES = [
    (set_text(""), "explanation_non_empty", "expect_column_values_to_not_match_regex", ROW_L),
    (set_text("  \n "), "explanation_non_empty", "expect_column_values_to_not_match_regex", ROW_L),
    (null_text, "explanation_present", "expect_column_values_to_not_be_null", ROW_L),
    (set_text("Rain."), "explanation_token_length", "expect_column_values_to_be_between", f"{ROW_L} (n_tokens=2)"),
    (
        set_text(" ".join(["word"] * 300)),
        "explanation_token_length",
        "expect_column_values_to_be_between",
        f"{ROW_L} (n_tokens=300)",
    ),
    (
        set_text("<analysis>A report about rain; the last token is 'the'."),
        "explanation_well_formed",
        "expect_column_values_to_not_match_regex",
        ROW_L,
    ),
    (
        set_text("A report about rain; the last token is 'the'.</analysis>"),
        "explanation_well_formed",
        "expect_column_values_to_not_match_regex",
        ROW_L,
    ),
    (
        set_text("A report about rain; the last token is 'the'.<|im_end|>"),
        "explanation_well_formed",
        "expect_column_values_to_not_match_regex",
        ROW_L,
    ),
    (
        set_text("A report about rain \u3200; the last token is 'the'."),
        "no_marker_char",
        "expect_column_values_to_not_match_regex",
        ROW_L,
    ),
    (
        set_text("A report about rain \u25a0; the last token is 'the'."),
        "no_marker_char",
        "expect_column_values_to_not_match_regex",
        ROW_L,
    ),
    (too_few_features, "min_features", "expect_column_values_to_be_between", f"{ROW_L} (n_features=1)"),
    (
        many_duplicates,
        "duplicate_rate",
        "expect_column_proportion_of_unique_values_to_be_between",
        "a news report; the last token is 'the'.",
    ),
    (unlabeled_split, "split_labeled", "expect_column_values_to_be_in_set", f"{ROW_L} (split='rl')"),
    (duplicate_label, "row_id_unique", "expect_column_values_to_be_unique", ROW_L),
    (no_eval_rows, "splits_non_empty", "expect_column_distinct_values_to_contain_set", "missing ['eval']"),
]


@pytest.fixture(scope="module")
def tokenizer():
    from nla.models import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("embedded"))


def test_explanations_gate_passes_on_good_data(tmp_path):
    labels = write_labels(tmp_path, good_explanations())
    report = validate_explanations(NLAConfig(), labels, tmp_path / "report.json")  # loads the model's tokenizer itself
    assert report["success"] and report["evaluated"] == 13 and report["rows"] == 60
    assert report["details"]["duplicate_rate"] == 0.0
    assert 15 < report["details"]["token_length"]["median"] < 40
    assert json.loads((tmp_path / "report.json").read_text())["success"]


@pytest.mark.parametrize(
    ("corrupt", "name", "gx_type", "shown"), EXPLANATION_CASES, ids=[c[0].__name__ for c in EXPLANATION_CASES]
)
def test_explanations_gate_fails_on_bad_data(tmp_path, tokenizer, corrupt, name, gx_type, shown):
    frame = good_explanations()
    corrupt(frame)
    labels = write_labels(tmp_path, frame)
    with pytest.raises(QualityGateError) as err:
        validate_explanations(NLAConfig(), labels, tmp_path / "report.json", tokenizer=tokenizer)
    message = str(err.value)
    assert "\n" not in message
    assert f"{name} {gx_type}" in message and shown in message
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["success"] and name in report["failed"]


def test_explanations_gate_uses_configured_marker_char(tmp_path, tokenizer):
    frame = good_explanations()
    frame.loc[frame.row_id == ROW_L, "explanation"] = "A report about rain ¤; the last token is 'the'."
    labels = write_labels(tmp_path, frame)
    validate_explanations(NLAConfig(), labels, tmp_path / "ok.json", tokenizer=tokenizer)  # ¤ is no marker by default
    cfg = NLAConfig(injection=InjectionConfig(marker_char="¤"))
    with pytest.raises(QualityGateError, match=f"no_marker_char .* e\\.g\\. {ROW_L}"):
        validate_explanations(cfg, labels, tmp_path / "bad.json", tokenizer=tokenizer)


def test_explanations_gate_names_missing_columns(tmp_path, tokenizer):
    labels = write_labels(tmp_path, good_explanations().drop(columns=["n_features"]))
    with pytest.raises(NLAError, match=r"lacks columns \['n_features'\]"):
        validate_explanations(NLAConfig(), labels, tmp_path / "report.json", tokenizer=tokenizer)
    assert not (tmp_path / "report.json").exists()  # unreadable input is an error, not a gate result
