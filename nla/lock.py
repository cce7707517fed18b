"""One writer per workspace: an exclusive, non-blocking lock on `.nla.lock` in the project root.

DVC's repo lock covers `dvc repro`, but direct `nla <stage>` calls and the Prefect flow (which
runs one `dvc repro --single-item` per stage, releasing DVC's lock in between) need their own.
The lock is `flock(2)` on a file, so the kernel releases it when the holder exits for any
reason, `kill -9` included: a crashed run never leaves a stale lock behind. The file itself
stays (deleting it would race with a newcomer); it only records who holds it.

Nesting: the holder exports `NLA_WORKSPACE_LOCK=<lock path>`, so the processes it starts
(the flow's `dvc repro` running `nla <stage>`) do not refuse their own parent.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nla.errors import NLAError

LOCK_NAME = ".nla.lock"
HELD_ENV = "NLA_WORKSPACE_LOCK"


def lock_path(root: str | os.PathLike = ".") -> Path:
    return (Path(root) / LOCK_NAME).resolve()


def lock_holder(root: str | os.PathLike = ".") -> str:
    """What the lock file says about its holder ('pid N: command'), or '?' when unreadable."""
    try:
        return lock_path(root).read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


@contextmanager
def workspace_lock(root: str | os.PathLike = ".", what: str | None = None) -> Iterator[Path]:
    """Hold the workspace lock for the duration of the block; refuse at once if another run holds it."""
    path = lock_path(root)
    if os.environ.get(HELD_ENV) == str(path):  # started by the holder itself
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NLAError(
                f"another nla run holds the workspace lock {path} ({lock_holder(root)}); "
                "wait for it to finish or stop it, then rerun (a killed run releases the lock by itself)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {what or ' '.join(sys.argv)}\n".encode())
        os.environ[HELD_ENV] = str(path)
        try:
            yield path
        finally:
            os.environ.pop(HELD_ENV, None)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
