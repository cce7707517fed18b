"""The data behind the explorer's views: nearest training rows, the eval table, the search corpus.

* `TrainingIndex`: the training rows of the activations table, searched by cosine of unit
  vectors, so a token's panel can show what the AV was taught on similar activations.
* `EvalRows`: the evaluate stage's sets (held-out `eval` and `foreign` rows, as
  `nla.evaluate.eval_rows` samples them) and any extra row files, explained by every pair and
  scored per row; computed once on the worker and cached on disk, since the evaluate stage
  keeps only aggregates and a markdown sample (`reports/samples.md`).
* `Corpus`: documents explained at every token on demand, one cached file per document,
  searched by word or phrase.

Each is fed by the engine's worker through a `Job`, at a lower priority than interactive
requests, and its records are `nla explain --json` records.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nla.api import Site
from nla.data import EXPLANATIONS_FILE, SPLIT_NAMES, load_rows, vectors_of
from nla.errors import NLAError
from nla.explorer_engine import Engine, Job, RequestError, records_of
from nla.io import atomic_write_text, read_table
from nla.metrics import unit
from nla.sidecar import read_sidecar, require

HELD_OUT = "eval"
TRAINING_SPLITS = tuple(s for s in SPLIT_NAMES if s != HELD_OUT)  # what the AV and AR were trained on
NEIGHBOURS = 3  # nearest training rows shown per position


def require_rows_of(activations_dir: Path, av_meta: dict) -> None:
    """Refuse an activations table from another subject model or layer than the AV's."""
    require(
        read_sidecar(activations_dir),
        where=f"{activations_dir} (pass the activations the AV was trained on: --activations)",
        fingerprint=av_meta.get("base_model_fingerprint"),
        d_model=av_meta["d_model"],
        layer=av_meta["layer"],
    )


def read_cache(path: Path) -> dict | None:
    """A cached JSON result, or None when absent or unreadable (then it is recomputed and rewritten)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tail(text: str, n: int = 160) -> str:
    """The last `n` characters of a context, whitespace collapsed."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else "…" + text[-n:]


# ----------------------------------------------------------------------------- nearest training rows


class TrainingIndex:
    """The training rows of the activations table, searchable by cosine to a vector."""

    def __init__(self, activations_dir: Path, splits_dir: Path, labels_dir: Path, av_meta: dict):
        require_rows_of(activations_dir, av_meta)
        rows = load_rows(activations_dir, splits_dir, TRAINING_SPLITS)
        labels = Path(labels_dir) / EXPLANATIONS_FILE
        if labels.is_file():
            gold = read_table(labels, columns=["row_id", "explanation"])
            rows = rows.merge(gold, on="row_id", how="left")
        else:
            rows["explanation"] = None
        if rows.empty:
            raise NLAError(f"{activations_dir} has no rows in the training splits {TRAINING_SPLITS}")
        self.units = unit(torch.from_numpy(vectors_of(rows)))  # (m, d)
        self.rows = rows.drop(columns=["vector"]).reset_index(drop=True)
        self.source = str(activations_dir)

    def nearest(self, vectors: torch.Tensor, k: int = NEIGHBOURS) -> list[list[dict]]:
        cos = unit(vectors) @ self.units.T  # (n, m)
        values, index = cos.topk(min(k, len(self.rows)), dim=-1)  # (n, k)
        return [
            [self._row(int(i), float(c)) for c, i in zip(vals.tolist(), idx.tolist(), strict=True)]
            for vals, idx in zip(values, index, strict=True)
        ]

    def _row(self, i: int, cos: float) -> dict:
        row = self.rows.iloc[i]
        gold = row.explanation if isinstance(row.explanation, str) else None
        return {
            "row_id": row.row_id,
            "split": row.split,
            "token": row.token,
            "context": tail(row.prefix),
            "label": gold,
            "cos": cos,
        }


# ----------------------------------------------------------------------------- the eval view


