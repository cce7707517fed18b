"""The explorer's engine: resident models, one worker thread, and the data behind each view.

`nla explain` loads the subject model, the AV and the AR one after another and frees each;
an explorer that answers many small requests cannot pay those loads per request. Here they
load once (`Explorer.open`) and stay resident: the subject model (a full forward, for the
residual at layer K *and* the next-token logits), and one or two checkpoint pairs
(AV + optional AR), named ``a`` and ``b`` (side by side in the UI).

Only the worker thread touches the models. Work arrives as `Job`s: a job prepares its
vectors (a subject forward, or rows read from a table) and then waits for its positions to
be verbalized. Each turn the worker takes one *chunk* of up to `batch_size` positions from
the waiting jobs of the highest priority (interactive requests before the eval table before
the search corpus; fewest remaining positions first, so short requests finish first and ten
parallel requests share one AV batch), runs every pair's AV and AR on it, and retires the
jobs that are complete. Because a chunk is the unit of work, a long text reports progress
chunk by chunk, a request that passes its deadline stops at the next chunk boundary (its
explained positions are kept), and a short request never waits behind a whole long one.

Records are `nla.explain.ExplainRecord`s built exactly as `nla explain` builds them: the
residual at the AV's layer, greedy AV decoding, FVE = 1 − mse_nrm / the AR's training
reference, cos = 1 − mse_nrm / 2.

The views' data:
* `TrainingIndex`: nearest training rows (cosine of unit vectors) from the activations table.
* `EvalRows`: the evaluate stage's held-out rows (`nla.evaluate.eval_rows`) and any extra row
  files (e.g. a foreign set), explained by every pair, cached on disk.
* `Corpus`: documents explained at every token on demand, one cached file per document,
  searched by word or phrase.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import math
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nla.api import resolve_positions
from nla.ar import AR, load_ar
from nla.av import AV, load_av
from nla.config import PATHS, ModelConfig
from nla.errors import NLAError
from nla.explain import ExplainRecord, default_checkpoints
from nla.io import read_table
from nla.metrics import mse_nrm, unit
from nla.sidecar import read_sidecar

log = logging.getLogger("nla.serve")

PRIORITY = {"explain": 0, "rows": 1, "corpus": 2}  # lower runs first
TOP_K = 5  # next-token predictions shown per position
NEIGHBOURS = 3  # nearest training rows shown per position
TRAINING_SPLITS = ("av_sft", "ar_sft", "rl")


class RequestError(NLAError):
    """A refused request: one line for the user and the HTTP status that goes with it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ExplorerConfig:
    """What the explorer loads and how much one request may ask (`nla serve` flags of the same names)."""

    av: Path | None = None  # AV of pair a (default: the RL AV if trained, else the SFT AV)
    ar: Path | None = None  # its AR, for FVE (default: the AR beside the default AV)
    av2: Path | None = None  # pair b, shown side by side (none: one pair)
    ar2: Path | None = None
    device: str = "auto"
    batch_size: int = 32  # positions per AV batch (a chunk of work)
    max_new_tokens: int = 48  # explanation tokens, as `nla explain`
    max_chars: int = 4000  # characters per text (413 above)
    max_tokens: int = 256  # subject tokens per text (413 above)
    time_limit: float = 120.0  # seconds per explain request, queueing included (504 after)
    max_queue: int = 32  # explain requests waiting at once (503 above)
    activations: Path = Path(PATHS.activations)  # training index and eval rows
    splits: Path = Path(PATHS.splits)
    labels: Path = Path(PATHS.labels)
    rows: tuple[Path, ...] = ()  # extra eval row files (e.g. a foreign set)
    eval_max_rows: int = 200  # held-out rows in the eval view (fixed-seed sample, as evaluate)
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


# ----------------------------------------------------------------------------- resident models


