"""Side-by-side table of evaluate runs (their eval_details.json): every FVE with its 95% CI, both sets.

python scripts/compare_eval.py reports/old_default_eval_details.json reports/eval_details.json --names "old default" "new default"
python scripts/compare_eval.py --summary reports/gpu/sweeps/av_budget/*.json   # one row per run (a sweep's variants)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SERIES = (
    "roundtrip_rl",
    "roundtrip_sft",
    "ar_gold",
    "ar_gold_rl",
    "copy",
    "final_only",
    "no_context",
    "token_only",
    "untrained",
    "shuffled",
    "empty",
    "mean",
    "const",
)
GAIN_CONTROLS = ("final_only", "copy", "no_context")  # evaluate's paired gains of the RL round trip
DIAGNOSTICS = ("distinct", "in_context", "top_share", "token_match")
FEATURES = ("feature1", "feature2", "feature3")  # per label line: `<feature>_distinct`, `<feature>_recall`


def cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "–"
    lo, hi = metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi")
    return f"{metrics[key]:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else "")


SUMMARY = (  # (column, key): the foreign set's headline, the held-out split's, and what the AV gets right
    ("AR on gold", "fve_ar_gold_foreign"),
    ("round trip SFT", "fve_roundtrip_sft_foreign"),
    ("round trip RL", "fve_roundtrip_rl_foreign"),
    ("final_only", "fve_final_only_foreign"),
    ("no_context", "fve_no_context_foreign"),
    ("RL − final_only (paired)", "gain_roundtrip_rl_vs_final_only_foreign"),
    ("RL held-out", "fve_roundtrip_rl"),
    ("final_only held-out", "fve_final_only"),
)
CONTEXT_LINES = 2  # summary columns for the label lines before the final token's


def line_recalls(m: dict) -> list[str]:
    """The RL AV's foreign recall per label line: the context lines by position, then the final token's."""
    n = max((i for i in range(1, 10) if f"feature{i}_recall_rl_foreign" in m), default=0)
    cells = [f"{m[f'feature{i}_recall_rl_foreign']:.2f}" for i in range(1, n + 1)]
    context = (cells[:-1] + ["–"] * CONTEXT_LINES)[:CONTEXT_LINES]
    return [*context, cells[-1] if cells else "–"]


def summary(runs: list[dict], names: list[str]) -> None:
    """One row per run: the foreign FVEs with CIs (the RL pair's unless noted), held-out FVEs, and the RL AV's
    token match and per-line recall on the foreign set."""
    recall_columns = [f"line {i} recall" for i in range(1, CONTEXT_LINES + 1)] + ["final line recall"]
    columns = [c for c, _ in SUMMARY] + ["token named", *recall_columns]
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, m in zip(names, runs, strict=True):
        fves = [cell(m, key) if key.endswith("_foreign") else cell(m, key).split(" [")[0] for _, key in SUMMARY]
        named = f"{m['token_match_rl_foreign']:.2f}" if "token_match_rl_foreign" in m else "–"
        print(f"| {name} | " + " | ".join([*fves, named, *line_recalls(m)]) + " |")


def run_name(path: str) -> str:
    """A file's stem, or for a run's reports/eval_details.json the run folder's name (a sweep's variant)."""
    file = Path(path).resolve()
    return file.parent.parent.name if file.parent.name == "reports" else file.stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="eval_details.json files")
    ap.add_argument("--names", nargs="+", help="one column name per file (default: the file names)")
    ap.add_argument("--summary", action="store_true", help="one row per run instead of one column")
    args = ap.parse_args()
    runs = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.runs]
    names = args.names or [run_name(path) for path in args.runs]
    if args.summary:
        summary(runs, names)
        return
    for suffix, title in (("", "held-out split (eval)"), ("_foreign", "foreign corpus (no stage trained on it)")):
        print(f"\n### FVE on the {title}, 95% CI over documents\n")
        print("| series | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(runs))
        for series in SERIES:
            print(f"| {series} | " + " | ".join(cell(m, f"fve_{series}{suffix}") for m in runs) + " |")
        for control in GAIN_CONTROLS:
            key = f"gain_roundtrip_rl_vs_{control}{suffix}"
            print(f"| roundtrip_rl − {control} (paired) | " + " | ".join(cell(m, key) for m in runs) + " |")
        print(f"\n| collapse diagnostic ({title}) | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(runs))
        for av in ("sft", "rl", "untrained"):
            for diag in DIAGNOSTICS:
                key = f"{diag}_{av}{suffix}"
                print(f"| {diag} ({av}) | " + " | ".join(f"{m[key]:.2f}" if key in m else "–" for m in runs) + " |")
            for feature in FEATURES:
                for stat in ("distinct", "recall"):
                    key = f"{feature}_{stat}_{av}{suffix}"
                    if any(key in m for m in runs):
                        cells = " | ".join(f"{m[key]:.2f}" if key in m else "–" for m in runs)
                        print(f"| {feature} {stat} ({av}) | {cells} |")


if __name__ == "__main__":
    main()
