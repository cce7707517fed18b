"""The scheduled deployment of the NLA pipeline, served by this process (no work pool needed).

    prefect server start                                  # terminal 1 (UI at http://127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve --profile gpu --publish   # terminal 2

Each scheduled (or manually triggered) run reruns what DVC finds changed, compares the new
metrics with the last published ones, leaves the metrics table and sample explanations as
Prefect artifacts, and uploads only when asked to and the key metric improved.
For a worker and a work pool instead of this process, see prefect.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.pipeline import nla_pipeline

DEPLOYMENT = "nla-nightly"
CRON = "0 3 * * *"  # every night at 03:00 UTC
TIMEZONE = "UTC"


def pipeline_deployment(
    name: str = DEPLOYMENT,
    cron: str = CRON,
    project_dir: str | Path = ".",
    profile: str | None = None,
    publish: bool = False,
    launcher: str | None = None,
):
    """A RunnerDeployment of `nla_pipeline` on a cron schedule; the parameters are its defaults."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    return nla_pipeline.to_deployment(
        name=name,
        schedule=Cron(cron, timezone=TIMEZONE),
        parameters={
            "project_dir": str(Path(project_dir).resolve()),
            "profile": profile,
            "publish": publish,
            "launcher": launcher,
        },
        tags=["nla"],
        description="Run the NLA DVC pipeline; publish to the Hub only when the key metric improved.",
        entrypoint_type=EntrypointType.MODULE_PATH,  # flows.pipeline.nla_pipeline: works from any cwd
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEPLOYMENT, help=f"deployment name (default: {DEPLOYMENT})")
    parser.add_argument("--cron", default=CRON, help=f"cron schedule in {TIMEZONE} (default: '{CRON}')")
    parser.add_argument("--project-dir", default=".", help="the DVC project the runs work in (default: .)")
    parser.add_argument("--profile", default=None, help="params profile the runs apply (profiles/<name>.yaml)")
    parser.add_argument("--publish", action="store_true", help="upload to the Hub when the key metric improved")
    parser.add_argument("--launcher", default=None, help='heavy stages run through it: "torchrun --nproc_per_node=8"')
    args = parser.parse_args(argv)
    from prefect import serve

    serve(pipeline_deployment(args.name, args.cron, args.project_dir, args.profile, args.publish, args.launcher))
    return 0


if __name__ == "__main__":
    sys.exit(main())
