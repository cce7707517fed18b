"""Ctrl-C and SIGTERM: every command stops within seconds, keeps its finished work, exits 130 or 143.

Python turns SIGINT into `KeyboardInterrupt` but lets SIGTERM (what `kill`, `timeout`, a job
scheduler or a container runtime sends) end the process outright, skipping every `finally`:
the labeler's workers would never hear that they must stop, and temporary files would stay.
`install_signal_handlers()` routes both signals through one exception, `Interrupted`, a
subclass of `KeyboardInterrupt`, so code that already cleans up on Ctrl-C does the same on
SIGTERM, and the stages need no signal code of their own. What survives an interrupt is what
survives a `kill -9` (every write is atomic, `nla.io`): extract shards, cached labeler
answers, trainer and RL checkpoints under `data/work/`; the rerun resumes from them.

A second signal, or a command still running `GRACE_S` seconds after the first (a C call or a
network read that does not return), ends the process at once with the same exit code: by then
nothing the rerun needs is in memory only.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 5.0  # after the first signal: time to unwind (finally blocks, temp files) before a hard exit

_reported = threading.Event()  # the line is printed once, by whichever exit comes first


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the command exits with the shell's 128 + `signum` (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_interrupted(command: str, signum: int) -> NoReturn:
    """Print the one line that says a signal stopped `command`, then end the process with 128 + signum.

    Called once the stage has unwound (every `finally` ran: temp files gone, workers told to
    stop), so what is left is the interpreter's teardown of torch and transformers, seconds on a
    loaded machine with nothing to save; `os._exit` skips it, and any daemon thread still stuck
    in a network read with it.
    """
    if not _reported.is_set():
        _reported.set()
        name = signal.Signals(signum).name
        print(
            f"{command}: interrupted by {name}; finished work is kept, rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
    sys.stdout.flush()
    os._exit(128 + signum)


def install_signal_handlers(command: str, grace_s: float = GRACE_S) -> None:
    """From now on SIGINT and SIGTERM raise `Interrupted` in the main thread (for the `nla` process).

    Once a signal arrived, the hard exit stays armed until the process ends. A signal the parent
    process told us to ignore (SIG_IGN, e.g. SIGINT for a background job of a non-interactive
    shell) stays ignored. Outside the main thread nothing is installed (Python only lets the main
    thread set handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    first: list[int] = []

    def handler(signum: int, frame) -> None:
        if first:  # the second signal: the user means it
            exit_interrupted(command, first[0])
        first.append(signum)
        timer = threading.Timer(grace_s, exit_interrupted, (command, signum))
        timer.daemon = True
        timer.start()
        raise Interrupted(signum)

    for s in SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, handler)
