"""The Prefect flow and its deployments, against a real local Prefect API server.

The flow under test is the real `flows.pipeline.nla_pipeline`; only the project it drives is
tiny: a temporary git + DVC repo whose stages are one-line Python scripts (make, a gate,
evaluate, publish), so a whole run takes seconds. Nothing here reaches the Hub: the one test
that publishes replaces `HfApi.create_repo`/`upload_folder` with a local stand-in that
records its calls (the Hub cannot be reached from these machines).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from flows.pipeline import (
    PUBLISHED_METRICS_FILE,
    failure_message,
    improvement,
    metrics_diff,
    metrics_markdown,
    stage_order,
)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

STAGE_SCRIPT = '''
"""Tiny stand-in stages driven by knobs.yaml: make | gate | evaluate | publish."""
import json, pathlib, sys, yaml
value = yaml.safe_load(open("knobs.yaml"))["value"]
step = sys.argv[1]
if step == "make":
    pathlib.Path("data").mkdir(exist_ok=True)
    pathlib.Path("data/x.txt").write_text(str(value))
elif step == "gate" and value < 0:
    print(f"nla validate-x: error: expectation 'value >= 0' failed: 1 offending row (row 0: value={value})",
          file=sys.stderr)
    sys.exit(2)
elif step == "evaluate":
    for d in ("metrics", "reports"):
        pathlib.Path(d).mkdir(exist_ok=True)
    json.dump({"fve_sft": value / 10, "fve_ar_gold": 0.5}, open("metrics/eval.json", "w"))
    pathlib.Path("reports/samples.md").write_text("| row | explanation |\\n|---|---|\\n| 0 | a cricket report |\\n")
elif step == "publish":
    for role in ("av", "ar"):
        folder = pathlib.Path("data/publish") / role
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "nla_model", "schema_version": 1, "stage": "rl", "role": role,
                "base_model": "embedded", "d_model": 576, "layer": 20}
        (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta))
        (folder / "README.md").write_text(f"# {role} (value {value})\\n")
'''

DVC_YAML = """
stages:
  evaluate:            # listed first on purpose: the flow must order by the DAG, not the file
    cmd: python stage.py evaluate
    deps: [data/x.txt, stage.py]
    params:
      - knobs.yaml:
    metrics: [metrics/eval.json]
    outs: [reports/samples.md]
  make:
    cmd: python stage.py make
    deps: [stage.py]
    params:
      - knobs.yaml:
    outs: [data/x.txt]
  validate_x:
    cmd: python stage.py gate
    deps: [data/x.txt, stage.py]
    params:
      - knobs.yaml:
  publish:
    cmd: python stage.py publish
    deps: [metrics/eval.json, stage.py]
    outs: [data/publish]
"""


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(root: Path, value: float = 3) -> Path:
    """A git + DVC repo with the tiny pipeline; nla params (for publish) in params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], root)
    run([PY, "-m", "dvc", "init", "-q"], root)
    run([PY, "-m", "dvc", "config", "core.analytics", "false"], root)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "knobs.yaml").write_text(f"value: {value}\n")
    (root / "params.yaml").write_text("publish:\n  namespace: nla-test\n  token_env: NLA_TEST_HF_TOKEN\n")
    return root


def set_value(root: Path, value: float) -> None:
    (root / "knobs.yaml").write_text(f"value: {value}\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def background(cmd: list[str], log_path: Path, env: dict, cwd: Path = REPO, stop=signal.SIGTERM):
    """Run `cmd` in its own process group (output to `log_path`); stop the whole group on exit."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            os.killpg(proc.pid, stop)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port with a temporary PREFECT_HOME; yields (api_url, env)."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    api = f"http://127.0.0.1:{port}/api"
    cmd = [str(Path(PY).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    start = time.perf_counter()
    with background(cmd, home / "server.log", env) as server:

        def healthy() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{(home / 'server.log').read_text()[-3000:]}")
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 180, "the prefect server's /api/health", interval=0.5)
        print(f"prefect server healthy after {time.perf_counter() - start:.1f} s")
        yield api, {**env, "PREFECT_API_URL": api}


@pytest.fixture
def in_process_api(prefect_server):
    """Point this process's Prefect client at the test server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    api, env = prefect_server
    with temporary_settings({PREFECT_API_URL: api, PREFECT_HOME: env["PREFECT_HOME"]}):
        yield api


def artifacts_of(flow_run_id) -> dict[str, str]:
    """{key: markdown} of the artifacts a flow run left on the server (REST: the 3.8.8 sync client sends nulls)."""
    from prefect.settings import PREFECT_API_URL

    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 50, "offset": 0, "sort": "KEY_ASC"}
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    return {a["key"]: a["data"] for a in response.json()}


