"""Load check of `nla explain` / `nla.api.NLA`: memory over 1,000 texts in one call, and one 10,000-token text.

Not a speed race against a baseline like the other scripts: it measures what a user who
explains a whole corpus in one call would see. Resident memory (RSS, /proc) is sampled
every 2 ms in a thread while `nla.explain.to_records` explains texts read by `NLA.read`
(the path `nla explain` runs), and reported as the peak above the RSS before the call, and
what the process still holds after it once glibc has returned its free lists (`malloc_trim`):
the peak includes memory glibc keeps after batches of varying shapes, the held figure only
what the call's results and caches really keep:

- `batch`, `many`: 32 texts, then `--texts` (1,000) texts of real documents; the peak per
  quarter of the long call shows whether memory climbs batch after batch;
- `repeat`: `NLA.read` of the same 160 texts twice: torch and transformers keep native
  buffers per new (batch, length) shape, so the first call holds a few MiB more afterwards;
  a reader that kept its batches would hold more after the second call too, streaming does not;
- `long`: one `--long-tokens` (10,000) token text, at the default window (`max_tokens` 512:
  read through its last 512 tokens, with a warning) and at the model's full context.

CUDA runs also report torch's peak allocated memory.

    python benchmarks/bench_explain_memory.py --av data/checkpoints/av_sft --threads 2
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import threading
import time

import torch
from common import ROOT, device_label, documents, environment, parser, setup

from nla.api import NLA
from nla.explain import default_checkpoints, to_records
from nla.models import context_length

CASES = ("batch", "many", "repeat", "long")


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trimmed_rss_mib() -> float:
    """RSS once Python's garbage and glibc's free lists are returned: what the process really holds."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mib()


def profile(run, every_s: float = 0.002) -> dict[str, float]:
    """Seconds; RSS before, its peak above that, the peak per quarter of the run, and what stays held
    after it (trimmed); CUDA's peak allocation. All MiB."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mib())
            time.sleep(every_s)

    before = trimmed_rss_mib()
    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        run()
    finally:
        stop.set()
        thread.join()
    seconds = time.perf_counter() - start
    q = max(len(samples) // 4, 1)
    out = {
        "seconds": round(seconds, 2),
        "rss_before_mib": round(before, 1),
        "peak_above_mib": round(max(samples, default=before) - before, 1),
        "quarters_above_mib": [round(max(samples[i * q : (i + 1) * q], default=before) - before, 1) for i in range(4)],
        "held_after_mib": round(trimmed_rss_mib() - before, 1),
    }
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--av", default=None, help="AV checkpoint (default: the RL one if present, else av_sft)")
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--words", type=int, default=48, help="words kept of each document")
    p.add_argument("--long-tokens", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which measurements (default: all)")
    args = p.parse_args()
    setup(args)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    nla = NLA.load(args.av or default_checkpoints(ROOT)[0], device=args.device)
    model, tokenizer = nla.subject()
    texts = [f"{i}: " + " ".join(doc.split()[: args.words]) for i, doc in enumerate(documents(args, args.texts))]
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def explain(batch: list[str], max_tokens: int = 512) -> None:
        to_records(nla, *nla.read(batch, max_tokens=max_tokens, batch_size=args.batch_size), **common)

    explain(texts[:32])  # warm-up: lazy buffers and the decoder's shapes exist before measuring
    rows = []
    if "batch" in args.cases:
        rows.append({"case": "32 texts", **profile(lambda: explain(texts[:32]))})
    if "many" in args.cases:
        rows.append({"case": f"{len(texts)} texts", **profile(lambda: explain(texts))})
    if "repeat" in args.cases:  # what a call keeps is what a second, identical call adds: nothing if it streams
        for n in ("first", "second"):
            rows.append({"case": f"read 160 texts, {n} time", **profile(lambda: nla.read(texts[:160]))})
    if "long" in args.cases:
        words = " ".join(documents(args, 40)).split()
        long_text = " ".join(words * (args.long_tokens // max(len(words), 1) + 1))
        long_text = tokenizer.decode(tokenizer(long_text)["input_ids"][: args.long_tokens])
        n_long = len(tokenizer(long_text)["input_ids"])
        for window in (512, min(context_length(model) or n_long, n_long)):
            case = f"1 text of {n_long} tokens, window {window}"
            rows.append({"case": case, **profile(lambda w=window: explain([long_text], w))})

    n_tok = sum(len(t) for t in tokenizer(texts)["input_ids"])
    print(f"# explain load check: {device_label(next(model.parameters()).device)}, {json.dumps(environment())}")
    print(
        f"AV {args.av}, layer {nla.layer}; texts of {n_tok / len(texts):.0f} tokens on average, "
        f"batch {args.batch_size}, {args.max_new_tokens} new tokens each"
    )
    print(
        "| case | seconds | RSS before MiB | peak above MiB | per quarter above MiB | held after MiB | CUDA peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        quarters = " / ".join(str(q) for q in r["quarters_above_mib"])
        cuda = r.get("cuda_peak_mib", "-")
        print(
            f"| {r['case']} | {r['seconds']} | {r['rss_before_mib']} | {r['peak_above_mib']} | {quarters} | "
            f"{r['held_after_mib']} | {cuda} |"
        )
    if args.out:
        from nla.io import atomic_write_text

        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
