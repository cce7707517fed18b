"""Score any AV/AR checkpoints on a run's rows with the evaluate stage (every control, both sets).

    python scripts/evaluate_checkpoints.py --data data --av-sft OLD/av_sft --ar-sft OLD/ar_sft \
        --av-rl OLD/rl/av --ar-rl OLD/rl/ar --out reports/old_default

How the old default's checkpoints were scored on the new corpus' held-out and foreign rows
(reports/explanations.md): same subject model and layer, so the rows fit any of its NLAs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nla.config import load_config
from nla.evaluate import run_evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data", help="folder with activations/, split/, labels/")
    for name in ("av-sft", "ar-sft", "av-rl", "ar-rl"):
        ap.add_argument(f"--{name}", required=name.endswith("sft"))
    ap.add_argument(
        "--out", required=True, help="folder for eval.json, eval_details.json, eval_rows.jsonl, plots/, samples.md"
    )
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    checkpoints = {"av_sft": args.av_sft, "ar_sft": args.ar_sft, "av_rl": args.av_rl, "ar_rl": args.ar_rl}
    run_evaluate(
        load_config(args.params),
        data / "activations",
        data / "split",
        data / "labels",
        checkpoints,
        out / "eval.json",
        out / "plots",
        out / "samples.md",
        details_path=out / "eval_details.json",
        rows_path=out / "eval_rows.jsonl",
        provenance_path=out / "provenance.json",
    )


if __name__ == "__main__":
    main()
