"""Run facts: what differs between two runs of identical inputs (clock, host, git commit, timings).

None of it enters a DVC output (sidecars, metrics, plots, quality reports), so identical inputs
give byte-identical outputs and DVC stops at a stage whose outputs did not change instead of
rerunning everything downstream. Each stage writes its facts to its own JSON file instead:
`reports/provenance/<stage>.json` from the CLI (git ignores that folder and no stage depends
on it), or beside the stage's output when a stage function is called directly.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from nla.io import write_json

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "pyarrow", "dvc")  # the versions worth recording


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def beside(output: str | Path) -> Path:
    """The default provenance file of a stage function called directly: `<output>_provenance.json` next to it."""
    output = Path(output)
    return output.with_name(f"{output.stem if output.suffix else output.name}_provenance.json")


def write_provenance(path: str | Path, stage: str, **facts: Any) -> dict[str, Any]:
    """Write the stage's run facts (timings, counters of this run) with the clock, host, commit and versions."""
    record = {
        "stage": stage,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": package_versions(),
        **facts,
    }
    write_json(path, record)
    return record
