"""The openai labeler against servers that fail for good, hang, or are slow when the user presses Ctrl-C.

Each server is a real HTTP server (`chat_server.ChatServer`) on a loopback port that counts
what it received; the labeler is the real stage, in-process (`run_label`) or as the `nla
label` CLI stopped by a real signal. Checked every time: what the server saw (requests,
requests in flight at once), what the cache kept, and that a rerun sends only the rows that
had no answer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from chat_server import ChatServer, always
from test_label import ECHO_TEMPLATE, MARKER, TEXTS, activation_row, openai_cfg, outputs
from test_reliability import NLA, make_project, sigint_as_in_a_terminal

from nla.config import load_config
from nla.errors import NLAError
from nla.io import write_table
from nla.label import run_label
from nla.sidecar import make_meta, write_sidecar

SPLITS = ["av_sft", "ar_sft", "rl", "eval"]


def write_rows(root: Path, per_doc: int = 5) -> int:
    """activations + splits under root/data (the CLI's paths): `per_doc` rows of each of TEXTS, all splits."""
    rows, split_rows = [], []
    rng = np.random.default_rng(0)
    for d, text in enumerate(TEXTS):
        words = text.split(" ")
        for n in range(4, 4 + per_doc):
            rows.append(activation_row(d, words, n, rng.standard_normal(8).astype(np.float32)))
            split_rows.append({"row_id": rows[-1]["row_id"], "doc_id": f"doc-{d:02d}", "split": SPLITS[d % 4]})
    act, spl = root / "data/activations", root / "data/split"
    write_table(act / "activations.parquet", pd.DataFrame(rows))
    write_sidecar(act, make_meta("nla_dataset", "extract", base_model="test-model", d_model=8, layer=0, rows=len(rows)))
    write_table(spl / "splits.parquet", pd.DataFrame(split_rows))
    return len(rows)


def cfg_for(server: ChatServer, root: Path, **openai):
    cfg = openai_cfg(server.url, root / "cache", concurrency=openai.pop("concurrency", 2), max_retries=3)
    cfg.label.splits = SPLITS
    for key, value in openai.items():
        setattr(cfg.label.openai, key, value)
    return cfg


def cached(root: Path) -> list[Path]:
    return sorted((root / "cache" / "openai").rglob("*.json"))


def run(cfg, root: Path, out: str = "labels"):
    return run_label(cfg, root / "data/activations", root / "data/split", root / out)


# ----------------------------------------------------------------------------- circuit breaker


def test_breaker_stops_a_server_that_fails_for_good_and_the_rerun_resumes(tmp_path):
    """6 answers, then HTTP 504 for ever: the stage stops after 5 failures in a row, not after every row's retries."""
    n_rows = write_rows(tmp_path)
    healthy = [False]
    plan = lambda n: ("answer", 0.0) if n < 6 or healthy[0] else ("status", 504, 0.0)  # noqa: E731
    with ChatServer(plan) as server:
        cfg = cfg_for(server, tmp_path, max_consecutive_failures=5, max_retries=5, backoff_s=0.01)
        started = time.monotonic()
        with pytest.raises(NLAError) as err:
            run(cfg, tmp_path)
        seconds, sent = time.monotonic() - started, server.requests
        message = str(err.value)
        assert "\n" not in message
        assert re.search(
            r"5 requests in a row failed \(last answer: HTTP 504 Gateway Timeout .*injected HTTP 504", message
        )
        assert f"stopped after {sent} requests" in message and f"6 of {n_rows} rows are answered and cached" in message
        assert 6 + 5 <= sent <= 6 + 5 + cfg.label.openai.concurrency and seconds < 5
        assert len(cached(tmp_path)) == 6 and not (tmp_path / "labels").exists()

        healthy[0] = True  # the server is fixed: the rerun asks only for the rows without an answer
        before = server.requests
        run(cfg, tmp_path)
        _, _, stats = outputs(tmp_path / "labels")
        assert stats["cache_hits"] == 6 and server.requests - before == stats["requests"] == n_rows - 6
        assert stats["labeled"] + stats["failed"] == n_rows
    print(f"fault run [504 storm]: rows in {n_rows}, labeled 6 (cached), failed 0, requests {sent}, {seconds:.2f} s")


def test_breaker_trips_on_the_failure_rate_over_a_window(tmp_path):
    """One request in four answers: never 20 failures in a row, but 3 of 4 over the window of 8 is above 0.6."""
    n_rows = write_rows(tmp_path)
    with ChatServer(lambda n: ("answer", 0.0) if n % 4 == 0 else ("status", 500, 0.0)) as server:
        cfg = cfg_for(server, tmp_path, failure_window=8, max_failure_rate=0.6, backoff_s=0.001)
        with pytest.raises(NLAError, match=r"[56] of the last 8 requests failed \(last answer: HTTP 500 Internal Serv"):
            run(cfg, tmp_path)
        assert server.requests <= 8 + 2 * cfg.label.openai.concurrency
    answered = len(cached(tmp_path))
    print(
        f"fault run [3 of 4 HTTP 500]: rows in {n_rows}, labeled {answered} (cached), failed 0, requests {server.requests}"
    )


def test_retry_budget_bounds_the_time_spent_retrying_and_is_counted(tmp_path, caplog):
    """Every other request fails; a 0.3 s budget with 0.1 s backoff allows ~2 retries, then failures are final."""
    n_rows = write_rows(tmp_path, per_doc=2)
    with ChatServer(lambda n: ("answer", 0.0) if n % 2 else ("status", 503, 0.0)) as server:
        cfg = cfg_for(server, tmp_path, backoff_s=0.1, retry_budget_s=0.3, max_failure_rate=1.0, concurrency=1)
        with caplog.at_level(logging.WARNING, logger="nla.label.backends.openai"):
            run(cfg, tmp_path)
        good, bad, stats = outputs(tmp_path / "labels")
    assert "label.openai.retry_budget_s=0.3 s spent on retries; failing rows are recorded without more" in caplog.text
    assert stats["retry_budget_s"] == 0.3 and 0.1 <= stats["retry_seconds"] <= 0.3 + 0.1
    assert 1 <= stats["retries"] <= 3  # each wait is 0.1-0.125 s (backoff·2^attempt with jitter)
    assert stats["requests"] == server.requests == n_rows + stats["retries"]
    # Requests 0, 2, 4, ... fail; each failure is retried until the budget is spent, later ones are final.
    failed = int((bad.reason == "request_failed:http_503").sum())
    assert failed == -(-stats["requests"] // 2) - stats["retries"] and len(good) + len(bad) == n_rows
    print(
        f"fault run [503 every other, budget 0.3 s]: rows in {n_rows}, labeled {len(good)}, failed {len(bad)}, "
        f"requests {stats['requests']}, retry_seconds {stats['retry_seconds']}"
    )


def test_hung_requests_are_closed_so_the_server_never_sees_more_than_the_bound(tmp_path):
    """A server that never answers: each request is closed at timeout_s before its worker sends the next one."""
    n_rows = write_rows(tmp_path)
    with ChatServer(always(("hang",))) as server:
        cfg = cfg_for(server, tmp_path, concurrency=3, timeout_s=0.3, max_consecutive_failures=9, backoff_s=0.001)
        started = time.monotonic()
        with pytest.raises(
            NLAError, match=r"9 requests in a row failed \(last answer: no answer within timeout_s=0\.3 s\)"
        ):
            run(cfg, tmp_path)
        seconds, sent = time.monotonic() - started, server.requests
        assert server.peak_inflight == 3  # the bound held, and was used
        assert 9 <= sent <= 9 + 3 and seconds < 3
        deadline = time.monotonic() + 3
        while server.open_requests() and time.monotonic() < deadline:  # the abandoned in-flight ones time out too
            time.sleep(0.05)
        assert server.open_requests() == 0

        # The measurement can fail: 5 clients that send a request and never hang up all count as in flight.
        import socket

        clients = [socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) for _ in range(5)]
        for sock in clients:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        deadline = time.monotonic() + 3
        while server.open_requests() < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.open_requests() == 5 and server.peak_inflight == 5
        for sock in clients:
            sock.close()
    print(f"fault run [hang, timeout 0.3 s]: rows in {n_rows}, labeled 0, failed 0, requests {sent}, peak in flight 3")


# ----------------------------------------------------------------------------- live progress


def test_progress_counts_rows_failed_and_malformed_as_they_finish(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    n_rows = write_rows(tmp_path, per_doc=2)
    with ChatServer(lambda n: ("status", 400, 0.05) if n in (3, 7) else ("answer", 0.05)) as server:
        run(cfg_for(server, tmp_path, concurrency=1), tmp_path)
    bars = [b for b in re.split(r"[\r\n]", capsys.readouterr().err) if b.startswith("label (openai)")]
    done = [int(m.group(1)) for b in bars if (m := re.search(rf"\| *(\d+)/{n_rows} \[", b))]
    assert len(set(done)) > 5 and done == sorted(done)  # the bar moved row by row, not 0 then 100%
    assert "failed=2, malformed=2" in bars[-1]  # 2 HTTP 400s; the 2 rows whose text holds the marker
    assert re.search(r"req/s=\d+\.\d, retries=0", bars[-1]) and "<00:00" in bars[-1]  # requests/s and the ETA
    assert sum(MARKER in t for t in TEXTS) == 1


# ----------------------------------------------------------------------------- real signals


def label_project(root: Path, server: ChatServer, concurrency: int = 3, timeout_s: float = 30.0) -> tuple[Path, int]:
    project = make_project(
        root,
        {
            "label": {
                "backend": "openai",
                "splits": SPLITS,
                "user_template": ECHO_TEMPLATE,
                "cache_dir": "data/cache/label",
                "openai": {
                    "base_url": server.url + "/v1",
                    "model": "x",
                    "api_key_env": "NLA_TEST_NO_KEY",
                    "concurrency": concurrency,
                    "timeout_s": timeout_s,
                    "backoff_s": 0.01,
                },
            }
        },
    )
    return project, write_rows(project)


def start_label(project: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the bar is part of what is checked
    return subprocess.Popen(
        [NLA, "--params", "params.yaml", "label"],
        cwd=project,
        env=dict(env, PYTHONWARNINGS="ignore"),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=sigint_as_in_a_terminal,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"nla label ended early (rc={proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "the signal point was not reached in time"
        time.sleep(0.02)


def stopped_by(proc: subprocess.Popen, signum: int) -> tuple[float, str]:
    """Send `signum`; return (seconds until the process exited, its stderr)."""
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    return time.monotonic() - sent, err


def one_interrupt_line(err: str, signame: str) -> None:
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("nla label: ")]
    assert lines == [f"nla label: interrupted by {signame}; finished work is kept, rerun the same command to resume"]
    assert "Traceback" not in err, err[-3000:]


def test_sigint_stops_label_at_once_keeps_answers_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A slow server (0.3 s an answer, 3 at a time): Ctrl-C after 6 answers stops the run, nothing more is sent."""
    with ChatServer(always(("answer", 0.3))) as server:
        project, n_rows = label_project(tmp_path, server)
        cache = project / "data/cache/label/openai"
        proc = start_label(project)
        wait_for(lambda: len(list(cache.rglob("*.json"))) >= 6, proc)
        signalled = time.monotonic()
        seconds, err = stopped_by(proc, signal.SIGINT)
        assert proc.returncode == 130 and seconds < 3, (proc.returncode, seconds, err[-2000:])
        one_interrupt_line(err, "SIGINT")
        time.sleep(0.5)
        assert server.requests_after(signalled + 0.1) == 0  # no queued row was sent after the signal
        assert server.open_requests() == 0  # the in-flight ones died with the process, none left hanging
        kept = list(cache.rglob("*.json"))
        assert all(json.loads(p.read_text())["response"].startswith("<analysis>") for p in kept)  # whole answers
        assert not (project / "data/labels").exists()
        sent = server.requests
        assert len(kept) <= sent <= len(kept) + 3
        progress = [int(m.group(1)) for m in re.finditer(rf"\| *(\d+)/{n_rows} \[", err)]
        assert progress and 0 < max(progress) <= len(kept)  # the bar had moved before the interrupt

        server.plan = always(("answer", 0.0))
        before = server.requests
        monkeypatch.chdir(project)  # the rerun: the stage function `nla label` calls, in this process
        run_label(load_config("params.yaml"), "data/activations", "data/split", "data/labels")
        _, _, stats = outputs(project / "data/labels")  # the counts and this run's facts (provenance)
        assert stats["cache_hits"] == len(kept) and server.requests - before == n_rows - len(kept)
        assert stats["labeled"] + stats["failed"] == stats["rows"] == n_rows
    print(
        f"fault run [SIGINT, slow server]: rows in {n_rows}, labeled {len(kept)} (cached) before the signal, "
        f"failed 0, requests {sent}, exit 130 after {seconds:.2f} s; rerun sent {n_rows - len(kept)}"
    )


def test_sigterm_does_not_wait_for_hung_requests(tmp_path):
    """Every request hangs (timeout_s 30): SIGTERM ends the run in well under a second of the hang."""
    with ChatServer(always(("hang",))) as server:
        project, n_rows = label_project(tmp_path, server, concurrency=4)
        proc = start_label(project)
        wait_for(lambda: server.open_requests() == 4, proc)
        seconds, err = stopped_by(proc, signal.SIGTERM)
        assert proc.returncode == 143 and seconds < 3, (proc.returncode, seconds, err[-2000:])
        one_interrupt_line(err, "SIGTERM")
        assert server.requests == 4 and server.peak_inflight == 4
        time.sleep(0.2)
        assert server.open_requests() == 0
        assert not list((project / "data/cache").rglob("*.json")) and not (project / "data/labels").exists()
    print(
        f"fault run [SIGTERM, hung server]: rows in {n_rows}, labeled 0, failed 0, requests 4, exit 143 after {seconds:.2f} s"
    )
