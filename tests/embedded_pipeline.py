"""A tiny but real pipeline on the embedded model, built once per test session and shared on disk.

corpus (12 real documents) → extract → split → labels (deterministic "final token + context"
text) → AV-SFT (1 step) → AR-SFT (2 steps, on the labels and 3 of the AV's explanations). Used by the AR, evaluate and explain tests through a
module fixture that calls `shared_run`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from nla.config import NLAConfig

SETTINGS = {
    "corpus": {"max_docs": 12, "foreign": {}},
    "extract": {"max_tokens": 48, "positions_per_doc": 2},
    "split": {"fractions": {"av_sft": 0.34, "ar_sft": 0.33, "rl": 0.0, "eval": 0.33}},
    "av_sft": {"max_steps": 1, "batch_size": 4},
    "ar_sft": {"max_steps": 2, "batch_size": 4, "av_explanations": 3, "av_max_new_tokens": 8},
    "evaluate": {"max_rows": 4, "max_new_tokens": 8, "batch_size": 4, "n_samples": 3},
}


def tiny_labels(rows: pd.DataFrame) -> pd.DataFrame:
    text = [
        f"Final token: '{t.strip()}'. Context: {' '.join(p.split()[-6:])}"
        for t, p in zip(rows.token, rows.prefix, strict=True)
    ]
    return pd.DataFrame(
        {
            "row_id": rows.row_id,
            "doc_id": rows.doc_id,
            "split": rows.split,
            "explanation": text,
            "backend": "test",
            "n_features": 2,
        }
    )


def build(root: Path) -> dict[str, Path]:
    from nla.ar_sft import run_ar_sft
    from nla.av_sft import run_av_sft
    from nla.corpus import run_corpus
    from nla.data import load_rows
    from nla.extract import run_extract, run_split
    from nla.io import write_table

    paths = {k: root / k for k in ("act", "split", "labels", "av", "ar")}
    if (root / "done").exists():
        return paths
    cfg = NLAConfig.model_validate(SETTINGS)
    run_corpus(cfg.corpus, root / "documents.parquet")
    run_extract(cfg, root / "documents.parquet", paths["act"], root / "work")
    run_split(cfg, paths["act"], paths["split"], needed=("av_sft", "ar_sft", "eval"))
    write_table(paths["labels"] / "explanations.parquet", tiny_labels(load_rows(paths["act"], paths["split"])))
    run_av_sft(cfg, paths["act"], paths["split"], paths["labels"], paths["av"], work_dir=root / "work")
    run_ar_sft(
        cfg,
        paths["act"],
        paths["split"],
        paths["labels"],
        paths["ar"],
        av_dir=paths["av"],
        work_dir=root / "work" / "ar_sft",
    )
    (root / "done").touch()
    return paths


def shared_run(tmp_path_factory) -> dict[str, Path]:
    """The run's folders, built on the first call of the session and reused by every later one."""
    root = tmp_path_factory.getbasetemp() / "embedded_run"
    root.mkdir(exist_ok=True)
    return build(root)
