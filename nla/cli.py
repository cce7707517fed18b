"""`nla`: one sub-command per pipeline stage, plus `explain` for inference.

Thin caller: parse arguments, load the typed config, call the stage function in `nla.*`.
Every user-facing failure is an `NLAError`, printed as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from nla.config import PATHS, NLAConfig, load_config, set_param
from nla.errors import NLAError
from nla.lock import workspace_lock

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


def _stage_validate_activations(cfg: NLAConfig, args) -> None:
    from nla.quality import validate_activations

    report = validate_activations(cfg, P.activations, P.splits, Path(P.quality) / "activations.json")
    print(f"validate-activations: {_gate_summary(report)}")


def _stage_validate_labels(cfg: NLAConfig, args) -> None:
    from nla.quality import validate_explanations

    report = validate_explanations(cfg, P.labels, Path(P.quality) / "explanations.json")
    print(f"validate-labels: {_gate_summary(report)}")


def _gate_summary(report: dict) -> str:
    results = report.get("expectations", [])
    passed = sum(1 for r in results if r.get("success"))
    return f"{passed}/{len(results)} expectations passed on {report.get('rows', '?')} rows"


def _stage_label(cfg: NLAConfig, args) -> None:
    from nla.label import run_label

    table = run_label(cfg, P.activations, P.splits, P.labels)
    print(f"label: {len(table)} explanations ({cfg.label.backend} backend) -> {P.labels}")


def _stage_sweep_alpha(cfg: NLAConfig, args) -> None:
    from nla.sweep import run_sweep_alpha

    result = run_sweep_alpha(cfg, P.activations, P.splits, P.labels, P.alpha_sweep)
    print(f"sweep-alpha: chose alpha={result['alpha']:.4g} -> {P.alpha_sweep}")
    if args.apply:
        set_param(args.params, "injection.scale", float(result["alpha"]))
        print(
            f"sweep-alpha: injection.scale={result['alpha']:.4g} written to {args.params}; `dvc repro` retrains the AV"
        )
    else:
        print("sweep-alpha: rerun with --apply (or set injection.scale) to train the AV with it")


def _stage_av_sft(cfg: NLAConfig, args) -> None:
    from nla.av_sft import run_av_sft

    # alpha comes from params only (injection.scale, or the 75th-percentile rule when null), so DVC tracks it.
    stats = run_av_sft(
        cfg,
        P.activations,
        P.splits,
        P.labels,
        P.av_sft,
        metrics_path=Path(P.metrics) / "av_sft.json",
        plots_path=Path(P.plots) / "av_sft_loss.csv",
        work_dir=Path(P.work) / "av_sft",
    )
    print(f"av-sft: loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f} -> {P.av_sft}")


def _stage_ar_sft(cfg: NLAConfig, args) -> None:
    from nla.ar_sft import run_ar_sft

    stats = run_ar_sft(
        cfg,
        P.activations,
        P.splits,
        P.labels,
        P.ar_sft,
        metrics_path=Path(P.metrics) / "ar_sft.json",
        plots_path=Path(P.plots) / "ar_sft_loss.csv",
    )
    print(f"ar-sft: train FVE {stats['ar_sft_train_fve']:.3f} -> {P.ar_sft}")


def _stage_rl(cfg: NLAConfig, args) -> None:
    from nla.rl import run_rl

    stats = run_rl(
        cfg,
        P.activations,
        P.splits,
        P.av_sft,
        P.ar_sft,
        P.rl,
        work_dir=Path(P.work) / "rl",
        log_path=Path(P.plots) / "rl_log.csv",
        eval_log_path=Path(P.plots) / "rl_eval.csv",
        metrics_path=Path(P.metrics) / "rl.json",
    )
    print(f"rl: {stats.get('steps', '?')} steps -> {P.rl}")


def _stage_evaluate(cfg: NLAConfig, args) -> None:
    from nla.evaluate import run_evaluate

    checkpoints = {"av_sft": P.av_sft, "ar_sft": P.ar_sft}
    if (Path(P.rl) / "av").is_dir():  # the RL pair is optional: evaluate runs after SFT alone too
        checkpoints |= {"av_rl": Path(P.rl) / "av", "ar_rl": Path(P.rl) / "ar"}
    metrics = run_evaluate(
        cfg,
        P.activations,
        P.splits,
        P.labels,
        checkpoints,
        Path(P.metrics) / "eval.json",
        P.plots,
        Path(P.reports) / "samples.md",
    )
    keys = ("fve_ar_gold", "fve_roundtrip_sft", "fve_roundtrip_rl", "fve_shuffled", "fve_empty")
    print("evaluate: " + ", ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics))


def _stage_publish(cfg: NLAConfig, args) -> None:
    from nla.explain import default_checkpoints
    from nla.publish import run_publish

    av, ar = default_checkpoints()
    summary = run_publish(cfg, {"av": av, "ar": ar}, Path(P.metrics) / "eval.json", P.publish)
    print(f"publish ({summary['upload']}): " + ", ".join(summary["models"]) + f" -> {P.publish}")


STAGES: dict[str, tuple[Callable[[NLAConfig, argparse.Namespace], None], str]] = {
    "corpus": (_stage_corpus, "build the documents table from corpus.source"),
    "extract": (_stage_extract, "residual-stream activations at block K (resumable shards)"),
    "split": (_stage_split, "assign documents to av_sft / ar_sft / rl / eval"),
    "validate-activations": (
        _stage_validate_activations,
        "quality gate on activations and splits (Great Expectations)",
    ),
    "label": (_stage_label, "warm-start explanations (local model, OpenAI-compatible server or baseline)"),
    "validate-labels": (_stage_validate_labels, "quality gate on the warm-start explanations (Great Expectations)"),
    "sweep-alpha": (_stage_sweep_alpha, "pick the replace-injection scale alpha by the correct-vs-shuffled loss gap"),
    "av-sft": (_stage_av_sft, "supervised warm start of the activation verbalizer (TRL SFTTrainer)"),
    "ar-sft": (_stage_ar_sft, "supervised training of the activation reconstructor"),
    "rl": (_stage_rl, "GRPO-style joint RL of AV and AR on round-trip reconstruction"),
    "evaluate": (_stage_evaluate, "held-out FVE of AR and round trip, controls, plots and samples"),
    "publish": (_stage_publish, "Hub-ready folders with model cards; uploads when publish.enabled"),
}


def _explain(args) -> None:
    from nla.explain import explain, explain_vectors, format_records

    positions = "all" if args.all else (args.position or None)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.vectors:
        records = explain_vectors(args.vectors, args.av, args.ar, **common)
    elif args.text:
        records = explain(args.text, positions, args.av, args.ar, **common)
    else:
        raise NLAError("nothing to explain; pass a text or --vectors FILE")
    if args.json:
        for record in records:
            print(json.dumps(record.to_dict()))
    else:
        print(format_records(records))


def _profile(args) -> None:
    from nla.config import apply_profile, list_profiles

    if args.name is None:
        print("\n".join(list_profiles(Path(args.params).parent)))
        return
    apply_profile(args.name, args.params)
    print(f"profile {args.name} merged into {args.params}; `dvc repro` reruns what changed")


# Stages that split their work over the processes of a launch (`torchrun -m nla <stage>`); the others run in one.
DISTRIBUTED_STAGES = frozenset({"extract", "label", "av-sft", "ar-sft", "rl", "evaluate"})
LAUNCHER_ENV = "NLA_LAUNCHER"  # a launcher command prefix these stages run through (see `_relaunch`)


class DistributedFailure(Exception):
    """Another process of the launch failed, so a collective of this one broke off."""


def _run_stage(cfg: NLAConfig, args) -> None:
    """Run one stage; under a launcher inside its process group, the workspace lock taken once per launch."""
    lock = workspace_lock(Path(args.params).resolve().parent, f"nla {args.command}")
    if int(os.environ.get("WORLD_SIZE") or 1) <= 1:  # no launcher (or one process): exactly the plain run
        with lock:
            STAGES[args.command][0](cfg, args)
        return
    if args.command not in DISTRIBUTED_STAGES:
        raise NLAError(f"nla {args.command} runs in one process; drop the launcher (torchrun / accelerate launch)")
    import torch.distributed as dist

    import nla.distributed as distributed

    with distributed.process_group(cfg.distributed.timeout_minutes):
        distributed.quiet_others()
        try:
            with distributed.main_first(lock):
                STAGES[args.command][0](cfg, args)
        except dist.DistError as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise DistributedFailure(
                f"a collective broke off ({first}): another process of the launch stopped"
            ) from None


def _plan(args) -> None:
    from nla.plan import format_plan, measure_ar_step, plan

    profile = args.plan_profile or args.profile
    cfg = load_config(args.params, profile)
    if args.check:
        result = measure_ar_step(cfg)
        mib = {k: v / 2**20 for k, v in result.items() if k != "tokens"}
        print(
            f"AR-SFT step of {cfg.model.name} on this CPU ({result['tokens']} tokens, {cfg.model.dtype}):\n"
            f"  activations: measured {mib['measured_saved_bytes']:.0f} MiB saved for backward, "
            f"planned {mib['estimated_activation_bytes']:.0f} MiB\n"
            f"  step peak:   measured {mib['measured_peak_rss_growth']:.0f} MiB resident growth, "
            f"planned {mib['estimated_step_bytes']:.0f} MiB (activations + grads + optimizer)"
        )
        return
    root = Path(args.params).resolve().parent
    needs = plan(cfg, args.gpus, root, args.model_config)
    print(format_plan(needs, f"{cfg.model.name} (layer {cfg.model.layer}, {profile or 'params.yaml'}), per GPU"))


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
        stage = sub.add_parser(name, help=help_text, description=help_text)
        if name == "sweep-alpha":
            stage.add_argument("--apply", action="store_true", help="write the chosen alpha to injection.scale")
    ex = sub.add_parser(
        "explain",
        help="explain activations of a text (or saved vectors) with a trained AV",
        description="Explain the residual-stream activation at token positions of a text.",
    )
    ex.add_argument("text", nargs="*", help="text(s) to explain")
    ex.add_argument("--position", type=int, action="append", help="token index (negative from the end); repeatable")
    ex.add_argument("--all", action="store_true", help="explain every token")
    ex.add_argument("--vectors", help="a .pt/.npy/.safetensors file of vectors instead of text")
    ex.add_argument("--av", "--model", dest="av", help="AV checkpoint folder (default: RL if present, else SFT)")
    ex.add_argument("--ar", help="AR checkpoint folder, for the round-trip FVE")
    ex.add_argument("--max-new-tokens", type=int, default=48)
    ex.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ex.add_argument("--json", action="store_true", help="one JSON record per line")
    pr = sub.add_parser(
        "profile",
        help="list params profiles, or merge one into params.yaml",
        description="Merge profiles/NAME.yaml into params.yaml so DVC tracks the change.",
    )
    pr.add_argument("name", nargs="?", help="profile to apply (omit to list)")
    pl = sub.add_parser(
        "plan",
        help="GPU memory per stage on 1 GPU, N-GPU DDP and N-GPU FSDP, from the model's config",
        description="Parameter, gradient, optimizer and activation memory per stage at the params' batch sizes.",
    )
    pl.add_argument("--profile", dest="plan_profile", default=None, help="overlay profiles/<name>.yaml")
    pl.add_argument("--gpus", type=int, default=8, help="N for the DDP and FSDP rows (default: 8)")
    pl.add_argument("--model-config", default=None, help="a config.json to plan for instead of model.name's")
    pl.add_argument("--check", action="store_true", help="measure an AR-SFT step of the model on this CPU instead")
    return parser


def _relaunch(args, argv: list[str]) -> None:
    """With NLA_LAUNCHER set (e.g. "torchrun --nproc_per_node=8"), become `<launcher> -m nla <argv>`.

    So `dvc repro` and the Prefect flow, which run `nla <stage>`, can drive a multi-GPU run
    without a change to dvc.yaml. Only stages that split their work are relaunched; the
    launched processes see NLA_LAUNCHED and run the stage themselves.
    """
    prefix = os.environ.get(LAUNCHER_ENV, "").strip()
    if not prefix or args.command not in DISTRIBUTED_STAGES or os.environ.get("NLA_LAUNCHED"):
        return
    command = [*shlex.split(prefix), "-m", "nla", *argv]
    os.environ["NLA_LAUNCHED"] = "1"
    try:
        os.execvp(command[0], command)
    except OSError as err:
        raise NLAError(f"{LAUNCHER_ENV}={prefix!r} cannot start ({err.strerror}); fix or unset it") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        _relaunch(args, argv)
        if args.command == "explain":
            _explain(args)
        elif args.command == "profile":
            _profile(args)
        elif args.command == "plan":
            _plan(args)
        else:
            cfg = load_config(args.params, args.profile)
            _run_stage(cfg, args)
    except NLAError as err:
        print(f"nla {args.command}: error: {err}", file=sys.stderr)
        return 2
    except DistributedFailure as err:
        print(f"nla {args.command}: error: {err}; rerun the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nla {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
