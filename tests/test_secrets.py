"""Secrets: tokens come only from the environment and are never written anywhere.

The pipeline runs with fake tokens in every variable the code reads (the labeler's API key,
the Hub token and its legacy alias) against a real OpenAI-compatible server (`llm-katan`,
echo backend) that *checks* the key, so the label stage demonstrably read and sent it. Then
every file the run wrote (project, HOME with caches and logs) and everything it printed is
scanned for the token strings. A wrong key must fail the stage without echoing the key.
What the Prefect server stores of a flow run (artifacts, logs, run records) is scanned the
same way by `tests/test_flows.py::test_no_token_reaches_the_prefect_server`, beside its server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from test_reliability import NLA, TINY, make_project, refused, retune, run_stage, save_tiny

from nla.models import cache_root

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_katan(port: int, key: str, home: Path) -> subprocess.Popen:
    """llm-katan, echo backend, validating the OpenAI key; its own files live outside the scanned folders."""
    katan = Path(sys.executable).with_name("llm-katan")
    proc = subprocess.Popen(
        [
            str(katan),
            "--model",
            "echo",
            "--backend",
            "echo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--validate-keys",
            "--api-keys",
            f"openai={key}",
            "--log-level",
            "warning",
        ],
        env=dict(os.environ, HOME=str(home)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("llm-katan did not start")


def scan(roots: list[Path], texts: list[str], secrets: dict[str, str]) -> list[str]:
    """Where any secret appears: 'path: VAR' for files (binary included), 'output: VAR' for printed text."""
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [f"{path}: {var}" for var, value in secrets.items() if value.encode() in data]
    for text in texts:
        hits += [f"output: {var}" for var, value in secrets.items() if value in text]
    return hits


def test_no_token_is_written_anywhere(tmp_path):
    tag = uuid.uuid4().hex[:12]
    secrets = {
        "OPENAI_API_KEY": f"sk-nlafake-{tag}-openai",
        "HF_TOKEN": f"hf_nlafake{tag}hub",
        "HUGGING_FACE_HUB_TOKEN": f"hf_nlafake{tag}legacy",
    }
    home = tmp_path / "home"
    home.mkdir()
    env = dict(
        os.environ,
        **secrets,
        HOME=str(home),
        NLA_CACHE=str(cache_root()),
        TQDM_DISABLE="1",
        PYTHONWARNINGS="ignore",
        HF_HUB_OFFLINE="1",
    )
    port = free_port()
    katan = start_katan(port, secrets["OPENAI_API_KEY"], tmp_path / "katan-home")
    try:
        from transformers import LlamaConfig

        model_dir = save_tiny(tmp_path / "tiny", LlamaConfig(**TINY, num_key_value_heads=2))
        project = make_project(
            tmp_path / "project",
            {
                "model": {"name": str(model_dir), "layer": 1},
                "corpus": {"max_docs": 12, "foreign": {}},
                "extract": {"max_tokens": 32, "shard_docs": 6, "positions_per_doc": 2},
                "label": {
                    "backend": "openai",
                    "splits": ["av_sft", "ar_sft", "eval"],
                    "min_features": 1,
                    "openai": {
                        "base_url": f"http://127.0.0.1:{port}/v1",
                        "model": "echo",
                        "concurrency": 2,
                        "max_retries": 1,
                        "backoff_s": 0.1,
                    },
                },
                "injection": {"scale": 1.0},  # set: no α sweep needed before av-sft
                "av_sft": {"batch_size": 4, "max_steps": 1, "lora": {"r": 2, "alpha": 4}},
                "ar_sft": {"batch_size": 16, "epochs": 1.0, "lora": {"r": 2, "alpha": 4}},
            },
        )
        outputs = []
        for stage in ("corpus", "extract", "split"):
            result = subprocess.run(
                [NLA, "--params", "params.yaml", stage],
                cwd=project,
                env=env,
                text=True,
                capture_output=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr[-2000:]
            outputs += [result.stdout, result.stderr]
        result = run_stage(project, "label", env)  # the server answers 401 unless the key from the env was sent
        outputs += [result.stdout, result.stderr]
        stats = (project / "reports/provenance/label.json").read_text()  # the run's status codes
        assert '"200"' in stats and '"401"' not in stats, stats
        # Echoed prompts are no well-formed analyses: keep these outputs for the scan, train on baseline labels.
        (project / "data/labels").rename(project / "data/labels-openai")
        retune(project, {"label": {"backend": "baseline"}})
        run_stage(project, "label", env)
        retune(project, {"label": {"backend": "openai"}})
        for stage in ("av_sft", "ar_sft", "publish"):
            result = run_stage(project, stage, env)
            outputs += [result.stdout, result.stderr]
        assert (project / "data/publish/av/README.md").is_file()

        # A wrong key: the stage stops with one line naming the variable, never the key itself.
        wrong = dict(env, OPENAI_API_KEY=f"sk-nlafake-{tag}-wrong")
        (project / "data/cache").rename(project / "data/cache-old")  # no cache hits: every row asks the server
        result = run_stage(project, "label", wrong, check=False)
        refused(result, "label", r"HTTP 401.*OPENAI_API_KEY")
        outputs += [result.stdout, result.stderr]
        secrets["OPENAI_API_KEY (wrong)"] = wrong["OPENAI_API_KEY"]
    finally:
        katan.kill()
        katan.wait()

    written = sorted(p.relative_to(tmp_path) for p in (project / "data").rglob("*") if p.is_file())
    assert len(written) > 20  # the scan covers a real run: tables, sidecars, caches, checkpoints, cards
    assert scan([project, home], outputs, secrets) == []