# ----------------------------------------------------------------------------- no server needed


def test_stage_order_follows_the_dvc_dag(tmp_path):
    project = make_project(tmp_path / "p")
    assert stage_order(project) == ["make", "validate_x", "evaluate", "publish"]
    order = stage_order(REPO)  # the real pipeline: whatever it holds, dependencies come first
    for before, after in [
        ("corpus", "extract"),
        ("extract", "split"),
        ("validate_labels", "av_sft"),
        ("av_sft", "rl"),
        ("rl", "evaluate"),
        ("evaluate", "publish"),
    ]:
        if before in order and after in order:
            assert order.index(before) < order.index(after)


def test_failure_message_is_the_stages_own_line():
    stderr = (
        "Running stage 'validate_labels':\n> nla validate-labels\nprogress 10%\rprogress 100%\n"
        "nla validate-labels: error: gate explanations: expect_column_values_to_not_be_null failed on 3 rows\n"
        "ERROR: failed to reproduce 'validate_labels': failed to run: nla validate-labels, exited with 2\n"
    )
    assert failure_message(stderr).startswith("nla validate-labels: error: gate explanations: expect_column")
    assert failure_message("ERROR: failed to reproduce 'x': exited 1\n") == "ERROR: failed to reproduce 'x': exited 1"
    assert failure_message("") == "(no output on stderr)"


def test_metrics_diff_and_improvement_follow_dvc_semantics():
    old = {"fve_rl": 0.40, "controls": {"fve_shuffled": -0.1}}
    new = {"fve_rl": 0.45, "controls": {"fve_shuffled": -0.2}, "fve_ar_gold": 0.5}
    diff = metrics_diff(new, old)
    assert diff["fve_rl"] == pytest.approx({"old": 0.40, "new": 0.45, "diff": 0.05})
    assert diff["controls.fve_shuffled"]["diff"] == pytest.approx(-0.1)
    assert diff["fve_ar_gold"] == {"old": None, "new": 0.5, "diff": None}
    assert improvement(new, old)[0] and not improvement(old, new)[0]
    assert improvement({"fve_sft": 0.2}, None) == (True, "fve_sft = 0.2000; nothing published yet")
    assert not improvement({"rows": 3}, None)[0]  # no key metric: never publish
    table = metrics_markdown(diff, "x", {"evaluate": "ran"})
    assert "| fve_rl | 0.4500 | 0.4000 | +0.0500 |" in table


# ----------------------------------------------------------------------------- ephemeral API (no server)


@pytest.mark.slow
def test_failing_gate_stops_the_flow_with_its_message(tmp_path):
    """`python -m flows.pipeline` with no server running: Prefect's temporary API; the gate stops the run."""
    project = make_project(tmp_path / "p", value=-1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    proc = run([PY, "-m", "flows.pipeline", "--project-dir", str(project)], REPO, env, check=False)
    gate_line = "nla validate-x: error: expectation 'value >= 0' failed: 1 offending row (row 0: value=-1)"
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"nla flow: error: gate 'validate_x' failed: {gate_line}" in proc.stderr
    assert "Finished in state Failed(\"Flow run encountered an exception: StageFailed: gate 'validate_x'" in proc.stderr
    assert (project / "data/x.txt").exists()  # the stage before the gate ran ...
    assert not (project / "metrics/eval.json").exists()  # ... the ones after it did not


# ----------------------------------------------------------------------------- real server


@pytest.fixture
def hub_calls(monkeypatch) -> list[dict]:
    """`HfApi.create_repo`/`upload_folder` replaced by a local stand-in recording its calls (the Hub is unreachable)."""
    from huggingface_hub import HfApi

    calls: list[dict] = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append({"create": repo_id}))
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: (
            calls.append({"upload": kw["repo_id"], "folder": kw["folder_path"], "token": self.token})
            or f"https://hub.local/{kw['repo_id']}"
        ),
    )
    return calls


