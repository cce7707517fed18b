"""What `nla serve` answers from: the loaded checkpoints, the request limits, and the views' data.

`Explorer.open` loads everything once (`nla.explorer_engine`: the pairs, the subject model and
the worker thread) and opens each view's data (`nla.explorer_views`) when it is there; a
missing part is left out with a note saying what to pass, rather than failing the server.
`Explorer.explain` is the text view: it checks a request against the limits at once (so a bad
request is refused before it queues) and submits one job whose result holds pair a's records
(`nla explain --json` records), pair b's at the same positions, and per position the subject
model's top next-token predictions and the nearest training rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from nla.api import Site, resolve_positions
from nla.config import PATHS
from nla.data import EXPLANATIONS_FILE, FOREIGN, SPLITS_FILE
from nla.errors import NLAError
from nla.evaluate import SETS, eval_rows
from nla.explain import default_checkpoints
from nla.explorer_engine import (
    TOP_K,
    Engine,
    Job,
    RequestError,
    Subject,
    files_key,
    load_pair,
    records_of,
    require_same_subject,
)
from nla.explorer_views import Corpus, EvalRows, TrainingIndex, read_corpus, read_rows_file, require_rows_of
from nla.io import read_table


@dataclass(frozen=True)
class ExplorerConfig:
    """What the explorer loads and how much one request may ask (`nla serve` flags of the same names)."""

    av: str | Path | None = None  # AV of pair a, folder or Hub id (default: the RL AV if trained, else the SFT AV)
    ar: str | Path | None = None  # its AR, for FVE (default: the AR beside the default AV)
    av2: str | Path | None = None  # pair b, shown side by side (none: one pair)
    ar2: str | Path | None = None
    device: str = "auto"
    injection: str | None = None  # override the AVs' injection mode, as `nla explain --injection`
    dtype: str | None = None  # override the sidecars' dtype, as `nla explain --dtype`
    batch_size: int = 32  # positions per AV batch (a chunk of work)
    max_new_tokens: int = 48  # explanation tokens, as `nla explain`
    max_chars: int = 4000  # characters per text (413 above)
    max_tokens: int = 256  # subject tokens per text (413 above)
    time_limit: float = 120.0  # seconds per explain request, queueing included (504 after)
    max_queue: int = 32  # explain requests waiting at once (503 above)
    activations: Path = Path(PATHS.activations)  # training index and eval rows
    splits: Path = Path(PATHS.splits)
    labels: Path = Path(PATHS.labels)
    rows: tuple[Path, ...] = ()  # extra eval row files
    eval_max_rows: int = 200  # rows per set in the eval view (fixed-seed sample, as evaluate)
    corpus: Path | None = None  # search corpus (default: the corpus stage's documents, if present)
    corpus_docs: int = 32  # documents explained for search
    corpus_tokens: int = 64  # tokens per document explained for search
    cache_dir: Path = Path(PATHS.work) / "serve"

    def __post_init__(self):
        numbers = ("batch_size", "max_new_tokens", "max_chars", "max_tokens", "time_limit", "max_queue")
        for name in numbers + ("eval_max_rows", "corpus_docs", "corpus_tokens"):
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise NLAError(f"{flag} must be positive, got {getattr(self, name)}")


class Explorer:
    """The engine, the training index, the eval rows and the corpus.

    The optional parts are None when their data is missing; `notes` then says what to pass.
    """

    def __init__(self, cfg: ExplorerConfig, engine: Engine):
        self.cfg, self.engine = cfg, engine
        self.notes: dict[str, str] = {}
        self.index = self._open_index()
        self.rows = self._open_rows()
        self.corpus = self._open_corpus()

    @classmethod
    def open(cls, cfg: ExplorerConfig) -> Explorer:
        """Load the models (once) and start the worker. Named files are checked first: loading takes a while."""
        for path in cfg.rows:
            if not path.is_file():
                raise NLAError(f"rows file {path} not found; pass a .parquet or .jsonl of eval rows (--rows)")
        if cfg.corpus is not None and not cfg.corpus.is_file():
            raise NLAError(f"corpus {cfg.corpus} not found; pass --corpus a .txt, .jsonl or documents .parquet")
        if cfg.ar2 is not None and cfg.av2 is None:
            raise NLAError("--ar2 needs --av2 (the second pair's AV)")
        if cfg.av is None:
            av, ar = default_checkpoints()
            cfg = replace(cfg, av=av, ar=cfg.ar if cfg.ar is not None else ar)
        options = {"device": cfg.device, "injection": cfg.injection, "dtype": cfg.dtype}
        pairs = {"a": load_pair("a", cfg.av, cfg.ar, **options)}
        if cfg.av2 is not None:
            pairs["b"] = load_pair("b", cfg.av2, cfg.ar2, **options)
            require_same_subject(pairs["a"], pairs["b"])
        engine = Engine(
            Subject(pairs["a"].nla),
            pairs,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            max_queue=cfg.max_queue,
        )
        explorer = cls(cfg, engine)  # refuses a bad --rows or --corpus before the worker starts
        engine.start()
        return explorer

    def close(self) -> None:
        self.engine.stop()

    @property
    def av_meta(self) -> dict:
        return self.engine.pairs["a"].nla.av.meta

    # -- the views' data

    def _open_index(self) -> TrainingIndex | None:
        cfg = self.cfg
        if not (cfg.activations.is_dir() and cfg.splits.is_dir()):
            self.notes["index"] = (
                f"no training index: {cfg.activations} or {cfg.splits} is missing "
                "(the extract and split stages write them; or pass --activations and --splits)"
            )
            return None
        try:
            return TrainingIndex(cfg.activations, cfg.splits, cfg.labels, self.av_meta)
        except NLAError as err:
            self.notes["index"] = f"no training index: {err}"
            return None

    def _open_rows(self) -> EvalRows | None:
        """The evaluate stage's sets of the project's tables (when they match the AV) plus every --rows file."""
        cfg = self.cfg
        sources, keyed = [], []
        tables = [cfg.activations, cfg.splits / SPLITS_FILE, cfg.labels / EXPLANATIONS_FILE]
        if all(p.exists() for p in tables):
            try:
                require_rows_of(cfg.activations, self.av_meta)
                present = set(read_table(cfg.splits / SPLITS_FILE, columns=["split"]).split)
                sets = [s for s in SETS.values() if s in present]
                sources += [lambda split=split: self._table_rows(split) for split in sets]
                keyed += tables
                if FOREIGN not in present:
                    self.notes["foreign"] = f"no {FOREIGN} rows: the corpus has no foreign set (corpus.foreign)"
            except NLAError as err:
                self.notes["rows"] = f"the project's eval rows are left out: {err}"
        else:
            self.notes["rows"] = (
                f"no project eval rows: {', '.join(map(str, tables))} are not all present "
                "(run the pipeline through the label stage, or pass --rows FILE)"
            )
        for path in cfg.rows:
            sources.append(lambda path=path: read_rows_file(path))
            keyed.append(path)
        if not sources:
            self.notes.setdefault(
                "rows", f"no eval rows: {cfg.splits} has no {' or '.join(SETS.values())} rows; pass --rows FILE"
            )
            return None
        key = files_key(*keyed) + f"-{cfg.eval_max_rows}"
        return EvalRows(self.engine, sources, key, cfg.cache_dir)

    def _table_rows(self, split: str) -> pd.DataFrame:
        """One set as the evaluate stage samples it; a foreign set without labeled rows is simply absent."""
        cfg = self.cfg
        try:
            return eval_rows(cfg.activations, cfg.splits, cfg.labels, split, cfg.eval_max_rows)
        except NLAError as err:
            if split != FOREIGN:
                raise
            self.notes["foreign"] = f"no {FOREIGN} rows: {err}"
            return pd.DataFrame()

    def _open_corpus(self) -> Corpus | None:
        cfg = self.cfg
        path = cfg.corpus if cfg.corpus is not None else Path(PATHS.documents)
        if cfg.corpus is None and not path.is_file():
            self.notes["corpus"] = f"no search corpus: {path} is missing (run the corpus stage or pass --corpus FILE)"
            return None
        docs = read_corpus(path)[: cfg.corpus_docs]
        return Corpus(self.engine, docs, cfg.corpus_tokens, cfg.cache_dir, str(path))

    def info(self) -> dict:
        cfg = self.cfg
        return {
            "checkpoints": [p.describe() for _, p in sorted(self.engine.pairs.items())],
            "subject": {"base_model": self.av_meta["base_model"], "layer": self.av_meta["layer"]},
            "limits": {
                "max_chars": cfg.max_chars,
                "max_tokens": cfg.max_tokens,
                "time_limit": cfg.time_limit,
                "max_queue": cfg.max_queue,
                "max_new_tokens": cfg.max_new_tokens,
                "batch_size": cfg.batch_size,
            },
            "index": None if self.index is None else {"source": self.index.source, "rows": len(self.index.rows)},
            "rows": None if self.rows is None else {"ready": self.rows.rows is not None},
            "corpus": None
            if self.corpus is None
            else {"source": self.corpus.source, "docs": len(self.corpus.docs), "done": len(self.corpus.explained)},
            "notes": dict(self.notes),
            "stats": dict(self.engine.stats),
        }

    # -- the text view

    def _check_text(self, text: str, positions: str | list[int], time_limit: float | None) -> list[int]:
        """The text's token ids, or a refusal naming the limit it passes (before anything queues)."""
        cfg = self.cfg
        if not text.strip():
            raise RequestError(422, "text is empty; send some text to explain")
        if len(text) > cfg.max_chars:
            raise RequestError(
                413, f"text has {len(text)} characters; the limit is {cfg.max_chars} (nla serve --max-chars)"
            )
        if time_limit is not None and not 0 < time_limit <= cfg.time_limit:
            raise RequestError(422, f"time_limit must be in (0, {cfg.time_limit:g}] s (nla serve --time-limit)")
        ids = self.engine.subject.encode(text)
        if len(ids) > cfg.max_tokens:
            raise RequestError(
                413, f"text has {len(ids)} tokens; the limit is {cfg.max_tokens} (nla serve --max-tokens)"
            )
        if isinstance(positions, list) and len(positions) > cfg.max_tokens:
            raise RequestError(
                413, f"{len(positions)} positions asked; the limit is {cfg.max_tokens} (nla serve --max-tokens)"
            )
        return ids

    def explain(self, text: str, positions: str | list[int] = "all", time_limit: float | None = None) -> Job:
        """Queue one text; positions 'all' (every non-special token), 'last', or token indices (negative from the end)."""
        subject = self.engine.subject
        ids = self._check_text(text, positions, time_limit)
        special = [t in subject.special for t in ids]
        try:
            where = resolve_positions(len(ids), None if positions == "last" else positions, special)
        except NLAError as err:
            raise RequestError(422, str(err)) from None
        if not where:
            raise RequestError(422, "no token positions to explain (every token is special); send longer text")
        tokens = subject.decode_each(ids)
        sites = [Site(text, p, tokens[p]) for p in where]
        limit = time_limit if time_limit is not None else self.cfg.time_limit
        pairs = tuple(sorted(self.engine.pairs))
        details: list[dict] = []  # per position: top predictions and nearest training rows

        def prepare() -> torch.Tensor:
            hidden, top_ids, top_p = subject.forward(ids)  # (n, d), (n, k), (n, k)
            vectors = hidden[where]  # (m, d)
            names = subject.decode_each(top_ids[where].flatten().tolist())  # m·k tokens
            probs = top_p[where].flatten().tolist()
            neighbours = None if self.index is None else self.index.nearest(vectors)
            for k, p in enumerate(where):
                top = [{"token": names[i], "p": probs[i]} for i in range(k * TOP_K, (k + 1) * TOP_K)]
                details.append({"position": p, "top": top, "neighbours": None if neighbours is None else neighbours[k]})
            return vectors

        def finish(job: Job) -> dict:
            records = {name: [r.to_dict() for r in records_of(job, name, sites)] for name in pairs}
            return {
                "text": text,
                "tokens": [
                    {"position": i, "token": t, "special": s}
                    for i, (t, s) in enumerate(zip(tokens, special, strict=True))
                ],
                "positions": where,
                "complete": job.cursor == job.total,
                "records": records["a"],
                "compare": records.get("b"),
                "details": details[: job.cursor],
            }

        job = Job("explain", pairs, prepare, finish, deadline=time.monotonic() + limit, time_limit=limit)
        return self.engine.submit(job)
