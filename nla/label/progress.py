"""The label stage's live progress bar, the same for every backend.

Rows done out of all, with tqdm's rate and ETA, and a postfix of what a stuck or failing run
needs to show at once: rows failed (no answer), rows malformed (an answer the parser refuses),
and for a server backend requests/s and retries. Backends report each row as it finishes
(`RowProgress.row_done`); rows read back from the cache count as done from the start and are
kept out of the rate, so the ETA reflects the work still to do.
"""

from __future__ import annotations

import threading
import time

from tqdm.auto import tqdm

from nla.config import NLAConfig
from nla.label.backends.base import BackendStats, Result, RowProgress
from nla.label.parse import parse_response


class LabelProgress(RowProgress):
    """A tqdm bar over the rows, safe to update from the openai backend's worker threads."""

    def __init__(self, cfg: NLAConfig, total: int, stats: BackendStats):
        self.cfg, self.stats = cfg, stats
        self.failed = self.malformed = 0
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.bar = tqdm(total=total, desc=f"label ({cfg.label.backend})", unit="row")

    def row_done(self, result: Result, cached: bool = False) -> None:
        lab, inj = self.cfg.label, self.cfg.injection
        with self.lock:
            if result.raw is None:
                self.failed += 1
            elif parse_response(result.raw, lab.min_features, inj.marker_ranges, inj.marker_char).reason:
                self.malformed += 1
            if cached:  # done before this run started: part of tqdm's `initial`, outside the rate
                self.bar.n += 1
                self.bar.initial = self.bar.last_print_n = self.bar.n
                return
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(1)

    def tick(self) -> None:
        with self.lock:
            self.bar.set_postfix_str(self._postfix())  # redraws: elapsed time and requests/s keep moving

    def _postfix(self) -> str:
        parts = [f"failed={self.failed}", f"malformed={self.malformed}"]
        if self.stats.requests:
            rate = self.stats.requests / max(time.monotonic() - self.started, 1e-9)
            parts += [f"req/s={rate:.1f}", f"retries={self.stats.retries}"]
        return ", ".join(parts)

    def close(self) -> None:
        with self.lock:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.close()
