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
def test_a_large_tensor_comes_from_the_heap_not_from_its_own_mmap():
    """With the thresholds raised, a 64 MiB tensor is carved from the heap, whose pages stay mapped when it
    is freed; under glibc's defaults it gets its own mmap (unmapped on free, faulted in anew next time).
    `mallinfo2().hblkhd` is the bytes glibc holds in such mmaps."""
    code = (
        "import ctypes, sys, torch\n"
        "from nla.allocator import keep_freed_memory\n"
        "class Info(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in "
        "('arena','ordblks','smblks','hblks','hblkhd','usmblks','fsmblks','uordblks','fordblks','keepcost')]\n"
        "mallinfo2 = ctypes.CDLL('libc.so.6').mallinfo2\n"
        "mallinfo2.restype = Info\n"
        "keep_freed_memory() if SIDE == 'ours' else None\n"
        "before = mallinfo2().hblkhd\n"
        "tensor = torch.ones(1 << 24)\n"  # 64 MiB of float32
        "print(mallinfo2().hblkhd - before)\n"
    )

    def mmapped(side: str) -> int:
        return int(run(code.replace("SIDE", repr(side))))

    assert mmapped("glibc") >= 64 << 20
    assert mmapped("ours") == 0