def files_key(*paths: Path) -> str:
    """A cache key that changes whenever one of these files or folders does (name, size and mtime of each file)."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


@dataclass
class Pair:
    """One checkpoint pair: the AV, and the AR that scores its explanations (None: no FVE)."""

    name: str  # "a" or "b"
    av_dir: Path
    ar_dir: Path | None
    av: AV
    ar: AR | None
    key: str  # cache key of both checkpoints

    def describe(self) -> dict:
        return {
            "name": self.name,
            "stage": self.av.meta.get("stage"),
            "av": str(self.av_dir),
            "ar": None if self.ar_dir is None else str(self.ar_dir),
            "layer": self.av.meta["layer"],
        }


def load_pair(name: str, av_dir: str | Path, ar_dir: str | Path | None, device: str) -> Pair:
    """Load an AV (and AR) and check that they belong together, as `nla explain` does."""

    av_dir = Path(av_dir)
    if not av_dir.is_dir():
        raise NLAError(f"AV checkpoint {av_dir} does not exist; pass --av (and --av2) an AV folder")
    av = load_av(av_dir, device)
    ar = None
    if ar_dir is not None:
        ar_dir = Path(ar_dir)
        if not ar_dir.is_dir():
            raise NLAError(f"AR checkpoint {ar_dir} does not exist; pass --ar an AR folder or leave it out")
        ar = load_ar(ar_dir, device)
        for key in ("layer", "d_model", "base_model_fingerprint"):
            if ar.meta.get(key) != av.meta.get(key):
                raise NLAError(
                    f"AR {ar_dir} has {key}={ar.meta.get(key)!r} but the AV has {av.meta.get(key)!r}; "
                    "pass an AR trained with this AV's model and layer"
                )
        if ar.fve_denominator is None:
            raise NLAError(f"{ar_dir} lacks the FVE reference (fve_denominator); retrain it with `nla ar-sft`")
    return Pair(name, av_dir, ar_dir, av, ar, files_key(av_dir, *([ar_dir] if ar_dir is not None else [])))


class Subject:
    """The subject model, resident: one full forward gives the residual at layer K and the logits."""

    def __init__(self, av_meta: dict, device: str):
        from nla.models import load_model

        cfg = ModelConfig(
            name=av_meta["base_model"],
            gguf_file=av_meta.get("base_model_gguf_file"),
            revision=av_meta.get("base_model_revision"),
            dtype=av_meta.get("dtype", "auto"),
            layer=av_meta["layer"],
            device=device,
        )
        self.model, self.tokenizer, source = load_model(cfg)
        if av_meta.get("base_model_fingerprint") not in (None, source.fingerprint):
            raise NLAError(
                f"the AV was trained on {av_meta['base_model_fingerprint']} but '{cfg.name}' resolves to "
                f"{source.fingerprint}; install the subject model the AV was trained on"
            )
        self.layer = cfg.layer
        self.special = set(self.tokenizer.all_special_ids)
        # Request handlers tokenize (to refuse long texts at once) while the worker decodes; a
        # fast tokenizer must not be entered from two threads at a time.
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode_each(self, ids: list[int]) -> list[str]:
        with self._lock:
            return [self.tokenizer.decode([i]) for i in ids]

    @torch.no_grad()
    def forward(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(residual (n, d) at layer K, top-k token ids (n, k), their probabilities (n, k)), float32 on the cpu."""
        from nla.models import decoder_blocks

        captured: list[torch.Tensor] = []

        def hook(module, inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)  # (1, n)
        handle = decoder_blocks(self.model)[self.layer].register_forward_hook(hook)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
        finally:
            handle.remove()
        probs = logits[0].float().softmax(-1)  # (n, vocab)
        top_p, top_ids = probs.topk(TOP_K, dim=-1)  # (n, k)
        return captured[0][0].float().cpu(), top_ids.cpu(), top_p.cpu()


# ----------------------------------------------------------------------------- jobs and the worker


