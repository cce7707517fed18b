"""The allocator setting: applied on glibc, left alone when the user asks, and free of effects on results."""

import platform
import subprocess
import sys

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"


def run(code: str, **env: str) -> str:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc_and_yields_to_the_user():
    code = "from nla.allocator import keep_freed_memory; print(keep_freed_memory())"
    assert run(code) == "True"
    assert run(code, NLA_SYSTEM_MALLOC="1") == "False"  # the switch the benchmark's baseline uses
    assert run(code, MALLOC_MMAP_THRESHOLD_="131072") == "False"  # the user's own glibc tuning wins


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_blocks_stay_in_the_heap():
    """With the thresholds raised, the pages of freed large tensors are reused: allocating tensors of the
    same sizes again faults far fewer pages in than under glibc's defaults, which unmap each one on free."""
    code = (
        "import resource, sys, torch\n"
        "from nla.allocator import keep_freed_memory\n"
        "keep_freed_memory() if sys.argv[1] == 'ours' else None\n"
        "sizes = [n << 18 for n in (48, 64, 200)]\n"  # 48, 64 and 200 MiB of float32
        "[torch.ones(n) for n in sizes]\n"  # each allocated and freed once
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3): [torch.ones(n) for n in sizes]\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )

    def faults(side: str) -> int:
        return int(run(code.replace("sys.argv[1]", repr(side))))

    pages = 3 * (48 + 64 + 200) * 256  # the pages of the 9 allocations measured
    assert faults("glibc") > 0.9 * pages  # each allocation faults its pages in anew
    assert faults("ours") < 0.5 * pages
