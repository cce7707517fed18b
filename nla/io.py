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


REBUILD = "delete it and rerun the stage that writes it"


def read_table(path: str | Path, columns: list[str] | None = None, fix: str = REBUILD) -> pd.DataFrame:
    """A parquet table; a missing or unreadable file is an NLAError that says which stage to run.

    `fix` is the advice for an unreadable file: a stage's output is rebuilt, but a file the user
    supplied (a corpus) is theirs to repair.
    """
    if not Path(path).is_file():
        raise NLAError(f"{path} not found; run the stage that writes it first (`dvc repro` runs them in order)")
    try:
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowException, OSError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise NLAError(f"{path} is not a readable table ({first}); {fix}") from None


def check_safetensors(path: str | Path) -> None:
    """Refuse a truncated or corrupt .safetensors file from its header alone, in microseconds.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data, which must end exactly where the last range does. A copy or download
    cut short ends early; checking this before any model loads turns a deep safetensors error
    (after minutes of work, when the file is only read late) into one line up front.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        head = fh.read(length) if 8 + length <= size else b""
    try:
        ends = [t["data_offsets"][1] for k, t in json.loads(head).items() if k != "__metadata__"]
        expected = 8 + length + max(ends, default=0)
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):  # no header, or not the format's
        why = f"{size} bytes, without a readable header"
    else:
        if expected == size:
            return
        why = f"{size} bytes where its header promises {expected}"
    raise NLAError(
        f"{path} is truncated or corrupt ({why}); copy the checkpoint again or rerun the stage that wrote it"
    )


def check_weight_files(folder: str | Path) -> None:
    """Every .safetensors file under a checkpoint folder is whole (`check_safetensors`)."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        check_safetensors(path)
