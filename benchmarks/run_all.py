"""Run every benchmark at one size and write `benchmarks/results-<device>.md` (and JSON lines).

    python benchmarks/run_all.py --size small --threads 1          # the CPU machines
    python benchmarks/run_all.py --size gpu --model path/to/model.gguf --results-dir "$OUT"

A benchmark that cannot run here (say, RL before its prerequisites exist, or `nla serve`
before the project has trained checkpoints) is listed with its reason instead of stopping
the others.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import traceback
from pathlib import Path

import bench_ar
import bench_extract
import bench_rl
import bench_rollout
import bench_serve
from common import ROOT, SIZES, device_label, environment, extra_sections, parser, setup, table

from nla.config import NLAError
from nla.io import atomic_write_text
from nla.models import resolve_device

BENCHMARKS = {
    "extract": bench_extract,
    "rollout": bench_rollout,
    "ar": bench_ar,
    "rl": bench_rl,
    "serve": bench_serve,
}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    bench_serve.options(p)
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks"), help="where results-<device>.md goes")
    args = p.parse_args()
    setup(args)
    size, device = SIZES[args.size], resolve_device(args.device)
    results, skipped, started = [], [], time.perf_counter()
    for name in args.only or list(BENCHMARKS):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            rows = BENCHMARKS[name].run(args, size)
        except NLAError as err:
            skipped.append(f"{name}: {err}")
            print(f"skipped {name}: {err}", flush=True)
            continue
        except Exception:  # report and go on: one broken benchmark must not hide the others
            skipped.append(f"{name}: failed: {traceback.format_exc().strip().splitlines()[-1]}")
            traceback.print_exc()
            continue
        results += rows
        print(table(rows), f"\n({time.perf_counter() - t0:.0f} s)", flush=True)

    lines = "".join(json.dumps(r.to_dict()) + "\n" for r in results)
    env = environment()
    report = "\n".join(
        [
            f"# Benchmarks: {device_label(device)}",
            "",
            f"- command: `python {shlex.join(['benchmarks/run_all.py', *sys.argv[1:]])}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; size `{args.size}`; model `{args.model}`; "
            f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
            f"- total {time.perf_counter() - started:.0f} s. Ratio = ours / baseline, measured in the same run "
            "(higher is better; for seconds, lower is better); peak MiB = torch peak allocated GPU memory of each side.",
            "",
            table(results),
            "",
            *(["Not run:", "", *[f"- {s}" for s in skipped], ""] if skipped else []),
            "<details><summary>JSON lines</summary>",
            "",
            "```json",
            lines.rstrip(),
            "```",
            "</details>",
            "",
        ]
    )
    path = Path(args.results_dir) / f"results-{device.type}.md"
    kept = extra_sections(path)  # sections other scripts wrote (bench_precision.py) stay
    atomic_write_text(path, report + ("\n" + kept if kept else ""))
    if args.out:
        atomic_write_text(args.out, lines)
    print(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
