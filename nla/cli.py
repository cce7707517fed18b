"""`nla`: one sub-command per pipeline stage, plus `explain` for inference.

Thin caller: parse arguments, load the typed config, call the stage function in `nla.*`.
Every user-facing failure is an `NLAError`, printed as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from nla.config import PATHS, NLAConfig, NLAError, load_config

P = PATHS


def _stage_corpus(cfg: NLAConfig, args) -> None:
    from nla.corpus import run_corpus

    docs = run_corpus(cfg.corpus, P.documents)
    print(f"corpus: {len(docs)} documents -> {P.documents}")


def _stage_extract(cfg: NLAConfig, args) -> None:
    from nla.extract import run_extract

    table = run_extract(cfg, P.documents, P.activations, Path(P.work) / "extract")
    print(f"extract: {len(table)} activations from {table.doc_id.nunique()} documents -> {P.activations}")


def _stage_split(cfg: NLAConfig, args) -> None:
    from nla.extract import run_split

    table = run_split(cfg, P.activations, P.splits)
    print("split: " + ", ".join(f"{k}={v}" for k, v in table.split.value_counts().sort_index().items()))


STAGES: dict[str, tuple[Callable[[NLAConfig, argparse.Namespace], None], str]] = {
    "corpus": (_stage_corpus, "build the documents table from corpus.source"),
    "extract": (_stage_extract, "residual-stream activations at block K (resumable shards)"),
    "split": (_stage_split, "assign documents to av_sft / ar_sft / rl / eval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nla",
        description="Natural Language Autoencoders: train an activation verbalizer (AV) and reconstructor (AR) "
        "for a language model's residual stream, evaluate the round trip, and explain activations.",
        epilog="Stages read params.yaml (override with --params / --profile) and write under data/, metrics/, "
        "plots/ and reports/. `dvc repro` runs them all in order.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="overlay profiles/<name>.yaml on the params")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.params, args.profile)
        STAGES[args.command][0](cfg, args)
    except NLAError as err:
        print(f"nla {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nla {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
