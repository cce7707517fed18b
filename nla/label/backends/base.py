"""What a labeler backend is: a plain function from rows to raw responses.

    backend(cfg, contexts, tokens, stats, next_tokens) -> list[Result]   # one Result per row, in order

`contexts` are the rows' texts already cut to `label.context_tokens`, `tokens` their final
tokens, `next_tokens` the subject model's own most likely next tokens at each row's position
(extract's `next_tokens` column; None when extract ran with `top_next: 0`). A backend never
parses: it returns the raw response (or why none came) and fills `stats` with what it did;
the stage parses every response the same way. As each row finishes (or is found in the
cache) the backend calls `stats.progress.row_done(result)`, so the stage's progress bar
moves with the work, whatever the backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nla.config import NLAConfig


@dataclass
class Result:
    """A backend's answer for one row: the raw response, or why no response came."""

    raw: str | None = None
    error: str | None = None


class RowProgress:
    """Where a backend reports finished rows; this one ignores them (the stage passes a live bar)."""

    def row_done(self, result: Result, cached: bool = False) -> None:
        """One row finished: answered, failed, or read back from the cache (`cached`)."""

    def tick(self) -> None:
        """Nothing finished, but time passed: redraw (a backend waiting on a slow server calls this)."""


@dataclass
class BackendStats:
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    retry_seconds: float = 0.0  # waits before retries plus the retried requests themselves, all rows summed
    status_codes: Counter = field(default_factory=Counter)
    peak_inflight: int = 0
    generated_tokens: int = 0
    model: str = ""
    progress: RowProgress = field(default_factory=RowProgress, repr=False)


def computed(responses: Iterable[str], stats: BackendStats) -> list[Result]:
    """The results of a backend that writes each answer itself (no server, no cache), counted as each is done."""
    results = []
    for raw in responses:
        results.append(Result(raw=raw))
        stats.progress.row_done(results[-1])
    return results


Backend = Callable[[NLAConfig, list[str], list[str], BackendStats, list[list[str]] | None], list[Result]]
