"""Atomic writes and the table formats shared by every stage.

Nothing is ever written in place: files go to a temporary name in the same folder and are
renamed over the target, so a crash leaves either the old file or the new one, never a
half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nla.errors import NLAError


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; it replaces `target` (a checkpoint, say) only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def write_table(path: str | Path, frame: pd.DataFrame, vector_columns: tuple[str, ...] = ("vector",)) -> None:
    """Parquet, atomically. `vector_columns` (1-D float arrays) become fixed-size float32 lists; other list-like
    cells (a row's predicted tokens, say) plain lists, whether they arrive as lists or as arrays read back."""
    columns = {}
    for name in frame.columns:
        col = frame[name]
        if len(col) and name in vector_columns and isinstance(col.iloc[0], np.ndarray):
            matrix = np.stack(col.to_numpy()).astype(np.float32)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        elif col.dtype == object:
            columns[name] = pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in col])
        else:
            columns[name] = pa.array(col.to_numpy())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet table; a missing or unreadable file is an NLAError that says which stage to run."""
    if not Path(path).is_file():
        raise NLAError(f"{path} not found; run the stage that writes it first (`dvc repro` runs them in order)")
    try:
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowException, OSError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise NLAError(
            f"{path} is not a readable table ({first}); delete it and rerun the stage that writes it"
        ) from None
