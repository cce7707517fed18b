"""AV-SFT steps per minute with the project's allocator setting (`nla.allocator`) against glibc's defaults.

Both sides run the same command, `nla av-sft` for `--steps` steps on the project's own data (the
pipeline's activations, split and labels), each in a fresh process and a fresh copy of the
project's params, in alternating rounds (ours, glibc's, ours, ...). Glibc's side sets
`NLA_SYSTEM_MALLOC=1`, which leaves the mmap and trim thresholds at their defaults. Per side:
the median training seconds (the stage's own `train_seconds`, model loading excluded), and the
user and system CPU seconds of the whole process (the page faults show up as system time).
The check: both sides write the same loss curve to 1e-4 (the allocator must not change a number).

    python benchmarks/bench_allocator.py                         # the pipeline's data in this checkout
    python benchmarks/bench_allocator.py --project ../run --results benchmarks/results-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, replace_section

from nla.config import set_param

HEADING = "Allocator: glibc thresholds raised vs defaults (bench_allocator.py)"


def run_side(project: Path, work: Path, steps: int, system_malloc: bool) -> dict[str, float]:
    """One `nla av-sft` process in a fresh copy of the project's params: its seconds, CPU times and losses."""
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    shutil.copy(project / "params.yaml", work / "params.yaml")
    for part in ("activations", "split", "labels"):
        (work / "data" / part).symlink_to((project / "data" / part).resolve())
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("NLA_SYSTEM_MALLOC", None)
    if system_malloc:
        env["NLA_SYSTEM_MALLOC"] = "1"
    set_param(work / "params.yaml", "av_sft.max_steps", steps)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nla.cli", "av-sft"], cwd=work, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    provenance = json.loads((work / "reports" / "provenance" / "av_sft.json").read_text())
    losses = [float(line.split(",")[1]) for line in (work / "plots" / "av_sft_loss.csv").read_text().splitlines()[1:]]
    return {
        "train_seconds": provenance["train_seconds"],
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "system": after.ru_stime - before.ru_stime,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(ROOT), help="a folder whose data/ holds the pipeline's outputs")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", help="markdown file to write the section into (e.g. benchmarks/results-cpu.md)")
    args = parser.parse_args()
    project = Path(args.project).resolve()
    load_start = os.getloadavg()
    sides: dict[str, list[dict]] = {"ours": [], "glibc": []}
    with tempfile.TemporaryDirectory(prefix="nla-bench-alloc-") as tmp:
        for round_ in range(args.rounds):
            for name in ("ours", "glibc"):
                result = run_side(project, Path(tmp) / name, args.steps, system_malloc=name == "glibc")
                sides[name].append(result)
                print(
                    f"round {round_ + 1} {name}: {result['train_seconds']:.1f} s train, "
                    f"user {result['user']:.1f} s, system {result['system']:.1f} s",
                    flush=True,
                )
    worst = max(abs(a - b) for a, b in zip(sides["ours"][0]["losses"], sides["glibc"][0]["losses"], strict=True))
    if worst > 1e-4:
        raise SystemExit(f"the loss curves differ by {worst:.2e}: the allocator setting changed a number")
    median = {
        name: {k: statistics.median(r[k] for r in runs) for k in ("train_seconds", "user", "system")}
        for name, runs in sides.items()
    }
    rate = {name: 60 * args.steps / m["train_seconds"] for name, m in median.items()}
    body = "\n".join(
        [
            f"- command: `python benchmarks/bench_allocator.py --steps {args.steps} --rounds {args.rounds}`",
            f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; load average (1, 5, 15 min) "
            f"at the start {' '.join(f'{x:.2f}' for x in load_start)}, at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            "- ours: `nla.allocator.keep_freed_memory` (mmap and trim thresholds raised); baseline: glibc's defaults "
            "(`NLA_SYSTEM_MALLOC=1`); the same `nla av-sft` process otherwise, medians of alternating rounds",
            "",
            "| benchmark | unit | ours | baseline | ratio | CPU user s ours / base | CPU system s ours / base | check |",
            "|---|---|---|---|---|---|---|---|",
            f"| av_sft, {args.steps} steps of the project's default | steps/min | {rate['ours']:.1f} | {rate['glibc']:.1f} "
            f"| **{rate['ours'] / rate['glibc']:.2f}x** | {median['ours']['user']:.1f} / {median['glibc']['user']:.1f} "
            f"| {median['ours']['system']:.1f} / {median['glibc']['system']:.1f} | loss curves equal to {worst:.0e} |",
        ]
    )
    print(body)
    if args.results:
        replace_section(args.results, HEADING, body)


if __name__ == "__main__":
    main()