@dataclass(eq=False)
class Job:
    """Positions waiting to be verbalized by `pairs`, with a way to turn the outputs into a result.

    `prepare` runs on the worker (it may use the models) and returns the (n, d) vectors;
    `finish(job)` builds the JSON result from `outputs`, also for a partial job (the prefix
    of explained positions) while it runs or after it timed out.
    """

    kind: str
    pairs: tuple[str, ...]
    prepare: Callable[[], torch.Tensor]
    finish: Callable[[Job], dict]
    deadline: float | None = None  # time.monotonic() after which no further chunk is started
    time_limit: float | None = None
    id: str = ""
    status: str = "queued"  # queued | running | done | error | timeout
    error: RequestError | None = None
    total: int | None = None
    cursor: int = 0  # positions [0, cursor) are explained
    vectors: torch.Tensor | None = None  # (n, d)
    outputs: dict[str, list] = field(default_factory=dict)  # pair -> [(Explanation, mse or None)] per position
    created: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def priority(self) -> int:
        return PRIORITY[self.kind]

    def progress(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "status": self.status, "done": self.cursor, "total": self.total}
        if self.error is not None:
            out["error"] = str(self.error)
            out["code"] = self.error.status
        return out


class Engine:
    """The one thread that runs the models, fed by a queue of jobs."""

    def __init__(
        self, subject: Subject, pairs: dict[str, Pair], *, batch_size: int, max_new_tokens: int, max_queue: int
    ):
        self.subject, self.pairs = subject, pairs
        self.batch_size, self.max_new_tokens, self.max_queue = batch_size, max_new_tokens, max_queue
        self.stats = {"chunks": 0, "positions": 0, "max_jobs_per_chunk": 0}
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._active: list[Job] = []
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _jobs and the interactive count
        self._thread = threading.Thread(target=self._run, name="nla-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        with self._lock:
            if job.kind == "explain":
                waiting = sum(
                    1 for j in self._jobs.values() if j.kind == "explain" and j.status in ("queued", "running")
                )
                if waiting >= self.max_queue:
                    raise RequestError(503, f"{waiting} requests are already waiting; retry in a moment")
            job.id = f"{job.kind}-{next(self._ids)}"
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if j.future.done()]
            for k in finished[: max(0, len(self._jobs) - 256)]:  # keep the latest finished jobs for polling
                del self._jobs[k]
        self._inbox.put(job)
        return job

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id!r}; it never existed or finished long ago: submit it again")
        return job

    def result(self, job: Job) -> dict | None:
        """The job's result so far (None before any position is explained)."""
        if job.status in ("queued", "error") or job.total is None:
            return None
        return job.finish(job)

    # -- the worker

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._admit(block=not self._active):
                    return
                chunk = self._next_chunk()
                if chunk:
                    try:
                        self._verbalize(chunk)
                    except Exception as err:  # a bug must fail the jobs it touched, not the server
                        log.exception("verbalizing a chunk failed")
                        for job, _, _ in chunk:
                            self._fail(job, RequestError(500, f"internal error: {type(err).__name__}: {err}"))
                self._retire()

    def _admit(self, block: bool) -> bool:
        """Move queued jobs to the active list, preparing each; False when told to stop."""
        while True:
            try:
                job = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            block = False
            job.status = "running"
            try:
                job.vectors = job.prepare()  # (n, d)
            except RequestError as err:
                self._fail(job, err)
                continue
            except NLAError as err:
                self._fail(job, RequestError(422, str(err)))
                continue
            except Exception as err:
                log.exception("preparing a job failed")
                self._fail(job, RequestError(500, f"internal error: {type(err).__name__}: {err}"))
                continue
            job.total = len(job.vectors)
            job.outputs = {name: [None] * job.total for name in job.pairs}
            self._active.append(job)

    def _next_chunk(self) -> list[tuple[Job, int, int]]:
        """Up to `batch_size` positions from the waiting jobs of the best priority, fewest remaining first.

        A job past its deadline gets no further chunk (`_retire` ends it), also one that waited in the queue.
        """
        now = time.monotonic()
        waiting = [j for j in self._active if j.cursor < j.total and (j.deadline is None or now <= j.deadline)]
        if not waiting:
            return []
        best = min(waiting, key=lambda j: (j.priority, j.created))
        group = sorted(
            (j for j in waiting if j.priority == best.priority and j.pairs == best.pairs),
            key=lambda j: (j.total - j.cursor, j.created),
        )
        remaining = sum(j.total - j.cursor for j in group)
        room = math.ceil(remaining / math.ceil(remaining / self.batch_size))  # equal chunks, not 64 + 1
        chunk = []
        for job in group:
            take = min(room, job.total - job.cursor)
            chunk.append((job, job.cursor, job.cursor + take))
            room -= take
            if room == 0:
                break
        return chunk

    def _verbalize(self, chunk: list[tuple[Job, int, int]]) -> None:
        vectors = torch.cat([job.vectors[a:b] for job, a, b in chunk])  # (n, d)
        for name in chunk[0][0].pairs:
            pair = self.pairs[name]
            explanations = pair.av.generate(vectors, self.max_new_tokens, temperature=0.0, batch_size=len(vectors))
            mse = [None] * len(vectors)
            if pair.ar is not None:
                rec = pair.ar.reconstruct([e.text for e in explanations], self.batch_size)  # (n, d)
                mse = mse_nrm(rec, vectors).tolist()
            outputs = iter(zip(explanations, mse, strict=True))
            for job, a, b in chunk:
                for i in range(a, b):
                    job.outputs[name][i] = next(outputs)
        for job, _, b in chunk:
            job.cursor = b
        self.stats["chunks"] += 1
        self.stats["positions"] += len(vectors)
        self.stats["max_jobs_per_chunk"] = max(self.stats["max_jobs_per_chunk"], len(chunk))

    def _retire(self) -> None:
        now = time.monotonic()
        for job in list(self._active):
            if job.cursor == job.total:
                self._active.remove(job)
                self._complete(job)
            elif job.deadline is not None and now > job.deadline:
                self._active.remove(job)
                self._fail(
                    job,
                    RequestError(
                        504,
                        f"explaining took longer than {job.time_limit:g} s: {job.cursor} of {job.total} positions "
                        "explained; send a shorter text or raise the time limit (nla serve --time-limit)",
                    ),
                    status="timeout",
                )

    def _complete(self, job: Job) -> None:
        try:
            result = job.finish(job)
        except Exception as err:
            log.exception("finishing a job failed")
            self._fail(job, RequestError(500, f"internal error: {type(err).__name__}: {err}"))
            return
        job.status = "done"
        job.future.set_result(result)

    def _fail(self, job: Job, err: RequestError, status: str = "error") -> None:
        if job in self._active:
            self._active.remove(job)
        job.status, job.error = status, err
        if not job.future.done():
            job.future.set_exception(err)


