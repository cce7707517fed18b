"""Crash safety: a real `kill -9` in the middle of a stage, then a rerun.

For each stage: start it as a real process, wait until it has finished some work (shards,
cached labeler answers, trainer checkpoints), SIGKILL it, then check that (1) no output file
under its final name exists half-written, (2) the finished work is still there and the rerun
reuses it instead of redoing it, and (3) the rerun's outputs equal those of an uninterrupted
run: checksums of the data tables; for training, the step sequence continues and the
metrics match.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_reliability import (
    NLA,
    STAGE_ENV,
    copy_project,
    finished_files,
    make_project,
    no_temp_files,
    retune,
    run_stage,
    start_stage,
)

pytestmark = pytest.mark.slow

ENV = STAGE_ENV


def start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [NLA, "--params", "params.yaml", *args],
        cwd=project,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def run_ok(project: Path, *args: str) -> str:
    result = subprocess.run(
        [NLA, "--params", "params.yaml", *args], cwd=project, env=ENV, text=True, capture_output=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it exits first (the kill point was never reached)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"the stage finished before the kill point (rc={proc.returncode}): {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inodes(files: list[Path]) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in files if p.exists()}


# ----------------------------------------------------------------------------- extract

EXTRACT = {
    "corpus": {"max_docs": 14, "foreign": {}},
    "extract": {"max_tokens": 96, "shard_docs": 1, "positions_per_doc": 2},
}


def test_extract_killed_mid_run_resumes_from_its_shards(tmp_path):
    reference = make_project(tmp_path / "ref", EXTRACT)
    run_ok(reference, "corpus")
    run_ok(reference, "extract")

    project = make_project(tmp_path / "crash", EXTRACT)
    run_ok(project, "corpus")
    work = project / "data/work/extract"
    shards = lambda: sorted(work.rglob("shard-*.parquet"))  # noqa: E731
    proc = start(project, "extract")
    kill_when(proc, lambda: len(shards()) >= 3)

    kept = shards()
    assert 3 <= len(kept) < 14, "killed too late to test a resume"
    assert not (project / "data/activations").exists()  # no final output before the stage completes
    from nla.io import read_table

    for shard in kept:  # every file under a final name is complete (atomic rename)
        assert len(read_table(shard)) == 2
    before = inodes(kept)

    # Rerun, watching the shard folder: finished shards must be read back, never rewritten.
    proc = start(project, "extract")
    seen: dict[str, set[int]] = {}
    while proc.poll() is None:
        for name, ino in inodes(shards()).items():
            seen.setdefault(name, set()).add(ino)
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert all(seen.get(name, {ino}) == {ino} for name, ino in before.items()), "a finished shard was recomputed"
    assert set(seen) - set(before), "the rerun wrote no new shard"

    for rel in ("data/activations/activations.parquet", "data/corpus/documents.parquet"):
        assert sha(project / rel) == sha(reference / rel), rel
    no_temp_files(project / "data/activations")
    assert not list(work.rglob("*.parquet"))  # shards are removed once the table is written


# ----------------------------------------------------------------------------- label, av_sft, ar_sft, rl


def test_label_killed_mid_run_keeps_its_cached_answers(tmp_path, sft_project):
    """Local backend: answers cached per batch survive the kill, the rerun generates only the rest.

    The labeler is the project's tiny random model (fast enough to label 48 rows one at a time);
    its answers are gibberish, so most rows end up in failed.parquet, which must match too.
    """
    model_dir = yaml.safe_load((sft_project / "params.yaml").read_text())["model"]["name"]
    label = {
        "label": {
            "backend": "local",
            "local_model": model_dir,
            "splits": ["av_sft", "ar_sft", "rl", "eval"],
            "batch_size": 1,
            "max_new_tokens": 32,
            "context_tokens": 16,
        }
    }
    reference = retune(copy_project(sft_project, tmp_path / "ref"), label)
    run_stage(reference, "label")

    project = retune(copy_project(sft_project, tmp_path / "crash"), label)
    labels_before = {p.name: sha(p) for p in finished_files(project / "data/labels")}
    cache = project / "data/cache/label/local"
    proc = start_stage(project, "label")
    kill_when(proc, lambda: len(finished_files(cache)) >= 3)

    kept = finished_files(cache)
    n_rows = 48
    assert 3 <= len(kept) < n_rows, "killed too late to test a resume"
    assert {p.name: sha(p) for p in finished_files(project / "data/labels")} == labels_before  # old labels intact
    for path in kept:  # each cached answer is complete JSON
        assert json.loads(path.read_text())["response"].startswith("<analysis>")
    before = inodes(kept)

    run_stage(project, "label")
    assert inodes(kept) == before  # cached answers were read back, not regenerated
    stats = json.loads((project / "data/labels/label_stats.json").read_text())
    run = json.loads((project / "reports/provenance/label.json").read_text())
    assert run["cache_hits"] == len(kept) and stats["rows"] == n_rows
    done = pd.concat(
        [
            pd.read_parquet(project / "data/labels" / name, columns=["row_id"])
            for name in ("explanations.parquet", "failed.parquet")
        ]
    )
    assert len(done) == n_rows and done.row_id.is_unique  # every row labeled or failed, none lost or twice
    for name in ("explanations.parquet", "failed.parquet"):
        assert sha(project / "data/labels" / name) == sha(reference / "data/labels" / name), name
    no_temp_files(project / "data")


def test_rl_killed_mid_run_continues_from_its_checkpoint(tmp_path, sft_project):
    reference = copy_project(sft_project, tmp_path / "ref")
    run_stage(reference, "rl")

    project = copy_project(sft_project, tmp_path / "crash")
    state = project / "data/work/rl/checkpoint/state.pt"
    proc = start_stage(project, "rl")
    kill_when(proc, state.exists)  # the step-2 checkpoint of 4 steps
    assert not (project / "data/checkpoints/rl").exists()
    import torch

    assert torch.load(state, weights_only=True)["step"] == 2

    result = run_stage(project, "rl")
    assert "rl: resumed at step 2" in result.stdout + result.stderr  # steps 1-2 were not redone
    assert not state.exists()  # finished: the mid-run checkpoint is gone, a rerun starts over
    ref_log, log = read_csv(reference / "plots/rl_log.csv"), read_csv(project / "plots/rl_log.csv")
    assert log.step.tolist() == [1, 2, 3, 4]  # every step exactly once, in order
    metrics = [c for c in ref_log.columns if not c.endswith("seconds")]  # timings differ run to run
    pd.testing.assert_frame_equal(log[metrics], ref_log[metrics], rtol=1e-4, atol=1e-5)
    ref_eval, evals = (read_csv(p / "plots/rl_eval.csv") for p in (reference, project))
    pd.testing.assert_frame_equal(evals, ref_eval, rtol=1e-4, atol=1e-5)
    for role in ("av", "ar"):  # final weights equal to the uninterrupted run's
        for path in sorted((reference / "data/checkpoints/rl" / role).glob("*.safetensors")):
            assert_tensors_close(path, project / "data/checkpoints/rl" / role / path.name)
    no_temp_files(project / "data")


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def assert_tensors_close(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys(), a
    for key in left:
        assert (left[key] - right[key]).abs().max() <= 1e-5, (a.name, key)


def test_av_sft_killed_mid_run_resumes_from_its_trainer_checkpoint(tmp_path, sft_project):
    """Trainer checkpoints every `av_sft.save_steps` in data/work/av_sft; the rerun resumes from the last whole one."""
    params = {"av_sft": {"max_steps": 4, "save_steps": 2}}
    reference = retune(copy_project(sft_project, tmp_path / "ref"), params)
    run_stage(reference, "av_sft")

    project = retune(copy_project(sft_project, tmp_path / "crash"), params)
    before = {p.name: sha(p) for p in finished_files(project / "data/checkpoints/av_sft")}
    work = project / "data/work/av_sft"
    proc = start_stage(project, "av_sft")
    kill_when(proc, lambda: any(work.glob("checkpoint-*/nla_resume.json")))  # the complete step-2 checkpoint
    assert [p.name for p in work.glob("checkpoint-*")] == ["checkpoint-2"]
    assert {p.name: sha(p) for p in finished_files(project / "data/checkpoints/av_sft")} == before

    result = run_stage(project, "av_sft")
    assert "av_sft: resumed at step 2" in result.stdout + result.stderr  # steps 1-2 were not redone
    assert not work.exists()  # finished: the checkpoints are gone, a rerun starts over
    ref_log, log = (pd.read_csv(p / "plots/av_sft_loss.csv") for p in (reference, project))
    assert log.step.tolist() == [1, 2, 3, 4]  # the steps before the kill come from the checkpoint's log history
    pd.testing.assert_frame_equal(log, ref_log, rtol=1e-4, atol=1e-5)
    ref_metrics, metrics = (json.loads((p / "metrics/av_sft.json").read_text()) for p in (reference, project))
    assert metrics == pytest.approx(ref_metrics, rel=1e-4)
    assert_tensors_close(
        reference / "data/checkpoints/av_sft/adapter_model.safetensors",
        project / "data/checkpoints/av_sft/adapter_model.safetensors",
    )
    no_temp_files(project / "data/checkpoints")


def test_av_sft_resumes_only_from_a_complete_checkpoint_of_the_same_run(tmp_path):
    """A checkpoint killed mid-save (no resume file) or one of other inputs/params is never resumed from."""
    from nla.av_sft import RESUME_FILE, resume_checkpoint
    from nla.io import write_json

    for step, key in ((2, "run"), (4, "other")):
        write_json(tmp_path / f"checkpoint-{step}" / RESUME_FILE, {"key": key, "step": step})
    (tmp_path / "checkpoint-6").mkdir()  # killed mid-save: HF's files, but no resume file yet
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text("{")
    assert resume_checkpoint(tmp_path, "run") == tmp_path / "checkpoint-2"
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]  # the others are removed
    assert resume_checkpoint(tmp_path, "changed params") is None
    assert not list(tmp_path.glob("checkpoint-*"))


def test_ar_sft_killed_mid_run_resumes_from_its_checkpoint(tmp_path, sft_project):
    """Needs periodic checkpoints (`ar_sft.checkpoint_every`) under data/work/ar_sft and a resume from the last one.

    The rerun regenerates the AV's explanations; greedy decoding gives the same texts, so the inputs'
    fingerprint matches and the run continues.
    """
    params = {
        "ar_sft": {"batch_size": 2, "epochs": 1.0, "checkpoint_every": 2, "av_explanations": 4}
    }  # 12 + 4 rows: 8 steps
    reference = retune(copy_project(sft_project, tmp_path / "ref"), params)
    run_stage(reference, "ar_sft")

    project = retune(copy_project(sft_project, tmp_path / "crash"), params)
    before = {p.name: sha(p) for p in finished_files(project / "data/checkpoints/ar_sft")}
    work = project / "data/work/ar_sft"
    proc = start_stage(project, "ar_sft")
    kill_when(proc, lambda: bool(finished_files(work)))
    assert {p.name: sha(p) for p in finished_files(project / "data/checkpoints/ar_sft")} == before

    run_stage(project, "ar_sft")
    ref_log, log = (pd.read_csv(p / "plots/ar_sft_loss.csv") for p in (reference, project))
    assert log.step.tolist() == list(range(1, 9))
    columns = [c for c in ref_log.columns if c != "seconds"]
    pd.testing.assert_frame_equal(log[columns], ref_log[columns], rtol=1e-4, atol=1e-5)
    for path in sorted((reference / "data/checkpoints/ar_sft").glob("*.safetensors")):
        assert_tensors_close(path, project / "data/checkpoints/ar_sft" / path.name)
    no_temp_files(project / "data/checkpoints")
