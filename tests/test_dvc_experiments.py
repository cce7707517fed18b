"""DVC experiments, `dvc metrics diff`, `dvc plots diff` and a local remote, in a temporary git repo.

The stage is a one-line stand-in for evaluate (it turns the params into a metric and a plot),
so two runs take seconds; the params are real nla params, switched with the real
`nla.config.apply_profile` and with `dvc exp run -S`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nla.config import apply_profile, list_profiles, load_config
from nla.errors import NLAError

PY = sys.executable
STAGE = '''
"""Stand-in evaluate: a metric and a curve that depend on the swept params."""
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
mode, scale = p["injection"]["mode"], p["injection"]["scale"] or 1.0
fve = round(0.30 + (0.1 if mode == "karvonen" else 0.0) + 0.01 * scale + (0.05 if p["label"]["backend"] == "openai" else 0.0), 4)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("plots").mkdir(exist_ok=True)
json.dump({"fve_roundtrip_sft": fve, "fve_ar_gold": 0.5}, open("metrics/eval.json", "w"))
rows = ["step,fve"] + [f"{s},{fve * s / 4:.4f}" for s in range(1, 5)]
pathlib.Path("plots/fve.csv").write_text("\\n".join(rows) + "\\n")
'''
DVC_YAML = """
stages:
  evaluate:
    cmd: python evaluate.py
    deps: [evaluate.py]
    params: [injection, label.backend, model.layer]
    metrics: [metrics/eval.json]
    plots:
      - plots/fve.csv:
          x: step
          y: fve
"""
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


def sh(root: Path, *cmd: str) -> str:
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc(root: Path, *args: str) -> str:
    return sh(root, PY, "-m", "dvc", *args)


def make_repo(root: Path) -> Path:
    root.mkdir()
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    (root / "evaluate.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(
        "# nla params\nmodel:\n  layer: 20\ninjection:\n  mode: replace\n  scale: 2.0\nlabel:\n  backend: local\n"
    )
    (root / "profiles").mkdir()
    (root / "profiles" / "karvonen.yaml").write_text("injection:\n  mode: karvonen\n  scale: null\n")
    return root


@pytest.mark.slow
def test_two_runs_then_metrics_params_and_plots_diff(tmp_path):
    repo = make_repo(tmp_path / "repo")
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "run 1: replace, scale 2")

    cfg = apply_profile("karvonen", repo / "params.yaml")  # the real profile switch: params.yaml itself changes
    assert cfg.injection.mode == "karvonen" and load_config(repo / "params.yaml").injection.scale is None
    assert (repo / "params.yaml").read_text().startswith("# nla params\n")  # its header survives
    assert "evaluate" in dvc(repo, "status")  # DVC sees the changed params ...
    dvc(repo, "repro")  # ... and reruns

    metrics = json.loads(dvc(repo, "metrics", "diff", "--json"))["metrics/eval.json"]
    assert metrics["fve_roundtrip_sft"] == pytest.approx({"old": 0.32, "new": 0.41, "diff": 0.09})
    assert "fve_ar_gold" not in metrics  # unchanged metrics are not listed
    params = json.loads(dvc(repo, "params", "diff", "--json"))["params.yaml"]
    assert params["injection.mode"] == {"old": "replace", "new": "karvonen"}
    print("\n$ dvc metrics diff\n" + dvc(repo, "metrics", "diff"))

    (plot,) = json.loads(dvc(repo, "plots", "diff", "HEAD", "--json"))["data"]["plots/fve.csv"]
    assert set(plot["revisions"]) == {"workspace", "HEAD"}  # both runs' curves in one chart
    last = {r["rev"]: float(r["fve"]) for r in plot["content"]["data"]["values"] if r["step"] == "4"}
    assert last == pytest.approx({"HEAD": 0.32, "workspace": 0.41})
    dvc(repo, "plots", "diff", "HEAD", "-o", str(tmp_path / "plots"))
    assert "plots/fve.csv" in (tmp_path / "plots" / "index.html").read_text()

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "run 2: karvonen")
    dvc(repo, "exp", "run", "-n", "alpha4-openai", "-S", "injection.scale=4.0", "-S", "label.backend=openai")
    exp = json.loads(dvc(repo, "exp", "diff", "HEAD", "alpha4-openai", "--json"))
    assert exp["metrics"]["metrics/eval.json"]["fve_roundtrip_sft"] == pytest.approx(
        {"old": 0.41, "new": 0.49, "diff": 0.08}
    )
    assert exp["params"]["params.yaml"]["label.backend"] == {"old": "local", "new": "openai"}
    print("$ dvc exp diff HEAD alpha4-openai\n" + dvc(repo, "exp", "diff", "HEAD", "alpha4-openai"))
    shown = json.dumps(json.loads(dvc(repo, "exp", "show", "--json")))
    assert "alpha4-openai" in shown  # the experiment is kept as a git ref, listed beside the baseline


@pytest.mark.slow
def test_local_remote_push_and_pull(tmp_path):
    repo = make_repo(tmp_path / "repo")
    remote = tmp_path / "dvc-remote"
    dvc(repo, "remote", "add", "-d", "local", str(remote))
    dvc(repo, "repro")
    dvc(repo, "push")
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path / "clone"  # a fresh checkout: the outputs come back from the remote, not by rerunning
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "run")
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "metrics" / "eval.json").exists()
    dvc(clone, "pull")
    assert json.loads((clone / "metrics" / "eval.json").read_text())["fve_roundtrip_sft"] == pytest.approx(0.32)
    assert "up to date" in dvc(clone, "status").lower() or "unchanged" in dvc(clone, "status").lower()
    shutil.rmtree(clone)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", list_profiles(REPO))
def test_every_profile_loads_and_applies_to_params(profile, tmp_path):
    """Each preset validates on top of the real params.yaml, and applying it writes exactly that config."""
    overlaid = load_config(REPO / "params.yaml", profile)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    applied = apply_profile(profile, tmp_path / "params.yaml")
    assert applied == overlaid == load_config(tmp_path / "params.yaml")  # what DVC now sees is what runs
    assert load_config(REPO / "params.yaml") != overlaid


def test_profile_presets_hold_the_promised_settings():
    qwen = load_config(REPO / "params.yaml", "qwen3-8b")
    assert (qwen.model.name, qwen.model.layer, qwen.model.dtype) == ("Qwen/Qwen3-8B", 24, "bfloat16")
    assert qwen.injection.mode == "karvonen" and qwen.corpus.source.startswith("hf:") and qwen.av_sft.lora.enabled
    gpu = load_config(REPO / "params.yaml", "gpu")
    assert gpu.model.name == "embedded" and gpu.av_sft.lora.r > load_config(REPO / "params.yaml").av_sft.lora.r
    with pytest.raises(NLAError, match="profile 'nope' not found"):
        apply_profile("nope", REPO / "params.yaml")
