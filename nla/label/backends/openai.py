"""The openai labeler: any /v1/chat/completions server, each row asked once.

Bounded concurrency: `label.openai.concurrency` worker threads, each with one request in
flight, so the server never sees more (a request past `timeout_s` is closed by httpx before
its worker sends the next). Retries back off exponentially and honour `Retry-After`, within
a total time budget (`retry_budget_s`). Every answer is cached as soon as it arrives, so a
rerun or a resumed crash sends no request twice.

Three ways the run stops early, each keeping every finished row in the cache for the rerun:

- a misconfiguration every row would hit (a refused key, a wrong URL, an unreachable server):
  one NLAError at once;
- the circuit breaker: `max_consecutive_failures` requests failing in a row, or more than
  `max_failure_rate` of the last `failure_window`, stop the run with what the server answered,
  instead of spending every remaining row's retries on a server that is down;
- SIGINT/SIGTERM (`nla.interrupt`) in the waiting main thread: the workers are told to stop,
  queued rows are never sent, in-flight requests are abandoned (their rows stay unlabeled)
  and nothing waits for them: the workers are daemon threads.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import re
import threading
import time
from collections import deque
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from nla.config import NLAConfig
from nla.errors import NLAError
from nla.label.backends.base import BackendStats, Result
from nla.label.cache import ResponseCache
from nla.label.prompt import chat_messages

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 120.0
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = {
    401: "the server refused the API key; set {env} to a valid key",
    403: "the server refused the API key; set {env} to a valid key",
    404: "not found; check label.openai.base_url (it usually ends in /v1) and label.openai.model",
}


def retry_delay(attempt: int, backoff_s: float, headers: dict[str, str] | None = None) -> float:
    """`Retry-After` (seconds or an HTTP date) when the server sent one, else backoff·2^attempt with jitter."""
    value = (headers or {}).get("retry-after")
    if value:
        try:
            delay = float(value)
        except ValueError:
            try:
                delay = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                delay = None
        if delay is not None and math.isfinite(delay):
            return min(max(delay, 0.0), MAX_RETRY_DELAY_S)
    return min(backoff_s * 2**attempt * (1 + 0.25 * random.random()), MAX_RETRY_DELAY_S)


def redact_url(url: str) -> str:
    """A URL without user:password@, for sidecars and logs."""
    return re.sub(r"^(\w+://)[^/@]*@", r"\1", url)


ANSWER_CHARS = 120  # of a failing server's body, quoted in the circuit breaker's message
WAIT_TICK_S = 0.5  # the main thread wakes this often while waiting: redraw progress, see a tripped breaker


class CircuitOpen(Exception):
    """The circuit breaker tripped; the message says why and what the server answered."""


class Breaker:
    """Counts request outcomes; trips on N failures in a row or too high a failure rate over a window."""

    def __init__(self, max_consecutive: int, window: int, max_rate: float):
        self.max_consecutive, self.max_rate = max_consecutive, max_rate
        self.outcomes: deque[bool] = deque(maxlen=window)  # True: the request failed
        self.in_a_row = 0

    def record(self, failed: bool, answer: str) -> str | None:
        """Why the run must stop now (naming the server's `answer`), or None."""
        self.outcomes.append(failed)
        self.in_a_row = self.in_a_row + 1 if failed else 0
        if self.max_consecutive and self.in_a_row >= self.max_consecutive:
            return f"{self.in_a_row} requests in a row failed (last answer: {answer})"
        n_failed = sum(self.outcomes)
        if failed and len(self.outcomes) == self.outcomes.maxlen and n_failed > self.max_rate * len(self.outcomes):
            return f"{n_failed} of the last {len(self.outcomes)} requests failed (last answer: {answer})"
        return None


def describe(response: httpx.Response) -> str:
    """A failed response in one short line: status, reason and the start of its body."""
    body = " ".join(response.text.split())[:ANSWER_CHARS]
    return f"HTTP {response.status_code} {response.reason_phrase}" + (f" {body!r}" if body else "")


class OpenAIClient:
    """POSTs chat completions with retries; thread-safe; tracks what it did in `stats`.

    `stop` is set when the run ends early (interrupt, breaker, fatal error): from then on no
    request is sent and no retry waits.
    """

    def __init__(self, cfg: NLAConfig, stats: BackendStats):
        self.o = cfg.label.openai
        self.url = self.o.base_url.rstrip("/") + "/chat/completions"
        self.stats = stats
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.breaker = Breaker(self.o.max_consecutive_failures, self.o.failure_window, self.o.max_failure_rate)
        self.inflight = 0
        self.any_success = False
        self.budget_warned = False
        key = os.environ.get(self.o.api_key_env)
        if not key:
            log.warning("%s is not set; sending requests without an API key", self.o.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=self.o.concurrency, max_keepalive_connections=self.o.concurrency)
        self.http = httpx.Client(headers=headers, timeout=self.o.timeout_s, limits=limits)

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        with self.lock:
            self.inflight += 1
            self.stats.requests += 1
            self.stats.peak_inflight = max(self.stats.peak_inflight, self.inflight)
        try:
            return self.http.post(self.url, json=body)
        finally:
            with self.lock:
                self.inflight -= 1

    def _outcome(self, failed: bool, answer: str, attempt: int, started: float) -> None:
        """Count one request: its time against the retry budget if it was a retry, its result in the breaker."""
        with self.lock:
            if attempt > 0:
                self.stats.retry_seconds += time.monotonic() - started
            self.any_success = self.any_success or not failed
            why = self.breaker.record(failed, answer)
        if why is not None:
            self.stop.set()
            raise CircuitOpen(why)

    def _may_retry(self, delay: float) -> bool:
        """Spend `delay` of the retry budget, or say it is spent (then failures are final)."""
        with self.lock:
            if self.stats.retry_seconds + delay > self.o.retry_budget_s:
                if not self.budget_warned:
                    self.budget_warned = True
                    log.warning(
                        "label.openai.retry_budget_s=%g s spent on retries; failing rows are recorded without more",
                        self.o.retry_budget_s,
                    )
                return False
            self.stats.retries += 1
            self.stats.retry_seconds += delay
        return True

    def complete(self, body: dict[str, Any]) -> Result:
        """The answer text, or the reason of the last failure once retries (or the budget) are spent."""
        reason = "stopped"
        for attempt in range(self.o.max_retries + 1):
            if self.stop.is_set():
                return Result(error="stopped")
            headers = None
            started = time.monotonic()
            try:
                response = self._post(body)
            except httpx.TimeoutException:
                reason, answer = "timeout", f"no answer within timeout_s={self.o.timeout_s:g} s"
            except httpx.RequestError as err:  # refused, reset, protocol errors
                reason, answer = "connection_error", ": ".join([type(err).__name__, *str(err).splitlines()[:1]])
                if attempt == self.o.max_retries and not self.any_success:
                    raise NLAError(
                        f"cannot reach {redact_url(self.url)} ({type(err).__name__}); start the server or "
                        f"fix label.openai.base_url"
                    ) from None
            else:
                with self.lock:
                    self.stats.status_codes[str(response.status_code)] += 1
                answer = describe(response)
                if response.status_code == 200:
                    try:
                        content = response.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        content = None
                    if isinstance(content, str):
                        self._outcome(False, "", attempt, started)
                        return Result(raw=content)
                    reason, answer = "bad_response", f"HTTP 200 without choices[0].message.content: {answer}"
                else:
                    reason = f"http_{response.status_code}"
                    if response.status_code in FATAL_STATUS:
                        hint = FATAL_STATUS[response.status_code].format(env=self.o.api_key_env)
                        raise NLAError(f"{redact_url(self.url)} answered HTTP {response.status_code}: {hint}")
                    if response.status_code not in RETRY_STATUS:
                        self._outcome(True, answer, attempt, started)
                        return Result(error=reason)  # e.g. 400: asking again gives the same answer
                    headers = {k.lower(): v for k, v in response.headers.items()}
            self._outcome(True, answer, attempt, started)
            if attempt == self.o.max_retries:
                break
            delay = retry_delay(attempt, self.o.backoff_s, headers)
            if not self._may_retry(delay) or self.stop.wait(delay):
                break
        return Result(error=reason)

    def close(self) -> None:
        self.http.close()


def label_openai(
    cfg: NLAConfig,
    contexts: list[str],
    tokens: list[str],
    stats: BackendStats,
    next_tokens: list[list[str]] | None = None,
) -> list[Result]:
    """Each row once through the server (or the cache), at most `concurrency` requests at a time."""
    o, lab = cfg.label.openai, cfg.label
    stats.model = o.model
    cache = ResponseCache(Path(lab.cache_dir) / "openai")
    bodies = [
        {
            "model": o.model,
            "messages": chat_messages(cfg, c, t),
            "temperature": lab.temperature,
            "max_tokens": o.max_tokens,
        }
        for c, t in zip(contexts, tokens, strict=True)
    ]
    keys = [cache.key(b) for b in bodies]  # the request body alone: the same request at another URL is reused
    results: list[Result | None] = [None] * len(bodies)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i, key in enumerate(keys):
        if (hit := cache.get(key)) is not None:
            results[i] = Result(raw=hit)
            stats.cache_hits += 1
            stats.progress.row_done(results[i], cached=True)
        else:
            todo.put(i)
    n_todo = todo.qsize()
    if n_todo:
        run_workers(OpenAIClient(cfg, stats), bodies, keys, cache, todo, n_todo, results, stats)
    return [r if r is not None else Result(error="not_run") for r in results]


def run_workers(
    client: OpenAIClient,
    bodies: list[dict[str, Any]],
    keys: list[str],
    cache: ResponseCache,
    todo: queue.SimpleQueue[int],
    n_todo: int,
    results: list[Result | None],
    stats: BackendStats,
) -> None:
    """`concurrency` daemon workers take rows from `todo`; this (main) thread collects their results.

    Only the main thread waits, and it wakes every WAIT_TICK_S, so a signal or a tripped breaker
    is acted on at once; whatever ends the wait, `client.stop` makes the workers send nothing more.
    """
    finished: queue.SimpleQueue[tuple[int, Result] | BaseException] = queue.SimpleQueue()
    n_workers = min(client.o.concurrency, n_todo)
    alive = [n_workers]

    def work() -> None:
        try:
            while not client.stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                result = client.complete(bodies[i])
                if client.stop.is_set():
                    return  # the run is ending: this row stays unlabeled, for the rerun
                if result.raw is not None:
                    cache.put(keys[i], result.raw)  # as soon as it arrives: a crash loses only in-flight requests
                finished.put((i, result))
        except BaseException as err:  # NLAError, CircuitOpen, or a bug: the main thread re-raises it
            client.stop.set()
            finished.put(err)
        finally:
            with client.lock:
                alive[0] -= 1
                last = alive[0] == 0
            if last:  # the last worker out closes the connections; nobody else uses them any more
                client.close()

    for k in range(n_workers):
        threading.Thread(target=work, name=f"nla-label-openai-{k}", daemon=True).start()
    try:
        for _ in range(n_todo):
            while True:
                try:
                    item = finished.get(timeout=WAIT_TICK_S)
                    break
                except queue.Empty:
                    stats.progress.tick()
            if isinstance(item, CircuitOpen):
                done = sum(r is not None and r.raw is not None for r in results)
                raise NLAError(
                    f"stopped after {stats.requests} requests to {redact_url(client.url)}: {item}; "
                    f"{done} of {len(results)} rows are answered and cached, fix the server (or "
                    f"label.openai) and rerun to resume"
                )
            if isinstance(item, BaseException):
                raise item
            i, result = item
            results[i] = result
            stats.progress.row_done(result)
    finally:
        client.stop.set()  # queued rows are never sent; in-flight ones are abandoned, not awaited
