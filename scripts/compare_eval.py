"""Side-by-side table of evaluate runs (their eval_details.json): every FVE with its 95% CI, both sets.

python scripts/compare_eval.py reports/old_default_eval_details.json reports/eval_details.json --names "old default" "new default"
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
    "token_only",
    "untrained",
    "shuffled",
    "empty",
    "mean",
    "const",
)
DIAGNOSTICS = ("distinct", "in_context", "top_share", "token_match")
FEATURES = ("feature1", "feature2", "feature3")  # per label line: `<feature>_distinct`, `<feature>_recall`


def cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "–"
    lo, hi = metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi")
    return f"{metrics[key]:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="eval_details.json files")
    ap.add_argument("--names", nargs="+", help="one column name per file")
    args = ap.parse_args()
    runs = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.runs]
    names = args.names or args.runs
    for suffix, title in (("", "held-out split (eval)"), ("_foreign", "foreign corpus (no stage trained on it)")):
        print(f"\n### FVE on the {title}, 95% CI over documents\n")
        print("| series | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(runs))
        for series in SERIES:
            print(f"| {series} | " + " | ".join(cell(m, f"fve_{series}{suffix}") for m in runs) + " |")
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