def read_rows_file(path: Path) -> pd.DataFrame:
    """Extra eval rows: parquet or JSON lines with vector, token, prefix columns; optional row_id,
    split (default: the file's stem), explanation (gold), doc_id, position."""
    if not path.is_file():
        raise NLAError(f"rows file {path} not found; pass a .parquet or .jsonl of eval rows (--rows)")
    if path.suffix == ".parquet":
        rows = read_table(path)
    elif path.suffix in (".jsonl", ".json"):
        try:
            rows = pd.read_json(path, lines=path.suffix == ".jsonl")
        except ValueError as err:
            raise NLAError(f"{path} is not valid JSON ({str(err).splitlines()[0]}); one row object per line") from None
    else:
        raise NLAError(f"{path}: unknown rows file type {path.suffix!r}; use .parquet or .jsonl")
    missing = {"vector", "token", "prefix"} - set(rows.columns)
    if missing:
        raise NLAError(f"{path} lacks columns {sorted(missing)}; eval rows need vector, token and prefix")
    defaults = {"split": path.stem, "explanation": None, "doc_id": None, "position": None}
    for column, value in defaults.items():
        if column not in rows.columns:
            rows[column] = value
    if "row_id" not in rows.columns:
        rows["row_id"] = [f"{path.stem}:{i}" for i in range(len(rows))]
    rows["vector"] = [np.asarray(v, dtype=np.float32) for v in rows.vector]
    return rows


