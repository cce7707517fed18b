"""scripts/compare_eval.py: runs named after their folders, per-line recall by position, the final line last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_eval.py"


def test_summary_names_runs_by_folder_and_puts_the_final_line_last(tmp_path):
    two_lines = {"fve_roundtrip_rl_foreign": 0.25, "feature1_recall_rl_foreign": 0.1, "feature2_recall_rl_foreign": 0.9}
    three_lines = {**two_lines, "feature2_recall_rl_foreign": 0.3, "feature3_recall_rl_foreign": 0.8}
    paths = []
    for name, metrics in (("short", two_lines), ("long", three_lines)):
        path = tmp_path / name / "reports" / "eval_details.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(metrics), encoding="utf-8")
        paths.append(str(path))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--summary", *paths], capture_output=True, text=True, check=True
    ).stdout
    header, _, short, long = out.splitlines()
    assert header.split(" | ")[-3:] == ["line 1 recall", "line 2 recall", "final line recall |"]
    assert short.startswith("| short | ") and short.endswith("| 0.10 | – | 0.90 |")
    assert long.startswith("| long | ") and long.endswith("| 0.10 | 0.30 | 0.80 |")
    assert "+0.250" in short
