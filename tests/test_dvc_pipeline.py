"""The real pipeline under real DVC, on a tiny config, in a temporary git repo.

The repo holds this checkout's `nla/`, `dvc.yaml` and DVC config with a params.yaml shrunk to
seconds per stage: a tiny random llama (the embedded tokenizer) at layer 1, 12 documents, a few
training steps, labels from a real `llm-katan` server (echo backend) through the OpenAI-compatible
backend. One `dvc repro` builds it for the whole module; each test then checks one promise:

- a rerun of a stage on the same inputs writes the same bytes, so a change to a runtime knob of
  the labeler (`label.openai.concurrency`) reruns `label` and nothing downstream;
- retraining av_sft and ar_sft on the same inputs leaves `git status` clean (same checkpoints);
- no output holds a run fact (clock, commit, timing): those are in the git-ignored provenance files;
- a local-directory DVC remote serves a fresh clone: `dvc pull`, then nothing to reproduce;
- the README's "Comparing runs" commands work as written and fit a 160-column terminal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_label import ECHO_TEMPLATE, Katan
from test_reliability import TINY, save_tiny

from nla.config import NLAConfig, deep_merge, set_param

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
WIDTH = 160
KEY_ENV = "NLA_TEST_PIPELINE_KEY"
COPIED = ["nla", "dvc.yaml", ".dvcignore", ".gitignore", "plots/offline.html"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}
TINY_PARAMS = {
    "corpus": {"max_docs": 12},
    "extract": {"max_tokens": 40, "positions_per_doc": 2, "shard_docs": 6},
    "label": {"backend": "openai", "user_template": ECHO_TEMPLATE, "context_tokens": 16},
    "injection": {"scale": 1.0},
    "av_sft": {"batch_size": 4, "max_steps": 2, "save_steps": 0, "lora": {"r": 4, "alpha": 8}},
    "ar_sft": {"batch_size": 4, "max_steps": 2, "lora": {"r": 4, "alpha": 8}},
    "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6, "eval_every": 1, "eval_rows": 4},
    "evaluate": {"max_rows": 4, "max_new_tokens": 6, "batch_size": 4, "n_samples": 2},
}


def sh(root: Path, *cmd: str, env: dict | None = None) -> str:
    """Run `cmd` in `root` with this checkout's `nla` copy on the path; its output, or a failed assertion."""
    full_env = {
        **os.environ,
        **GIT_ENV,
        **(env or {}),
        "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root),  # the repo's own nla/, the code DVC tracks as deps
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore",
        "COLUMNS": str(WIDTH),
    }
    proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def dvc(root: Path, *args: str) -> str:
    return sh(root, PY, "-m", "dvc", *args)


