"""The openai labeler: any /v1/chat/completions server, each row asked once.

Bounded concurrency (`label.openai.concurrency` requests in flight), timeouts, retries with
exponential backoff that honour `Retry-After`, and the on-disk cache: every answer is stored
as soon as it arrives, so a rerun or a resumed crash sends no request twice. A refused key,
a wrong URL or an unreachable server is a misconfiguration every row would hit: it stops the
run with one NLAError instead of failing each row.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

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


class OpenAIClient:
    """POSTs chat completions with retries; thread-safe; tracks what it did in `stats`."""

    def __init__(self, cfg: NLAConfig, stats: BackendStats):
        self.o = cfg.label.openai
        self.url = self.o.base_url.rstrip("/") + "/chat/completions"
        self.stats = stats
        self.lock = threading.Lock()
        self.inflight = 0
        self.any_success = False
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

    def complete(self, body: dict[str, Any]) -> Result:
        """The answer text, or the reason of the last failure once retries are spent."""
        for attempt in range(self.o.max_retries + 1):
            headers = None
            try:
                response = self._post(body)
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.RequestError as err:  # refused, reset, protocol errors
                reason = "connection_error"
                if attempt == self.o.max_retries and not self.any_success:
                    raise NLAError(
                        f"cannot reach {redact_url(self.url)} ({type(err).__name__}); start the server or "
                        f"fix label.openai.base_url"
                    ) from None
            else:
                with self.lock:
                    self.stats.status_codes[str(response.status_code)] += 1
                if response.status_code == 200:
                    try:
                        content = response.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        content = None
                    if isinstance(content, str):
                        self.any_success = True
                        return Result(raw=content)
                    reason = "bad_response"
                else:
                    reason = f"http_{response.status_code}"
                    if response.status_code in FATAL_STATUS:
                        hint = FATAL_STATUS[response.status_code].format(env=self.o.api_key_env)
                        raise NLAError(f"{redact_url(self.url)} answered HTTP {response.status_code}: {hint}")
                    if response.status_code not in RETRY_STATUS:
                        return Result(error=reason)  # e.g. 400: asking again gives the same answer
                    headers = {k.lower(): v for k, v in response.headers.items()}
            if attempt < self.o.max_retries:
                with self.lock:
                    self.stats.retries += 1
                time.sleep(retry_delay(attempt, self.o.backoff_s, headers))
        return Result(error=reason)


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
    todo = []
    for i, key in enumerate(keys):
        if (hit := cache.get(key)) is not None:
            results[i] = Result(raw=hit)
            stats.cache_hits += 1
        else:
            todo.append(i)
    if todo:
        client = OpenAIClient(cfg, stats)

        def one(i: int) -> None:
            result = client.complete(bodies[i])
            if result.raw is not None:
                cache.put(keys[i], result.raw)  # as soon as it arrives: a crash loses only in-flight requests
            results[i] = result

        bar = tqdm(total=len(bodies), initial=len(bodies) - len(todo), desc=f"label (openai {o.model})", unit="row")
        with bar, client.http, ThreadPoolExecutor(max_workers=o.concurrency) as pool:
            pending = {pool.submit(one, i) for i in todo}
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:  # NLAError: a misconfiguration that every row would hit
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                bar.update(len(done))
                bar.set_postfix(retries=stats.retries, cached=stats.cache_hits)
    return [r if r is not None else Result(error="not_run") for r in results]