class EvalRows:
    """Eval rows with the gold label and each pair's explanation and per-row FVE, cached on disk.

    `sources` load the row sets on the worker (a source may return an empty frame: a set the
    project does not have, such as `foreign` without `corpus.foreign`).
    """

    PER_PAIR = ("explanation", "closed", "fve", "cos", "fve_gold")

    def __init__(self, engine: Engine, sources: list[Callable[[], pd.DataFrame]], source_key: str, cache_dir: Path):
        self.engine, self.sources = engine, sources
        pairs = sorted(engine.pairs.values(), key=lambda p: p.name)
        key = hashlib.sha256(json.dumps([source_key, [p.key for p in pairs], engine.max_new_tokens]).encode())
        self.cache = cache_dir / f"rows-{key.hexdigest()[:16]}.json"
        cached = read_cache(self.cache)
        self.rows: list[dict] | None = None if cached is None else cached["rows"]
        self._job: Job | None = None
        self._lock = threading.Lock()

    @property
    def columns(self) -> list[str]:
        base = ["row_id", "split", "doc_id", "position", "token", "context", "gold"]
        return base + [f"{name}_{c}" for name in sorted(self.engine.pairs) for c in self.PER_PAIR]

    def job(self) -> Job:
        """The job computing the table, submitted on the first call; a failure stays (restart to retry)."""
        with self._lock:
            if self._job is None:
                self._job = self.engine.submit(
                    Job("rows", tuple(sorted(self.engine.pairs)), self._prepare, self._finish)
                )
            return self._job

    def _prepare(self) -> torch.Tensor:
        frames = [frame for frame in (load() for load in self.sources) if len(frame)]
        if not frames:
            raise NLAError("no eval rows: every source is empty; run the pipeline through the label stage")
        frame = pd.concat(frames, ignore_index=True)
        vectors = torch.from_numpy(vectors_of(frame))  # (n, d)
        d = self.engine.pairs["a"].nla.av.meta["d_model"]
        if vectors.shape[1] != d:
            raise NLAError(f"eval rows have vectors of width {vectors.shape[1]} but the AV expects {d}")
        self._has_gold = [isinstance(g, str) and bool(g.strip()) for g in frame.explanation]
        self._gold_fve: dict[str, list[float]] = {}  # pair -> FVE of its AR on the gold label
        for name, pair in self.engine.pairs.items():
            ar = pair.nla.ar
            if ar is not None and ar.fve_denominator is not None and any(self._has_gold):
                texts = [g if ok else "" for g, ok in zip(frame.explanation, self._has_gold, strict=True)]
                v_hat = pair.nla.reconstruct(texts, batch_size=self.engine.batch_size)  # (n, d)
                self._gold_fve[name] = pair.nla.fve(vectors, v_hat).tolist()
        self._frame = frame.drop(columns=["vector"])
        return vectors

    def _finish(self, job: Job) -> dict:
        rows = []
        for i, row in enumerate(self._frame.head(job.cursor).itertuples(index=False)):
            out = {
                "row_id": row.row_id,
                "split": row.split,
                "doc_id": row.doc_id if isinstance(row.doc_id, str) else None,
                "position": None if pd.isna(row.position) else int(row.position),
                "token": row.token,
                "context": tail(row.prefix, 300),
                "gold": row.explanation if self._has_gold[i] else None,
            }
            for name in self.engine.pairs:
                record = job.outputs[name][i]
                gold = self._gold_fve.get(name)
                out |= {
                    f"{name}_explanation": record.explanation,
                    f"{name}_closed": record.closed,
                    f"{name}_fve": record.fve,
                    f"{name}_cos": record.cos,
                    f"{name}_fve_gold": gold[i] if gold is not None and self._has_gold[i] else None,
                }
            rows.append(out)
        if job.cursor == job.total and self.rows is None:
            atomic_write_text(self.cache, json.dumps({"rows": rows}))
            self.rows = rows
        return {"rows": rows}

    def query(self, *, split: str | None, q: str | None, sort: str | None, order: str, limit: int, offset: int) -> dict:
        """The table filtered (one set, a case-insensitive substring) and sorted (missing values last)."""
        rows = self.rows
        if split:
            rows = [r for r in rows if r["split"] == split]
        if q:
            needle = q.lower()
            text_columns = [c for c in self.columns if c in ("token", "context", "gold") or c.endswith("_explanation")]
            rows = [r for r in rows if any(needle in str(r[c] or "").lower() for c in text_columns)]
        if sort:
            if sort not in self.columns:
                raise RequestError(422, f"cannot sort by {sort!r}; use one of {', '.join(self.columns)}")
            present = [r for r in rows if r[sort] is not None]
            present.sort(key=lambda r: r[sort], reverse=order == "desc")
            rows = present + [r for r in rows if r[sort] is None]
        splits: dict[str, int] = {}
        for r in self.rows:
            splits[r["split"]] = splits.get(r["split"], 0) + 1
        return {
            "status": "ready",
            "columns": self.columns,
            "splits": splits,
            "mean_fve": self._means(self.rows),
            "mean_fve_by_split": {s: self._means([r for r in self.rows if r["split"] == s]) for s in splits},
            "total": len(rows),
            "rows": rows[offset : offset + limit],
        }

    def _means(self, rows: list[dict]) -> dict[str, float | None]:
        """Mean per-row round-trip FVE of each pair (None without an AR reference)."""
        means = {}
        for name in sorted(self.engine.pairs):
            values = [r[f"{name}_fve"] for r in rows if r[f"{name}_fve"] is not None]
            means[name] = sum(values) / len(values) if values else None
        return means


# ----------------------------------------------------------------------------- the search view


