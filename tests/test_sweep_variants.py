"""scripts/sweep_variants.sh: variants run through the real CLI in their own folders, reuse an earlier
variant's checkpoints, skip finished ones on a rerun, and stop on a bad override."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from embedded_pipeline import shared_run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "sweep_variants.sh"
TINY_EVAL = "evaluate.max_rows=4 evaluate.max_new_tokens=8 evaluate.batch_size=4 evaluate.n_samples=2"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def _sweep(queue: Path, data: Path, root: Path) -> subprocess.CompletedProcess:
    env = os.environ | {
        "DATA": str(data),
        "RUN_ROOT": str(root),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 = this interpreter
    }
    return subprocess.run(["bash", str(SCRIPT), str(queue)], env=env, capture_output=True, text=True, timeout=600)


def test_a_variant_reuses_checkpoints_and_a_rerun_skips_it(run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for part, key in (("activations", "act"), ("split", "split"), ("labels", "labels")):
        (data / part).symlink_to(run[key])
    root = tmp_path / "runs"
    seed = root / "seed" / "data" / "checkpoints"  # a finished variant whose checkpoints the next one reuses
    shutil.copytree(run["av"], seed / "av_sft")
    shutil.copytree(run["ar"], seed / "ar_sft")
    (root / "seed" / "done").touch()
    queue = tmp_path / "queue.txt"
    queue.write_text(f"seed|-|av-sft ar-sft|\nev|seed|evaluate|{TINY_EVAL}\n", encoding="utf-8")

    first = _sweep(queue, data, root)
    assert first.returncode == 0, first.stderr[-2000:]
    times = (root / "times.txt").read_text(encoding="utf-8").splitlines()
    assert [line.rsplit(" ", 2)[0] for line in times] == ["ev evaluate"]  # seed was done: not rerun
    variant = root / "ev"
    assert yaml.safe_load((variant / "params.yaml").read_text(encoding="utf-8"))["evaluate"]["max_rows"] == 4
    assert (variant / "data" / "checkpoints" / "av_sft" / "nla_meta.yaml").is_file()
    assert (variant / "reports" / "eval_details.json").is_file() and (variant / "done").is_file()

    again = _sweep(queue, data, root)
    assert again.returncode == 0
    assert (root / "times.txt").read_text(encoding="utf-8").splitlines() == times


def test_a_bad_override_stops_the_sweep(tmp_path):
    queue = tmp_path / "queue.txt"
    queue.write_text("bad|-|evaluate|evaluate.no_such_key=1\n", encoding="utf-8")
    for part in ("activations", "split", "labels"):
        (tmp_path / "data" / part).mkdir(parents=True)
    result = _sweep(queue, tmp_path / "data", tmp_path / "runs")
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
    assert not (tmp_path / "runs" / "bad" / "done").exists()


def test_a_variant_that_relabels_writes_its_own_labels_and_its_children_read_them(run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for part, key in (("activations", "act"), ("split", "split"), ("labels", "labels")):
        (data / part).symlink_to(run[key])
    shared = (run["labels"] / "explanations.parquet").read_bytes()
    queue = tmp_path / "queue.txt"
    relabel = "label.splits=[eval] label.topic_words=0 label.before_words=1"
    queue.write_text(f"relabel|-|label|{relabel}\nchild|relabel||\n", encoding="utf-8")

    result = _sweep(queue, data, tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-2000:]
    labels = tmp_path / "runs" / "relabel" / "data" / "labels"
    assert not labels.is_symlink()
    explanations = pd.read_parquet(labels / "explanations.parquet").explanation
    assert all(e.startswith("Before: ") and "Topic" not in e for e in explanations)
    assert (run["labels"] / "explanations.parquet").read_bytes() == shared  # the shared labels untouched
    assert (tmp_path / "runs" / "child" / "data" / "labels").resolve() == labels.resolve()  # `from`'s labels