def git(root: Path, *args: str) -> str:
    return sh(root, "git", *args)


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` output says it ran."""
    return re.findall(r"Running stage '([\w:]+)'", output)


def make_repo(root: Path, model_dir: Path, base_url: str) -> Path:
    root.mkdir(parents=True)
    for rel in COPIED:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy(
            src, dst
        )
    params = deep_merge(NLAConfig().model_dump(mode="json"), TINY_PARAMS)
    params = deep_merge(
        params,
        {
            "model": {"name": str(model_dir), "layer": 1},
            "label": {"openai": {"base_url": base_url + "/v1", "model": "x", "api_key_env": KEY_ENV}},
        },
    )
    (root / "params.yaml").write_text("# tiny pipeline\n" + yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the offline plots page
    dvc(root, "config", "core.analytics", "false")
    return root


@pytest.fixture(scope="module")
def katan(tmp_path_factory):
    server = Katan(tmp_path_factory.mktemp("katan"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, katan) -> Path:
    """A committed tiny project after one full `dvc repro`."""
    from transformers import LlamaConfig

    os.environ[KEY_ENV] = "sk-nla-pipeline-test"
    root = tmp_path_factory.mktemp("dvc_pipeline")
    model_dir = save_tiny(root / "tiny-llama", LlamaConfig(**TINY, num_key_value_heads=2))
    repo = make_repo(root / "repo", model_dir, katan.url)
    out = dvc(repo, "repro")
    assert "publish" in ran(out), out
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny pipeline")
    return repo


def test_a_rerun_writes_the_same_bytes_and_stops_the_cascade(pipeline, katan):
    assert git(pipeline, "status", "--porcelain") == ""
    requests = katan.requests()
    set_param(pipeline / "params.yaml", "label.openai.concurrency", 3)
    out = dvc(pipeline, "repro")
    assert ran(out) == ["label"], out  # DVC saw the param change, reran label, found its outputs unchanged ...
    assert "Stage 'av_sft' didn't change, skipping" in out  # ... and stopped there
    assert katan.requests() == requests  # every answer came from the labeler's cache
    changed = {line[3:] for line in git(pipeline, "status", "--porcelain").splitlines()}
    assert changed == {"params.yaml", "dvc.lock"}  # the lock records the new param; no output changed
    lock = git(pipeline, "diff", "dvc.lock")
    assert [line for line in lock.splitlines() if line.startswith("+ ")] == ["+            concurrency: 3"], lock
    git(pipeline, "checkout", "-q", "params.yaml", "dvc.lock")


RUN_FACTS = re.compile(r"seconds|elapsed|created_at|finished_at|git_commit|tokens_per_s|rows_per_s|host")


def keys_of(path: Path) -> set[str]:
    """The field names of a JSON, YAML or CSV output (nested mapping keys included)."""
    if path.suffix == ".csv":
        return set(path.read_text(encoding="utf-8").splitlines()[0].split(","))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    keys, todo = set(), [data]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            keys |= set(map(str, node))
            todo += node.values()
        elif isinstance(node, list):
            todo += node
    return keys


def test_retraining_on_the_same_inputs_writes_the_same_checkpoints(pipeline):
    """Seeds and the pinned adapter config (PEFT's target modules come from a set) leave nothing to chance."""
    out = dvc(pipeline, "repro", "--force", "--single-item", "av_sft", "ar_sft")
    assert sorted(ran(out)) == ["ar_sft", "av_sft"], out
    assert git(pipeline, "status", "--porcelain") == ""  # same weights, sidecars, metrics and curves


def test_provenance_stays_out_of_every_output(pipeline):
    facts = json.loads((pipeline / "reports/provenance/av_sft.json").read_text())
    assert {"finished_at", "host", "git_commit", "packages", "train_seconds"} <= set(facts)
    assert git(pipeline, "check-ignore", "reports/provenance/av_sft.json").strip()  # git ignores the run facts
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
    outs = [pipeline / out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    files = [p for out in outs for p in ([out] if out.is_file() else sorted(out.rglob("*")))]
    structured = [  # sidecars, metrics, reports, stats, plots: not the tokenizer's vocabulary
        p for p in files if p.suffix in (".json", ".yaml", ".csv") and not p.name.startswith("tokenizer")
    ]
    assert len(structured) > 25 and not [p for p in files if "provenance" in str(p)]
    for path in structured:
        assert not {k for k in keys_of(path) if RUN_FACTS.search(k)}, path.relative_to(pipeline)
    assert (pipeline / "data/labels/label_stats.json").is_file() and "cache_hits" in json.loads(
        (pipeline / "reports/provenance/label.json").read_text()
    )


def test_local_remote_round_trip(pipeline, tmp_path):
    store = tmp_path / "store"
    dvc(pipeline, "remote", "add", "-d", "local", str(store))
    dvc(pipeline, "push")
    git(pipeline, "add", ".dvc/config")
    git(pipeline, "commit", "-qm", "remote")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(pipeline), str(clone))
    assert not (clone / "data/checkpoints/rl").exists()
    dvc(clone, "pull")
    assert (clone / "data/publish/av/model.safetensors").is_file()
    assert "Data and pipelines are up to date." in dvc(clone, "status")
    assert ran(dvc(clone, "repro")) == []
    assert git(clone, "status", "--porcelain") == ""


def readme_commands(section: str) -> list[list[str]]:
    """The `dvc ...` lines of the first bash block under the README heading `section`, as the shell splits them."""
    body = (REPO / "README.md").read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("dvc ")]


def test_readme_comparison_commands_work_as_written_and_fit_160_columns(pipeline):
    """Runs last: its `dvc exp run` leaves the experiment's results in the workspace."""
    commands = readme_commands("Comparing runs")
    assert {"dvc exp run", "dvc exp show", "dvc metrics diff", "dvc plots show"} <= {" ".join(c[:3]) for c in commands}
    for command in commands:
        out = sh(pipeline, PY, "-m", *command)
        print(f"$ {shlex.join(command)}\n{out}")
        widest = max((len(line.rstrip()) for line in out.splitlines()), default=0)
        assert widest <= WIDTH, f"{command}: {widest} columns"
        assert "…" not in out, f"{command}: a cell was cut to fit {WIDTH} columns"
        if command[:4] == ["dvc", "exp", "show", "--only-changed"]:
            assert "rl.steps" in out and "rl-20-steps" in out  # the experiment's param, beside the baseline
    html = (pipeline / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "<script src" not in html and "cdn.jsdelivr" not in html  # nothing to fetch: it renders offline
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    for plot in plots:
        (props,) = plot.values()
        for key in ("title", "x_label", "y_label"):  # as written, or as JSON escapes it inside the page
            assert props[key] in html or json.dumps(props[key])[1:-1] in html, props[key]