def read_corpus(path: Path) -> list[tuple[str, str]]:
    """(doc_id, text) pairs from a documents parquet (doc_id, text), JSON lines ({"text": ...}) or plain
    text (documents separated by blank lines)."""
    if not path.is_file():
        raise NLAError(f"corpus {path} not found; pass --corpus a .txt, .jsonl or documents .parquet")
    if path.suffix == ".parquet":
        table = read_table(path)
        if "text" not in table.columns:
            raise NLAError(f"{path} has no 'text' column; pass a documents table (the corpus stage writes one)")
        ids = table.doc_id if "doc_id" in table.columns else [f"doc-{i}" for i in range(len(table))]
        docs = list(zip(map(str, ids), table.text, strict=True))
    elif path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    item = json.loads(line)
                    docs.append((str(item.get("doc_id", f"doc-{i}")), item["text"]))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise NLAError(f"{path}:{i + 1}: expected a JSON object with a 'text' field") from None
    else:
        chunks = [c.strip() for c in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
        docs = [(f"doc-{i}", c) for i, c in enumerate(c for c in chunks if c)]
    docs = [(doc_id, text) for doc_id, text in docs if isinstance(text, str) and text.strip()]
    if not docs:
        raise NLAError(f"{path} holds no documents; add some text")
    return docs


class Corpus:
    """Documents explained at every token by pair `a`, one cached JSON file per document."""

    def __init__(self, engine: Engine, docs: list[tuple[str, str]], max_tokens: int, cache_dir: Path, source: str):
        self.engine, self.max_tokens, self.source = engine, max_tokens, source
        self.docs = docs
        blob = json.dumps([engine.pairs["a"].key, docs, max_tokens, engine.max_new_tokens])
        self.dir = cache_dir / f"corpus-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        self.explained: dict[int, dict] = {}
        for i in range(len(docs)):
            if (cached := read_cache(self._path(i))) is not None:
                self.explained[i] = cached
        self._pending: dict[int, tuple[list[str], list[int]]] = {}  # doc -> (tokens, explained positions)
        self._started = False
        self._lock = threading.Lock()

    def _path(self, i: int) -> Path:
        return self.dir / f"doc-{i:05d}.json"

    def start(self) -> None:
        """Queue every document not yet cached (once); the worker runs them after interactive requests."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for i in range(len(self.docs)):
            if i not in self.explained:
                self.engine.submit(Job("corpus", ("a",), self._preparer(i), self._finisher(i)))

    def _preparer(self, i: int) -> Callable[[], torch.Tensor]:
        def prepare() -> torch.Tensor:
            subject = self.engine.subject
            ids = subject.encode(self.docs[i][1])[: self.max_tokens]
            hidden, _, _ = subject.forward(ids)  # (n, d)
            keep = [p for p, t in enumerate(ids) if t not in subject.special]
            self._pending[i] = (subject.decode_each(ids), keep)
            return hidden[keep]

        return prepare

    def _finisher(self, i: int) -> Callable[[Job], dict]:
        def finish(job: Job) -> dict:
            tokens, keep = self._pending[i]
            doc_id, text = self.docs[i]
            records = [r.to_dict() for r in records_of(job, "a", [Site(text, p, tokens[p]) for p in keep])]
            result = {"doc": i, "doc_id": doc_id, "tokens": tokens, "records": records}
            if job.cursor == job.total:
                for r in records:
                    r["text"] = None  # the document text is stored once, in `docs`
                atomic_write_text(self._path(i), json.dumps(result))
                self.explained[i] = result
                del self._pending[i]
            return result

        return finish

    def search(self, q: str, limit: int) -> dict:
        """Explained positions whose explanation holds the words of `q` in order (whole words, any case)."""
        words = q.split()
        matches = []
        if words:
            pattern = re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE)
            for i in sorted(self.explained):
                doc = self.explained[i]
                tokens = doc["tokens"]
                for r in doc["records"]:
                    if pattern.search(r["explanation"]):
                        p = r["position"]
                        before, after = "".join(tokens[max(0, p - 12) : p]), "".join(tokens[p + 1 : p + 6])
                        record = r | {"text": self.docs[i][1]}
                        matches.append(
                            {"doc": i, "doc_id": doc["doc_id"], "before": before, "after": after, "record": record}
                        )
        return {
            "status": "ready" if len(self.explained) == len(self.docs) else "running",
            "query": q,
            "docs_done": len(self.explained),
            "docs_total": len(self.docs),
            "total": len(matches),
            "matches": matches[:limit],
        }
