"""Keep freed memory in the process heap: glibc's defaults make every large CPU tensor a page-fault storm.

A training or decoding step allocates and frees tensors of tens of MB (logits, attention and MLP
activations, their gradients). Above its mmap threshold glibc serves each one from a fresh `mmap`
and unmaps it on free, so the kernel zeroes every page again on first touch: on the embedded CPU
default that was up to a quarter of an AV-SFT process's CPU time (system time 6-12 s of 48 s for
16 steps). Raising the mmap and trim thresholds keeps the pages in the heap for reuse: 1.1x to 1.5x
faster steps, varying with the machine's state (`benchmarks/bench_allocator.py`). The price is a resident size that stays at its peak, which a
stage process reaches anyway.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
KEEP_BYTES = 2**31 - 1  # mallopt takes an int: about 2 GiB, above any single CPU tensor of a stage
ENV_OFF = "NLA_SYSTEM_MALLOC"  # set to 1 to keep glibc's defaults (to compare, or off glibc)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that does not apply."""
    if os.environ.get(ENV_OFF) == "1" or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False  # the user chose the allocator's settings
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's, no library search at start-up
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