@pytest.mark.slow
def test_flow_reruns_nothing_unchanged_and_publishes_only_on_improvement(
    tmp_path, in_process_api, hub_calls, monkeypatch
):
    """Three runs: first (nothing published) uploads; unchanged params skip every stage and upload nothing;
    a better key metric uploads again. The upload is a local stand-in for the Hub (unreachable here)."""
    from flows.pipeline import nla_pipeline

    token = "hf_TESTtoken_never_written_0123456789"
    monkeypatch.setenv("NLA_TEST_HF_TOKEN", token)
    project = make_project(tmp_path / "p", value=3)

    state = nla_pipeline(project_dir=str(project), publish=True, return_state=True)
    first = state.result()
    assert state.is_completed() and first["improved"] and set(first["stages"].values()) == {"ran"}
    assert list(first["stages"]) == ["make", "validate_x", "evaluate", "publish"]
    uploads = [c for c in hub_calls if "upload" in c]
    assert [c["upload"] for c in uploads] == [
        "nla-test/nla-smollm2-135m-instruct-l20-av",
        "nla-test/nla-smollm2-135m-instruct-l20-ar",
    ]
    assert all(c["token"] == token and Path(c["folder"]).parent == project / "data/publish" for c in uploads)
    assert json.loads((project / PUBLISHED_METRICS_FILE).read_text())["fve_sft"] == pytest.approx(0.3)
    arts = artifacts_of(state.state_details.flow_run_id)
    assert "| fve_sft | 0.3000 | — | — |" in arts["nla-metrics"]
    assert "a cricket report" in arts["nla-samples"]

    hub_calls.clear()
    second = nla_pipeline(project_dir=str(project), publish=True)
    assert set(second["stages"].values()) == {"skipped"} and not second["improved"] and hub_calls == []

    set_value(project, 5)
    state = nla_pipeline(project_dir=str(project), publish=True, return_state=True)
    third = state.result()
    assert third["improved"] and len([c for c in hub_calls if "upload" in c]) == 2
    assert "| fve_sft | 0.5000 | 0.3000 | +0.2000 |" in artifacts_of(state.state_details.flow_run_id)["nla-metrics"]
    leaked = [p for p in project.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert leaked == []


def stored_by_prefect(client, flow_run_id) -> dict[str, list[str]]:
    """JSON of what the Prefect server keeps: every artifact (of any run), and this run's logs, record and task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the server in batches from a background worker
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {
        "artifacts": [a.model_dump_json() for a in client.read_artifacts()],
        "logs": [log.model_dump_json() for log in logs],
        "runs": [client.read_flow_run(flow_run_id).model_dump_json()] + [t.model_dump_json() for t in task_runs],
    }


@pytest.mark.slow
def test_no_token_reaches_the_prefect_server(tmp_path, in_process_api, hub_calls, monkeypatch):
    """A publishing run with fake tokens in every variable the code reads (the upload demonstrably uses the
    Hub one): none appears in the artifacts, logs or run records the Prefect server stores."""
    from prefect import get_client

    from flows.pipeline import nla_pipeline

    tag = uuid.uuid4().hex[:12]
    secrets = {
        "OPENAI_API_KEY": f"sk-nlafake-{tag}-openai",
        "HF_TOKEN": f"hf_nlafake{tag}hub",
        "HUGGING_FACE_HUB_TOKEN": f"hf_nlafake{tag}legacy",
        "NLA_TEST_HF_TOKEN": f"hf_nlafake{tag}publish",  # the project's publish.token_env
    }
    for var, value in secrets.items():
        monkeypatch.setenv(var, value)
    state = nla_pipeline(project_dir=str(make_project(tmp_path / "p")), publish=True, return_state=True)
    assert state.is_completed() and state.result()["improved"]
    uploads = [c for c in hub_calls if "upload" in c]
    assert len(uploads) == 2 and all(c["token"] == secrets["NLA_TEST_HF_TOKEN"] for c in uploads)

    with get_client(sync_client=True) as client:
        stored = stored_by_prefect(client, state.state_details.flow_run_id)
    assert set(artifacts_of(state.state_details.flow_run_id)) == {"nla-metrics", "nla-samples"}
    assert len(stored["logs"]) >= 5 and len(stored["runs"]) >= 5  # a stage line per stage, a task run per stage
    text = "\n".join(line for lines in stored.values() for line in lines)
    assert "a cricket report" in text and "published" in text  # the scan reads the samples artifact and the logs
    assert [var for var, value in secrets.items() if value in text] == []


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def final_state(client, flow_run_id, timeout: float):
    def done():
        run_ = client.read_flow_run(flow_run_id)
        return run_ if run_.state and run_.state.is_final() else None

    return wait_for(done, timeout, f"flow run {flow_run_id} to finish", interval=2.0)


def read_deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


@pytest.mark.slow
def test_served_deployment_registers_its_schedule_and_a_triggered_run_completes(
    tmp_path, prefect_server, in_process_api
):
    from prefect import get_client

    _, env = prefect_server
    project = make_project(tmp_path / "p", value=4)
    cmd = [PY, "-m", "flows.serve", "--name", "test-nightly", "--cron", "0 3 * * *", "--project-dir", str(project)]
    with background(cmd, tmp_path / "serve.log", env, stop=signal.SIGINT), get_client(sync_client=True) as client:
        dep = wait_for(lambda: read_deployment(client, "nla-pipeline/test-nightly"), 120, "the deployment")
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [("0 3 * * *", "UTC", True)]
        assert dep.parameters == {"project_dir": str(project), "profile": None, "publish": False, "launcher": None}
        assert dep.entrypoint == "flows.pipeline.nla_pipeline"

        start = time.perf_counter()
        flow_run = client.create_flow_run_from_deployment(dep.id)
        finished = final_state(client, flow_run.id, timeout=240)
        print(f"served run finished in {time.perf_counter() - start:.1f} s: {finished.state}")
    assert finished.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
    arts = artifacts_of(flow_run.id)
    assert "| fve_sft | 0.4000 | — | — |" in arts["nla-metrics"]
    assert "a cricket report" in arts["nla-samples"]
    assert json.loads((project / "metrics/eval.json").read_text())["fve_sft"] == pytest.approx(0.4)


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_work_pool_and_a_worker_runs_it(tmp_path, prefect_server, in_process_api):
    """`prefect deploy --all` from prefect.yaml (run in a copy of the project root), then a process worker."""
    from prefect import get_client

    _, env = prefect_server
    project = make_project(tmp_path / "p", value=2)
    (project / "prefect.yaml").write_text((REPO / "prefect.yaml").read_text())
    (project / "flows").mkdir()
    for name in ("__init__.py", "pipeline.py"):
        (project / "flows" / name).write_text((REPO / "flows" / name).read_text())
    prefect = str(Path(PY).parent / "prefect")
    run([prefect, "work-pool", "create", "nla-local", "--type", "process"], project, {**env, "PWD": str(project)})
    run([prefect, "--no-prompt", "deploy", "--all"], project, {**env, "PWD": str(project)})

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("nla-pipeline/nla-nightly")
        assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [("0 3 * * *", "UTC")]
        assert dep.work_pool_name == "nla-local" and dep.parameters["publish"] is False
        pull = yaml.safe_dump(dep.pull_steps)
        assert "set_working_directory" in pull and str(project) in pull

        flow_run = client.create_flow_run_from_deployment(dep.id)
        worker = run([prefect, "worker", "start", "--pool", "nla-local", "--run-once"], project, env, check=False)
        finished = final_state(client, flow_run.id, timeout=60)
    assert finished.state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
    assert set(artifacts_of(flow_run.id)) == {"nla-metrics", "nla-samples"}
