"""Ctrl-C and SIGTERM, for real, in the middle of extract, av-sft, ar-sft and rl (label: test_label_faults.py).

Each stage runs as a real `nla` process on the tiny models of `test_reliability`; once it has
finished some work (a shard, a checkpoint) it gets a real SIGINT or SIGTERM. Checked: it exits
within seconds with 130 or 143 and one line, no traceback; what it finished is on disk, whole;
no temporary file is left; no output appears under its final name; and the rerun resumes from
the finished work instead of starting over. That the resumed run equals an uninterrupted one
is `tests/test_crash.py`'s subject (there with `kill -9`); here the cost is one interrupted run
per stage, and the rerun calls the same stage function in-process (no second interpreter start).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import pandas as pd
import pytest
import yaml
from test_reliability import (
    copy_project,
    finished_files,
    no_temp_files,
    retune,
    start_stage,
)

from nla.io import read_table, write_table

pytestmark = pytest.mark.slow

STOPPED_WITHIN_S = 5.0


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], signum: int, timeout: float = 300) -> str:
    """Send `signum` once `ready()` holds; assert a prompt, clean stop; return the stage's stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the stage ended before the signal (rc={proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the signal point was not reached in time")
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == 128 + signum and seconds < STOPPED_WITHIN_S, (proc.returncode, seconds, err[-2000:])
    stage = proc.args[3]
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if line.startswith(f"nla {stage}: ")]
    assert lines == [f"nla {stage}: interrupted by {name}; finished work is kept, rerun the same command to resume"]
    assert "Traceback" not in err, err[-3000:]
    return err


def rerun(project, stage: str, monkeypatch, capsys) -> str:
    """The stage function the CLI runs, in this process from the project folder; its stdout."""
    from nla.cli import STAGES
    from nla.config import load_config

    monkeypatch.chdir(project)
    capsys.readouterr()
    STAGES[stage.replace("_", "-")][0](load_config("params.yaml"), argparse.Namespace(apply=False))
    return capsys.readouterr().out


def test_extract_stops_on_sigterm_and_resumes_from_its_shards(tmp_path, data_project, monkeypatch, capsys):
    """200 one-document shards on the tiny model: SIGTERM after 5; the rerun keeps them and adds the rest."""
    project = retune(copy_project(data_project, tmp_path / "p"), {"extract": {"shard_docs": 1}})
    docs = pd.DataFrame(
        {
            "doc_id": [f"doc-{i:04d}" for i in range(200)],
            "text": [f"Item {i}: the river rose near the old mill and the bank closed early." for i in range(200)],
            "source": "test",
        }
    )
    write_table(project / "data/corpus/documents.parquet", docs)
    before = {p.name: p.read_bytes() for p in finished_files(project / "data/activations")}
    work = project / "data/work/extract"
    shards = lambda: sorted(work.rglob("shard-*.parquet"))  # noqa: E731
    interrupt_when(start_stage(project, "extract"), lambda: len(shards()) >= 5, signal.SIGTERM)

    kept = shards()
    assert 5 <= len(kept) < 200 and all(len(read_table(p)) == 2 for p in kept)  # whole shards only
    assert {p.name: p.read_bytes() for p in finished_files(project / "data/activations")} == before  # old output
    no_temp_files(project / "data")
    inodes = {p.name: p.stat().st_ino for p in kept}

    rewritten, done = set(), threading.Event()

    def watch() -> None:  # a finished shard is read back, never written again
        while not done.is_set():
            for path in shards():
                try:
                    if path.name in inodes and path.stat().st_ino != inodes[path.name]:
                        rewritten.add(path.name)
                except FileNotFoundError:  # the stage removes its shards once the table is written
                    pass
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = rerun(project, "extract", monkeypatch, capsys)
    finally:
        done.set()
        watcher.join()
    assert not rewritten and "extract: 400 activations from 200 documents" in out
    table = read_table(project / "data/activations/activations.parquet")
    assert table.doc_id.nunique() == 200 and len(table) == 400
    assert not list(work.rglob("*.parquet"))  # done: the shards are gone


def test_av_sft_stops_on_sigint_and_resumes_from_its_checkpoint(tmp_path, sft_project, monkeypatch, capsys):
    project = retune(copy_project(sft_project, tmp_path / "p"), {"av_sft": {"max_steps": 4, "save_steps": 2}})
    before = {p.name: p.read_bytes() for p in finished_files(project / "data/checkpoints/av_sft")}
    work = project / "data/work/av_sft"
    proc = start_stage(project, "av_sft")
    interrupt_when(proc, lambda: any(work.glob("checkpoint-*/nla_resume.json")), signal.SIGINT)
    assert [p.name for p in work.glob("checkpoint-*")] == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in finished_files(project / "data/checkpoints/av_sft")} == before
    no_temp_files(project / "data/checkpoints")

    assert "av_sft: resumed at step 2" in rerun(project, "av_sft", monkeypatch, capsys)
    assert pd.read_csv(project / "plots/av_sft_loss.csv").step.tolist() == [1, 2, 3, 4]


def test_ar_sft_stops_on_sigterm_and_resumes_from_its_checkpoint(tmp_path, sft_project, monkeypatch, capsys):
    params = {
        "ar_sft": {"batch_size": 2, "epochs": 1.0, "checkpoint_every": 2, "av_explanations": 4}
    }  # 12 + 4 rows: 8 steps
    project = retune(copy_project(sft_project, tmp_path / "p"), params)
    before = {p.name: p.read_bytes() for p in finished_files(project / "data/checkpoints/ar_sft")}
    work = project / "data/work/ar_sft"
    interrupt_when(start_stage(project, "ar_sft"), lambda: bool(finished_files(work)), signal.SIGTERM)
    assert {p.name: p.read_bytes() for p in finished_files(project / "data/checkpoints/ar_sft")} == before
    no_temp_files(project / "data")

    assert "ar_sft: resumed at step" in rerun(project, "ar_sft", monkeypatch, capsys)
    assert pd.read_csv(project / "plots/ar_sft_loss.csv").step.tolist() == list(range(1, 9))


def test_rl_stops_on_sigint_and_resumes_from_its_checkpoint(tmp_path, sft_project, monkeypatch, capsys):
    project = copy_project(sft_project, tmp_path / "p")
    assert yaml.safe_load((project / "params.yaml").read_text())["rl"]["checkpoint_every"] == 2
    state = project / "data/work/rl/checkpoint/state.pt"
    interrupt_when(start_stage(project, "rl"), state.exists, signal.SIGINT)
    assert not (project / "data/checkpoints/rl").exists()
    no_temp_files(project / "data")

    assert "rl: resumed at step 2" in rerun(project, "rl", monkeypatch, capsys)
    assert pd.read_csv(project / "plots/rl_log.csv").step.tolist() == [1, 2, 3, 4]
