"""Prefect orchestration of the DVC pipeline: one task per DVC stage, gates between them.

DVC stays the source of truth: the stage DAG is read from `dvc.yaml` (through DVC itself,
so templating and path-based dependencies resolve exactly as `dvc repro` sees them), and
each task runs `dvc repro --single-item <stage>`, so DVC's lock file and cache decide what
reruns and unchanged stages are skipped. Prefect adds retries (labeling), a run history,
schedules, and artifacts: a metrics table compared against the last published metrics and
the sample explanations of the evaluate stage. Upload to the Hub happens only when asked
for and only when the key metric improved on the last published one (`nla.upload`, the same
step as `nla upload`); the DVC publish stage itself only builds the folders.

Run locally (Prefect starts a temporary API server when PREFECT_API_URL is unset):
    python -m flows.pipeline --profile gpu --publish
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from nla.config import PATHS, apply_profile, load_config
from nla.errors import NLAError
from nla.lock import workspace_lock
from nla.upload import flatten, improvement, run_upload

GATE_PREFIX = "validate_"  # stages named validate_* are data-quality gates
RETRIES = {"label": 3}  # stage -> retries (the labeler may call a remote server)
RETRY_DELAY_S = [10, 60, 300]
METRICS_FILE = f"{PATHS.metrics}/eval.json"
SAMPLES_FILE = f"{PATHS.reports}/samples.md"
PUBLISHED_METRICS_FILE = PATHS.published_metrics  # metrics of the last upload (commit it)
ERROR_LINE = re.compile(r"^nla [\w-]+: error: ")  # how `nla` reports an NLAError on stderr


class StageFailed(RuntimeError):
    """A DVC stage (or gate) exited non-zero; the message is the stage's own one-line error."""


# ---------------------------------------------------------------------------------------------
# DVC


def stage_order(project_dir: str | Path) -> list[str]:
    """Pipeline stages in dependency order; among stages ready at once, gates first, then dvc.yaml order."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    def name(stage: PipelineStage) -> str:  # how `dvc repro` run from the project root addresses it
        dvcfile = os.path.relpath(stage.dvcfile.path, repo.root_dir)
        return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

    try:
        with Repo(str(project_dir)) as repo:
            stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
            position = {s: i for i, s in enumerate(stages)}
            graph = repo.index.graph.subgraph(stages)  # edges: stage -> the stage it depends on
            # among ready stages: gates first (fail early), then dvc.yaml order
            key = lambda s: f"{int(not s.name.startswith(GATE_PREFIX))}{position[s]:06d}"  # noqa: E731
            order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=key)
            return [name(s) for s in order]
    except DvcException as err:
        raise NLAError(f"{project_dir}: DVC cannot read the pipeline ({err}); fix dvc.yaml") from None


def failure_message(stderr: str) -> str:
    """The one line that explains a failed stage: `nla`'s own error line, else DVC's, else the last line."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    for line in reversed(lines):
        if ERROR_LINE.match(line):
            return line
    dvc_errors = [line for line in lines if line.startswith("ERROR:")]
    return (dvc_errors or lines or ["(no output on stderr)"])[-1]