def records_of(job: Job, pair: Pair, sites: list[tuple[str | None, int | None, str | None]]) -> list[ExplainRecord]:
    """ExplainRecords of the explained prefix of `job` for one pair, as `nla explain` builds them."""
    out = []
    for (text, position, token), output in zip(sites, job.outputs[pair.name][: job.cursor], strict=False):
        explanation, mse = output
        fve = None if mse is None else 1 - mse / pair.ar.fve_denominator
        cos = None if mse is None else 1 - mse / 2
        out.append(ExplainRecord(text, position, token, explanation.text, explanation.closed, fve, cos))
    return out


# ----------------------------------------------------------------------------- nearest training rows


def check_activations(activations_dir: Path, av_meta: dict) -> None:
    """Refuse an activations table from another model or layer than the AV's."""

    meta = read_sidecar(activations_dir)
    for key in ("layer", "d_model", "base_model_fingerprint"):
        if meta.get(key) != av_meta.get(key):
            raise NLAError(
                f"{activations_dir} has {key}={meta.get(key)!r} but the AV has {av_meta.get(key)!r}; "
                "pass the activations the AV was trained on (--activations)"
            )


class TrainingIndex:
    """The training rows of the activations table, searchable by cosine to a vector."""

    def __init__(self, activations_dir: Path, splits_dir: Path, labels_dir: Path, av_meta: dict):
        from nla.extract import load_rows
        from nla.io import read_table, vectors_of

        check_activations(activations_dir, av_meta)
        rows = load_rows(activations_dir, splits_dir, TRAINING_SPLITS)
        labels = Path(labels_dir) / "explanations.parquet"
        if labels.is_file():
            gold = read_table(labels, columns=["row_id", "explanation"])
            rows = rows.merge(gold, on="row_id", how="left")
        else:
            rows["explanation"] = None
        if rows.empty:
            raise NLAError(f"{activations_dir} has no rows in the training splits {TRAINING_SPLITS}")
        self.rows = rows.drop(columns=["vector"]).reset_index(drop=True)
        self.units = unit(torch.from_numpy(vectors_of(rows)))  # (m, d)
        self.source = str(activations_dir)

    def nearest(self, vectors: torch.Tensor, k: int = NEIGHBOURS) -> list[list[dict]]:
        cos = unit(vectors) @ self.units.T  # (n, m)
        values, index = cos.topk(min(k, len(self.rows)), dim=-1)
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
            "context": _tail(row.prefix),
            "label": gold,
            "cos": cos,
        }


