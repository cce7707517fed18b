"""The data layer: the stage tables, their file names, and the one way to read rows.

Learned from SAELens' `ActivationsStore`: one object-free module that every stage, the RL
loop and evaluation read through, so file names, split names, the row join and padding are
spelled once. Tables:

    data/activations/activations.parquet   row_id, doc_id, position, n_tokens, token_id, token, prefix, norm, vector
    data/split/splits.parquet               row_id, doc_id, split
    data/labels/explanations.parquet        row_id, doc_id, split, explanation, backend, n_features

Each folder also holds `nla_meta.yaml` (see `nla.sidecar`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nla.errors import NLAError
from nla.io import read_table
from nla.sidecar import read_sidecar, require, sidecar_path

ACTIVATIONS_FILE = "activations.parquet"
SPLITS_FILE = "splits.parquet"
EXPLANATIONS_FILE = "explanations.parquet"
SPLIT_NAMES = ("av_sft", "ar_sft", "rl", "eval")  # the corpus' own documents, assigned by `nla split`
FOREIGN = "foreign"  # documents of `corpus.foreign`: evaluated, never trained on
ROW_SPLITS = (*SPLIT_NAMES, FOREIGN)  # every value the split column can hold


def load_rows(
    activations_dir: str | Path,
    splits_dir: str | Path,
    splits: list[str] | tuple[str, ...] | None = None,
    *,
    d_model: int | None = None,
    layer: int | None = None,
) -> pd.DataFrame:
    """Activation rows joined with their split, optionally filtered, after a sidecar check."""
    require(read_sidecar(activations_dir), where=str(activations_dir), d_model=d_model, layer=layer)
    table = read_table(Path(activations_dir) / ACTIVATIONS_FILE)
    split = read_table(Path(splits_dir) / SPLITS_FILE, columns=["row_id", "split"])
    table = table.merge(split, on="row_id", how="inner", validate="one_to_one")
    if splits is not None:
        table = table[table.split.isin(list(splits))].reset_index(drop=True)
    return table


def labeled_rows(
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    splits: list[str] | tuple[str, ...],
    *,
    d_model: int | None = None,
    layer: int | None = None,
) -> pd.DataFrame:
    """Activation rows of `splits` joined with their explanation; rows without a non-empty one are dropped."""
    path = Path(labels_dir) / EXPLANATIONS_FILE
    if not path.is_file():
        raise NLAError(f"{path} not found; run the label stage first (`nla label` or `dvc repro label`)")
    if sidecar_path(labels_dir).is_file():
        act_meta = read_sidecar(activations_dir)
        require(read_sidecar(labels_dir), where=str(labels_dir), d_model=act_meta["d_model"], layer=act_meta["layer"])
    labels = read_table(path, columns=["row_id", "explanation"])
    rows = load_rows(activations_dir, splits_dir, splits, d_model=d_model, layer=layer)
    rows = rows.merge(labels, on="row_id", how="inner", validate="one_to_one")
    rows = rows[rows.explanation.str.strip().str.len() > 0].reset_index(drop=True)
    if rows.empty:
        raise NLAError(
            f"no labeled rows in splits {list(splits)}: {path} shares no row_id with them; "
            "re-run the label stage on the current split (label.splits)"
        )
    return rows


def vectors_of(frame: pd.DataFrame, column: str = "vector") -> np.ndarray:
    """The (rows, d) float32 matrix of a vector column."""
    if len(frame) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(frame[column].to_numpy()).astype(np.float32)


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (len(seqs), longest) int64, padded on `side` ('right' or 'left')."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[r, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[r, span] = 1
    return ids, mask