def _tee(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `cmd`, passing its output through live (progress bars intact) and keeping the tails."""
    env = dict(os.environ, **(extra_env or {}))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `nla` of this env
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tails: dict[int, bytearray] = {}

    def pump(source, sink, key: int) -> None:
        tail = tails.setdefault(key, bytearray())
        for chunk in iter(lambda: source.read1(65536), b""):
            sink.write(chunk)
            sink.flush()
            tail.extend(chunk)
            del tail[:-65536]

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer, 1)),
        threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer, 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    code = proc.wait()
    return code, tails[1].decode(errors="replace"), tails[2].decode(errors="replace")


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, project_dir: str, launcher: str | None = None) -> str:
    """`dvc repro --single-item <stage>`; returns "ran" or "skipped" (DVC found nothing changed).

    `launcher` (e.g. "torchrun --nproc_per_node=8"): the stages that split their work run as
    `<launcher> -m nla <stage>` (`NLA_LAUNCHER`, see `nla.cli`); the others as usual.
    """
    extra = {"NLA_LAUNCHER": launcher} if launcher else None
    code, out, err = _tee([sys.executable, "-m", "dvc", "repro", "--single-item", stage], Path(project_dir), extra)
    if code != 0:
        kind = "gate" if stage.split(":")[-1].startswith(GATE_PREFIX) else "stage"
        raise StageFailed(f"{kind} '{stage}' failed: {failure_message(err)}")
    status = "skipped" if re.search(rf"Stage '{re.escape(stage)}' didn't change, skipping", out) else "ran"
    get_run_logger().info("%s: %s", stage, status)
    return status


# ---------------------------------------------------------------------------------------------
# Metrics: `dvc metrics diff` semantics (flattened dotted keys; old, new, diff)


def metrics_diff(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, dict[str, float | None]]:
    """{key: {old, new, diff}} over the union of keys, like `dvc metrics diff --json` for one file."""
    new_flat, old_flat = flatten(new), flatten(old or {})
    rows = {}
    for key in sorted(set(new_flat) | set(old_flat)):
        a, b = old_flat.get(key), new_flat.get(key)
        rows[key] = {"old": a, "new": b, "diff": None if a is None or b is None else b - a}
    return rows


def metrics_markdown(diff: dict[str, dict[str, float | None]], verdict: str, statuses: dict[str, str]) -> str:
    def fmt(x: float | None, sign: bool = False) -> str:
        return "—" if x is None else (f"{x:+.4f}" if sign else f"{x:.4f}")

    lines = [
        "# NLA metrics",
        "",
        f"**{verdict}**",
        "",
        "| metric | this run | published | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {fmt(r['new'])} | {fmt(r['old'])} | {fmt(r['diff'], sign=True)} |" for k, r in diff.items()]
    lines += ["", "Stages: " + ", ".join(f"`{s}` {v}" for s, v in statuses.items())]
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@task(cache_policy=NO_CACHE, persist_result=False)
def upload(project_dir: str) -> dict[str, str]:
    """`nla upload` on the publish stage's folders: only on improvement, then the baseline is the new metrics."""
    root = Path(project_dir)
    cfg = load_config(root / "params.yaml")
    result = run_upload(cfg, root / PATHS.publish, root / METRICS_FILE, root / PUBLISHED_METRICS_FILE)
    return {role: str(url) for role, url in result["uploaded"].items()}


# ---------------------------------------------------------------------------------------------
# The flow


@flow(name="nla-pipeline")
def nla_pipeline(
    project_dir: str = ".", profile: str | None = None, publish: bool = False, launcher: str | None = None
) -> dict[str, Any]:
    """Run every DVC stage in order; report metrics; upload only when `publish` and the key metric improved.

    profile: merge profiles/<profile>.yaml into params.yaml first (DVC then reruns what it changes).
    publish: upload the publish stage's folders to the Hub when the key metric beats the last upload.
    launcher: a command prefix the heavy stages run through, e.g. "torchrun --nproc_per_node=8".
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    # One pipeline per workspace: a second flow or `nla` run refuses at once (its stages inherit the lock).
    with workspace_lock(root, "prefect nla_pipeline"):
        if profile:
            apply_profile(profile, root / "params.yaml")
            logger.info("applied profile %s to %s", profile, root / "params.yaml")

        statuses: dict[str, str] = {}
        for stage in stage_order(root):
            retries = RETRIES.get(stage.split(":")[-1], 0)
            statuses[stage] = run_stage.with_options(
                name=f"dvc-{stage}", retries=retries, retry_delay_seconds=RETRY_DELAY_S[:retries]
            )(stage, str(root), launcher)

        new = _read_json(root / METRICS_FILE)
        published = _read_json(root / PUBLISHED_METRICS_FILE)
        if new is None:
            improved, verdict, diff = False, f"no metrics at {METRICS_FILE}", {}
        else:
            improved, verdict = improvement(new, published)
            diff = metrics_diff(new, published)
        create_markdown_artifact(
            key="nla-metrics",
            markdown=metrics_markdown(diff, verdict, statuses),
            description="metrics of this run vs the last published ones",
        )
        samples = root / SAMPLES_FILE
        create_markdown_artifact(
            key="nla-samples",
            markdown=samples.read_text(encoding="utf-8") if samples.is_file() else f"(no {SAMPLES_FILE} in this run)",
            description="sample explanations written by the evaluate stage",
        )
        logger.info(verdict)

        uploaded: dict[str, str] = {}
        if publish and improved:
            uploaded = upload(str(root))
            logger.info("published %s; baseline now %s", uploaded, PUBLISHED_METRICS_FILE)
        elif publish:
            logger.info("not publishing: %s", verdict)
        return {"stages": statuses, "improved": improved, "verdict": verdict, "uploaded": uploaded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=nla_pipeline.__doc__)
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: .)")
    parser.add_argument("--profile", default=None, help="merge profiles/<name>.yaml into params.yaml first")
    parser.add_argument("--publish", action="store_true", help="upload to the Hub if the key metric improved")
    parser.add_argument(
        "--launcher", default=None, help='run the heavy stages through it: "torchrun --nproc_per_node=8"'
    )
    args = parser.parse_args(argv)
    try:
        result = nla_pipeline(
            project_dir=args.project_dir, profile=args.profile, publish=args.publish, launcher=args.launcher
        )
    except (StageFailed, NLAError) as err:
        print(f"nla flow: error: {err}", file=sys.stderr)
        return 1
    print(f"nla flow: {result['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