def _read_cache(path: Path) -> dict | None:
    """A cached JSON result, or None when absent or unreadable (then it is recomputed and rewritten)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _tail(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else "…" + text[-n:]


# ----------------------------------------------------------------------------- the eval view


def read_rows_file(path: Path) -> pd.DataFrame:
    """Extra eval rows (e.g. a foreign set): parquet or JSON lines with vector, token, prefix columns;
    optional row_id, split (default: the file's stem), explanation (gold), doc_id, position."""

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
    """Held-out rows with the gold label and each pair's explanation and per-row FVE, cached on disk."""

    def __init__(self, engine: Engine, sources: list[Callable[[], pd.DataFrame]], source_key: str, cache_dir: Path):
        self.engine, self.sources = engine, sources
        pairs = sorted(engine.pairs.values(), key=lambda p: p.name)
        key = hashlib.sha256(json.dumps([source_key, [p.key for p in pairs], engine.max_new_tokens]).encode())
        self.cache = cache_dir / f"rows-{key.hexdigest()[:16]}.json"
        cached = _read_cache(self.cache)
        self.rows: list[dict] | None = None if cached is None else cached["rows"]
        self._job: Job | None = None
        self._lock = threading.Lock()

    @property
    def columns(self) -> list[str]:
        base = ["row_id", "split", "doc_id", "position", "token", "context", "gold"]
        per_pair = ["explanation", "closed", "fve", "cos", "fve_gold"]
        return base + [f"{name}_{c}" for name in sorted(self.engine.pairs) for c in per_pair]

    def job(self) -> Job:
        """The job computing the table, submitted on the first call; a failure stays (restart to retry)."""
        with self._lock:
            if self._job is None:
                self._job = self.engine.submit(
                    Job("rows", tuple(sorted(self.engine.pairs)), self._prepare, self._finish)
                )
            return self._job

    def _prepare(self) -> torch.Tensor:
        from nla.io import vectors_of

        frame = pd.concat([load() for load in self.sources], ignore_index=True)
        d = next(iter(self.engine.pairs.values())).av.meta["d_model"]
        vectors = torch.from_numpy(vectors_of(frame))  # (n, d)
        if vectors.shape[1] != d:
            raise NLAError(f"eval rows have vectors of width {vectors.shape[1]} but the AV expects {d}")
        gold_mse = {}
        has_gold = [isinstance(g, str) for g in frame.explanation]
        for name, pair in self.engine.pairs.items():
            if pair.ar is not None and any(has_gold):
                texts = [g if ok else "" for g, ok in zip(frame.explanation, has_gold, strict=True)]
                gold_mse[name] = mse_nrm(pair.ar.reconstruct(texts, self.engine.batch_size), vectors).tolist()
        self._frame, self._gold_mse, self._has_gold = frame.drop(columns=["vector"]), gold_mse, has_gold
        return vectors

    def _finish(self, job: Job) -> dict:
        rows = []
        for i, row in enumerate(self._frame.itertuples(index=False)):
            if i >= job.cursor:
                break
            out = {
                "row_id": row.row_id,
                "split": row.split,
                "doc_id": row.doc_id if isinstance(row.doc_id, str) else None,
                "position": None if pd.isna(row.position) else int(row.position),
                "token": row.token,
                "context": _tail(row.prefix, 300),
                "gold": row.explanation if self._has_gold[i] else None,
            }
            for name, pair in self.engine.pairs.items():
                explanation, mse = job.outputs[name][i]
                denom = pair.ar.fve_denominator if pair.ar is not None else None
                gold = self._gold_mse.get(name)
                out |= {
                    f"{name}_explanation": explanation.text,
                    f"{name}_closed": explanation.closed,
                    f"{name}_fve": None if mse is None else 1 - mse / denom,
                    f"{name}_cos": None if mse is None else 1 - mse / 2,
                    f"{name}_fve_gold": None if gold is None or not self._has_gold[i] else 1 - gold[i] / denom,
                }
            rows.append(out)
        if job.cursor == job.total and self.rows is None:
            from nla.io import atomic_write_text

            atomic_write_text(self.cache, json.dumps({"rows": rows}))
            self.rows = rows
        return {"rows": rows}

    def query(self, *, split: str | None, q: str | None, sort: str | None, order: str, limit: int, offset: int) -> dict:
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
            rows = present + [r for r in rows if r[sort] is None]  # missing values last either way
        splits: dict[str, int] = {}
        for r in self.rows:
            splits[r["split"]] = splits.get(r["split"], 0) + 1
        means = {}
        for name in sorted(self.engine.pairs):
            values = [r[f"{name}_fve"] for r in self.rows if r[f"{name}_fve"] is not None]
            means[name] = sum(values) / len(values) if values else None
        return {
            "status": "ready",
            "columns": self.columns,
            "splits": splits,
            "mean_fve": means,
            "total": len(rows),
            "rows": rows[offset : offset + limit],
        }


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
            if (cached := _read_cache(self._path(i))) is not None:
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
            sites = [(text, p, tokens[p]) for p in keep]
            records = [r.to_dict() for r in records_of(job, self.engine.pairs["a"], sites)]
            result = {"doc": i, "doc_id": doc_id, "tokens": tokens, "records": records}
            if job.cursor == job.total:
                from nla.io import atomic_write_text

                for r in result["records"]:
                    r["text"] = None  # the document text is stored once, in `docs`
                atomic_write_text(self._path(i), json.dumps(result))
                self.explained[i] = result
                del self._pending[i]
            return result

        return finish

    def search(self, q: str, limit: int) -> dict:
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
                        record = r | {"text": self.docs[i][1]}
                        before, after = "".join(tokens[max(0, p - 12) : p]), "".join(tokens[p + 1 : p + 6])
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


# ----------------------------------------------------------------------------- the explorer


class Explorer:
    """Everything `nla serve` answers from: the engine, the training index, the eval rows and the corpus.

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
        if cfg.av is None:
            av, ar = default_checkpoints()
            cfg = replace(cfg, av=av, ar=cfg.ar if cfg.ar is not None else ar)
        pairs = {"a": load_pair("a", cfg.av, cfg.ar, cfg.device)}
        if cfg.av2 is not None:
            pairs["b"] = load_pair("b", cfg.av2, cfg.ar2, cfg.device)
            meta_a, meta_b = pairs["a"].av.meta, pairs["b"].av.meta
            for key in ("base_model_fingerprint", "layer", "d_model"):
                if meta_a.get(key) != meta_b.get(key):
                    raise NLAError(
                        f"--av2 has {key}={meta_b.get(key)!r} but --av has {meta_a.get(key)!r}; "
                        "compare two checkpoints of the same subject model and layer"
                    )
        elif cfg.ar2 is not None:
            raise NLAError("--ar2 needs --av2 (the second pair's AV)")
        subject = Subject(pairs["a"].av.meta, cfg.device)
        engine = Engine(
            subject, pairs, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, max_queue=cfg.max_queue
        )
        explorer = cls(cfg, engine)  # refuses a bad --rows or --corpus before the worker starts
        engine.start()
        return explorer

    def close(self) -> None:
        self.engine.stop()

    @property
    def av_meta(self) -> dict:
        return self.engine.pairs["a"].av.meta

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
        """The held-out rows of the project's tables (when they match the AV) plus every --rows file."""
        from nla.evaluate import eval_rows

        cfg = self.cfg
        sources, keyed = [], []
        project = [cfg.activations, cfg.splits, cfg.labels / "explanations.parquet"]
        if all(p.exists() for p in project):
            try:
                check_activations(cfg.activations, self.av_meta)
                sources.append(lambda: eval_rows(cfg.activations, cfg.splits, cfg.labels, cfg.eval_max_rows))
                keyed += project
            except NLAError as err:
                self.notes["rows"] = f"held-out rows left out: {err}"
        else:
            self.notes["rows"] = (
                f"no held-out rows: {', '.join(map(str, project))} are not all present "
                "(run the pipeline through the label stage, or pass --rows FILE)"
            )
        for path in cfg.rows:
            sources.append(lambda path=path: read_rows_file(path))
            keyed.append(path)
        if not sources:
            return None
        key = files_key(*keyed) + f"-{cfg.eval_max_rows}"
        return EvalRows(self.engine, sources, key, cfg.cache_dir)

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
            "notes": self.notes,
            "stats": dict(self.engine.stats),
        }

    def explain(self, text: str, positions: str | list[int] = "all", time_limit: float | None = None) -> Job:
        """Queue one text; positions 'all' (every non-special token), 'last', or token indices (negative from the end)."""
        cfg, subject = self.cfg, self.engine.subject
        if not text.strip():
            raise RequestError(422, "text is empty; send some text to explain")
        if len(text) > cfg.max_chars:
            raise RequestError(
                413, f"text has {len(text)} characters; the limit is {cfg.max_chars} (nla serve --max-chars)"
            )
        if time_limit is not None and not 0 < time_limit <= cfg.time_limit:
            raise RequestError(422, f"time_limit must be in (0, {cfg.time_limit:g}] s (nla serve --time-limit)")
        ids = subject.encode(text)
        if len(ids) > cfg.max_tokens:
            raise RequestError(
                413, f"text has {len(ids)} tokens; the limit is {cfg.max_tokens} (nla serve --max-tokens)"
            )
        if isinstance(positions, list) and len(positions) > cfg.max_tokens:
            raise RequestError(
                413, f"{len(positions)} positions asked; the limit is {cfg.max_tokens} (nla serve --max-tokens)"
            )
        special = [t in subject.special for t in ids]
        try:
            where = resolve_positions(len(ids), None if positions == "last" else positions, special)
        except NLAError as err:
            raise RequestError(422, str(err)) from None
        if not where:
            raise RequestError(422, "no token positions to explain (every token is special); send longer text")
        tokens = subject.decode_each(ids)
        limit = time_limit if time_limit is not None else cfg.time_limit
        pairs = tuple(sorted(self.engine.pairs))
        context: dict = {}

        def prepare() -> torch.Tensor:
            hidden, top_ids, top_p = subject.forward(ids)  # (n, d), (n, k), (n, k)
            vectors = hidden[where]  # (m, d)
            names = subject.decode_each(top_ids[where].flatten().tolist())
            probs = top_p[where].flatten().tolist()
            context["top"] = [
                [{"token": names[i], "p": probs[i]} for i in range(r * TOP_K, (r + 1) * TOP_K)]
                for r in range(len(where))
            ]
            context["neighbours"] = None if self.index is None else self.index.nearest(vectors)
            return vectors

        def finish(job: Job) -> dict:
            sites = [(text, p, tokens[p]) for p in where]
            done = job.cursor
            records = {name: [r.to_dict() for r in records_of(job, self.engine.pairs[name], sites)] for name in pairs}
            return {
                "text": text,
                "tokens": [
                    {"position": i, "token": t, "special": s}
                    for i, (t, s) in enumerate(zip(tokens, special, strict=True))
                ],
                "positions": where,
                "complete": done == job.total,
                "records": records["a"],
                "compare": records.get("b"),
                "details": [
                    {
                        "position": p,
                        "top": context["top"][k],
                        "neighbours": None if context["neighbours"] is None else context["neighbours"][k],
                    }
                    for k, p in enumerate(where[:done])
                ],
            }

        job = Job("explain", pairs, prepare, finish, deadline=time.monotonic() + limit, time_limit=limit)
        return self.engine.submit(job)
