"""The explorer's engine: resident models and the one worker thread that runs them.

`nla explain` loads the subject model, the AV and the AR for one call; an explorer that answers
many small requests cannot pay those loads per request. Here they load once and stay resident:
one or two checkpoint pairs (`nla.api.NLA`: AV + optional AR), named ``a`` and ``b`` (side by
side in the UI), and the subject model of pair ``a`` (`NLA.subject`), which `Subject` runs in
full: one forward gives the residual at layer K *and* the next-token logits.

Only the worker thread touches the models. Work arrives as `Job`s: a job prepares its vectors
(a subject forward, or rows read from a table) and then waits for its positions to be
verbalized. Each turn the worker takes one *chunk* of up to `batch_size` positions from the
waiting jobs of the highest priority (interactive requests before the eval table before the
search corpus; fewest remaining positions first, so short requests finish first and ten
parallel requests share one AV batch) and explains it with every pair. Because a chunk is the
unit of work, a long text reports progress chunk by chunk, a request past its deadline stops at
the next chunk boundary (its explained positions are kept), and a short request never waits
behind a whole long one.

A chunk is explained by `nla.explain.to_records`, the code behind `nla explain --json`: greedy
AV decoding, FVE against the AR's training reference, cosine. The sites (text, position, token)
are filled in per job (`records_of`), so every record equals the CLI's.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nla.api import NLA, Site
from nla.errors import NLAError
from nla.explain import ExplainRecord, to_records
from nla.interop import describe, resolve_checkpoint
from nla.models import next_token_logits, residual_and_final
from nla.sidecar import require

log = logging.getLogger("nla.serve")

PRIORITY = {"explain": 0, "rows": 1, "corpus": 2}  # lower runs first
TOP_K = 5  # next-token predictions shown per position
KEEP_FINISHED = 256  # finished jobs kept for polling


class RequestError(NLAError):
    """A refused request: one line for the user and the HTTP status that goes with it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def files_key(*paths: Path) -> str:
    """A cache key that changes whenever one of these files or folders does (name, size and mtime of each file)."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- resident models


@dataclass
class Pair:
    """One checkpoint pair: the NLA (its AV, and the AR that scores its explanations, or None)."""

    name: str  # "a" or "b"
    av_dir: Path
    ar_dir: Path | None
    nla: NLA
    key: str  # cache key of both checkpoints' files

    def describe(self) -> dict:
        ar = self.nla.ar
        return {
            "name": self.name,
            "stage": self.nla.av.meta.get("stage"),
            "av": str(self.av_dir),
            "ar": None if self.ar_dir is None else str(self.ar_dir),
            "layer": self.nla.layer,
            "format": describe(self.nla.av.meta),
            "fve": ar is not None and ar.fve_denominator is not None,  # public ARs give the cosine only
        }


def load_pair(
    name: str,
    av: str | Path,
    ar: str | Path | None,
    *,
    device: str,
    injection: str | None = None,
    dtype: str | None = None,
) -> Pair:
    """Load an AV (and AR), folders or Hub ids in any format `nla explain` reads; `NLA.load` checks they match."""
    av_dir = resolve_checkpoint(av)
    ar_dir = None if ar is None else resolve_checkpoint(ar)
    nla = NLA.load(av_dir, ar_dir, device=device, injection=injection, dtype=dtype)
    return Pair(name, av_dir, ar_dir, nla, files_key(av_dir, *([ar_dir] if ar_dir is not None else [])))


def require_same_subject(first: Pair, second: Pair) -> None:
    """Two pairs side by side must read the same subject model at the same layer."""
    meta = first.nla.av.meta
    require(
        second.nla.av.meta,
        where=f"pair {second.name} ({second.av_dir})",
        fingerprint=meta.get("base_model_fingerprint"),
        d_model=meta["d_model"],
        layer=meta["layer"],
    )


class Subject:
    """Pair a's subject model, resident: one full forward gives the residual at layer K and the logits."""

    def __init__(self, nla: NLA):
        self.model, self.tokenizer = nla.subject()
        self.layer = nla.layer
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
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)  # (1, n)
        hidden, final = residual_and_final(self.model, self.layer, input_ids, torch.ones_like(input_ids))  # (1, n, d)
        probs = next_token_logits(self.model, final[0]).float().softmax(-1)  # (n, vocab)
        top_p, top_ids = probs.topk(TOP_K, dim=-1)  # (n, k)
        return hidden[0].float().cpu(), top_ids.cpu(), top_p.cpu()


# ----------------------------------------------------------------------------- jobs


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
    outputs: dict[str, list[ExplainRecord | None]] = field(default_factory=dict)  # pair -> record per position
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


def records_of(job: Job, pair: str, sites: list[Site]) -> list[ExplainRecord]:
    """The `nla explain` records of the explained prefix of `job` for one pair, with their sites."""
    explained = job.outputs[pair][: job.cursor]
    return [replace(r, text=s.text, position=s.position, token=s.token) for s, r in zip(sites, explained, strict=False)]


# ----------------------------------------------------------------------------- the worker


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
        self._lock = threading.Lock()  # guards _jobs
        self._thread = threading.Thread(target=self._run, name="nla-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        """Queue a job; an explain request beyond `max_queue` waiting ones is refused (503)."""
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
            for k in finished[: max(0, len(self._jobs) - KEEP_FINISHED)]:
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
        """The job's result so far (None before its vectors are prepared)."""
        if job.status in ("queued", "error") or job.total is None:
            return None
        return job.finish(job)

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
        """Explain the chunk's positions with each pair: one AV batch, one AR batch."""
        vectors = torch.cat([job.vectors[a:b] for job, a, b in chunk])  # (n, d)
        for name in chunk[0][0].pairs:
            records = to_records(
                self.pairs[name].nla,
                vectors,
                [None] * len(vectors),
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,
            )
            outputs = iter(records)
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
