"""Load check of the Python API: 1,000 texts in one call stream through without growing memory.

The AV and its subject model are the tiny ones of `sft_project` (a random llama, d=32, a
256-token context). Resident memory (RSS, from /proc) is sampled every few milliseconds in a
thread while `NLA.read` and the AV explain 32 texts, then 1,000 texts of ~240 tokens each:
the peak for 1,000 must not exceed the peak for 32 by more than a few MB. Holding every
batch's hidden states until the end, as `read` once did, adds ~45 MB here.
Speed and the embedded model's numbers live in `benchmarks/bench_explain_memory.py`.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from nla.api import NLA
from nla.explain import to_records

pytestmark = pytest.mark.slow


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb(run, every_s: float = 0.002) -> float:
    """The highest RSS seen while `run()` runs, sampled in a daemon thread."""
    samples, stop = [rss_mb()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb())
            time.sleep(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        stop.set()
        thread.join()
    return max(samples)


def test_explaining_1000_texts_in_one_call_keeps_memory_flat(sft_project):
    nla = NLA.load(sft_project / "data/checkpoints/av_sft")
    texts = [f"Report {i}: " + "the river rose near the old mill and the bank " * 24 for i in range(1000)]
    assert 200 < len(nla.subject()[1](texts[0])["input_ids"]) <= 256  # inside the window: no text is cut
    records = []

    def explain(n: int) -> None:
        vectors, sites = nla.read(texts[:n], batch_size=16)
        records[:] = to_records(nla, vectors, sites, max_new_tokens=4, batch_size=16)

    explain(32)  # warm-up: every lazy buffer exists before measuring
    one_batch = peak_rss_mb(lambda: explain(32))
    thousand = peak_rss_mb(lambda: explain(1000))
    assert [r.text for r in records] == texts and all(r.explanation for r in records)
    assert thousand - one_batch < 8, (one_batch, thousand)  # MB: the peak does not grow with the number of texts
