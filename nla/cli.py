"""`nla`: one sub-command per pipeline stage, plus `explain` for inference and `convert` for checkpoints.

Thin caller: parse arguments, load the typed config, call the stage function in `nla.*`.
Every user-facing failure is an `NLAError`, printed as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from nla.allocator import keep_freed_memory
from nla.config import PATHS, NLAConfig, load_config, set_param
from nla.errors import NLAError
from nla.interrupt import exit_interrupted, install_signal_handlers
from nla.lock import workspace_lock

P = PATHS


def _provenance(stage: str) -> Path:
    """Where a stage run from the CLI leaves its run facts (timings, host, commit): outside every DVC output."""
    return Path(P.provenance) / f"{stage}.json"


def _stage_corpus(cfg: NLAConfig, args) -> None:
    from nla.corpus import run_corpus

    docs = run_corpus(cfg.corpus, P.documents, Path(P.reports) / "corpus.json")
    print(f"corpus: {len(docs)} documents -> {P.documents}")


def _stage_extract(cfg: NLAConfig, args) -> None:
    from nla.extract import run_extract

    table = run_extract(
        cfg, P.documents, P.activations, Path(P.work) / "extract", provenance_path=_provenance("extract")
    )
    print(f"extract: {len(table)} activations from {table.doc_id.nunique()} documents -> {P.activations}")


def _stage_split(cfg: NLAConfig, args) -> None:
    from nla.extract import run_split

    table = run_split(cfg, P.activations, P.splits, P.documents)
    print("split: " + ", ".join(f"{k}={v}" for k, v in table.split.value_counts().sort_index().items()))


def _stage_validate_activations(cfg: NLAConfig, args) -> None:
    from nla.quality import validate_activations

    report = validate_activations(
        cfg,
        P.activations,
        P.splits,
        Path(P.quality) / "activations.json",
        provenance_path=_provenance("validate_activations"),
    )
    print(f"validate-activations: {_gate_summary(report)}")


def _stage_validate_labels(cfg: NLAConfig, args) -> None:
    from nla.quality import validate_explanations

    report = validate_explanations(
        cfg, P.labels, Path(P.quality) / "explanations.json", provenance_path=_provenance("validate_labels")
    )
    print(f"validate-labels: {_gate_summary(report)}")


def _gate_summary(report: dict) -> str:
    results = report.get("expectations", [])
    passed = sum(1 for r in results if r.get("success"))
    return f"{passed}/{len(results)} expectations passed on {report.get('rows', '?')} rows"


def _stage_label(cfg: NLAConfig, args) -> None:
    from nla.label import run_label

    table = run_label(cfg, P.activations, P.splits, P.labels, provenance_path=_provenance("label"))
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
        provenance_path=_provenance("av_sft"),
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
        av_dir=P.av_sft,
        metrics_path=Path(P.metrics) / "ar_sft.json",
        plots_path=Path(P.plots) / "ar_sft_loss.csv",
        provenance_path=_provenance("ar_sft"),
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
        provenance_path=_provenance("rl"),
    )
    print(f"rl: {stats.get('steps', '?')} steps -> {P.rl}")


def _stage_evaluate(cfg: NLAConfig, args) -> None:
    from nla.evaluate import HEADLINE, run_evaluate

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
        details_path=Path(P.reports) / "eval_details.json",
        rows_path=Path(P.reports) / "eval_rows.jsonl",
        provenance_path=_provenance("evaluate"),
    )
    print("evaluate: " + ", ".join(f"{short}={metrics[key]:.3f}" for short, key in HEADLINE.items() if key in metrics))


def _stage_publish(cfg: NLAConfig, args) -> None:
    from nla.explain import default_checkpoints
    from nla.publish import run_publish

    av, ar = default_checkpoints()
    summary = run_publish(cfg, {"av": av, "ar": ar}, Path(P.metrics) / "eval.json", P.publish, layout=args.layout)
    models = ", ".join(f"{role} ({m['weights']})" for role, m in summary["models"].items())
    print(f"publish: {models} -> {P.publish}; `nla upload` sends them to the Hub")


def _stage_upload(cfg: NLAConfig, args) -> None:
    from nla.upload import run_upload

    result = run_upload(cfg, P.publish, Path(P.metrics) / "eval.json", P.published_metrics, force=args.force)
    if result["uploaded"]:
        print(f"upload: {result['verdict']}; " + ", ".join(result["uploaded"].values()))
        print(f"upload: {P.published_metrics} records what was uploaded; commit it")
    else:
        print(f"upload: nothing uploaded ({result['verdict']}); --force uploads anyway")


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
    "publish": (_stage_publish, "Hub-ready folders with model cards (builds only; `nla upload` uploads)"),
    "upload": (_stage_upload, "upload the published folders to the Hub when the key metric improved"),
}


SAMPLE_TEMPERATURE, SAMPLE_NEW_TOKENS, GREEDY_NEW_TOKENS = 1.0, 200, 48  # --sample: the reference clients'


def _explain(args) -> None:
    from nla.api import check_texts
    from nla.explain import explain, explain_vectors, format_records, load_nla, load_vectors
    from nla.interop import describe

    if not args.vectors and not args.text:
        raise NLAError("nothing to explain; pass a text or --vectors FILE")
    if args.vectors:
        vectors = load_vectors(args.vectors)  # its shape and NaN checks, before the models load
    else:
        check_texts(args.text)  # before the models load
    positions = "all" if args.all else (args.position or None)
    temperature = args.temperature if args.temperature is not None else SAMPLE_TEMPERATURE if args.sample else 0.0
    new_tokens = args.max_new_tokens or (SAMPLE_NEW_TOKENS if args.sample else GREEDY_NEW_TOKENS)
    nla = load_nla(args.av, args.ar, injection=args.injection, dtype=args.dtype)
    loaded = f"AV: {describe(nla.av.meta)}" + (f"; AR: {describe(nla.ar.meta)}" if nla.ar is not None else "")
    print(f"nla explain: {loaded}", file=sys.stderr)
    common = dict(max_new_tokens=new_tokens, temperature=temperature, nla=nla)
    if args.vectors:
        records = explain_vectors(vectors, **common)
    else:
        records = explain(args.text, positions, max_tokens=args.max_tokens, **common)
    if args.json:
        for record in records:
            print(json.dumps(record.to_dict()))
    else:
        print(format_records(records))


def _convert(args) -> None:
    from nla.interop import convert, describe

    meta = convert(args.src, args.dst, to=args.to, injection=args.injection)
    print(f"convert: {args.src} -> {args.dst} ({args.to} layout): {describe(meta)}")


CHECKPOINT_FLAGS = ("av", "ar", "av2", "ar2")  # folders or Hub ids
PATH_FLAGS = ("activations", "splits", "labels", "corpus", "cache_dir")
# `nla serve` limits; the defaults are ExplorerConfig's (a test keeps them equal; nla.explorer imports torch).
SERVE_NUMBERS = (
    ("--batch-size", 32, "positions per AV batch"),
    ("--max-new-tokens", 48, "explanation tokens"),
    ("--max-chars", 4000, "characters per text"),
    ("--max-tokens", 256, "subject tokens per text"),
    ("--time-limit", 120.0, "seconds per explain request, queueing included"),
    ("--max-queue", 32, "explain requests waiting at once"),
    ("--eval-max-rows", 200, "held-out rows in the eval view"),
    ("--corpus-docs", 32, "documents explained for search"),
    ("--corpus-tokens", 64, "tokens per document explained for search"),
)
NUMBER_FLAGS = tuple(flag[2:].replace("-", "_") for flag, _, _ in SERVE_NUMBERS)


def _serve(args) -> None:
    try:
        from nla.serve import serve
    except ImportError as err:
        raise NLAError(f"nla serve needs {err.name}; install it with pip install 'nla[serve]'") from None
    from nla.explorer import ExplorerConfig

    given = {k: v for k, v in vars(args).items() if v is not None}
    checkpoints = {k: v for k, v in given.items() if k in CHECKPOINT_FLAGS}
    paths = {k: Path(v) for k, v in given.items() if k in PATH_FLAGS}
    numbers = {k: v for k, v in given.items() if k in NUMBER_FLAGS}
    cfg = ExplorerConfig(
        **checkpoints,
        **paths,
        **numbers,
        device=args.device,
        injection=args.injection,
        dtype=args.dtype,
        rows=tuple(Path(p) for p in args.rows or ()),
    )
    try:
        serve(cfg, host=args.host, port=args.port, allow_remote=args.allow_remote)
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then re-raises it
        print("nla serve: stopped", file=sys.stderr)


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
    cfg = load_config(args.params, profile, allow_empty=args.defaults)
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
    parser.add_argument(
        "--defaults", action="store_true", help="accept an empty params file (every setting at its default)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        if name == "sweep-alpha":
            stage.add_argument("--apply", action="store_true", help="write the chosen alpha to injection.scale")
        if name == "publish":
            stage.add_argument(
                "--format",
                dest="layout",
                choices=("nla", "kitft"),
                default="nla",
                help="folder layout: this project's (default) or the paper's released one (kitft)",
            )
        if name == "upload":
            stage.add_argument("--force", action="store_true", help="upload even if the key metric did not improve")
    ex = sub.add_parser(
        "explain",
        help="explain activations of a text (or saved vectors) with a trained AV",
        description="Explain the residual-stream activation at token positions of a text.",
    )
    ex.add_argument("text", nargs="*", help="text(s) to explain")
    ex.add_argument("--position", type=int, action="append", help="token index (negative from the end); repeatable")
    ex.add_argument("--all", action="store_true", help="explain every token")
    ex.add_argument("--vectors", help="a .pt/.npy/.safetensors file of vectors instead of text")
    ex.add_argument(
        "--av",
        "--model",
        dest="av",
        help="AV checkpoint folder or Hub id, this project's or a public format (default: RL if present, else SFT)",
    )
    ex.add_argument("--ar", help="AR checkpoint folder or Hub id, for the round trip (FVE, or cos for public ARs)")
    ex.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default {GREEDY_NEW_TOKENS}; with --sample {SAMPLE_NEW_TOKENS}",
    )
    ex.add_argument("--max-tokens", type=int, default=512, help="window read per text (longer: its last tokens)")
    ex.add_argument("--temperature", type=float, default=None, help="0: greedy (the default without --sample)")
    ex.add_argument(
        "--sample", action="store_true", help=f"sample as the reference clients do: temperature {SAMPLE_TEMPERATURE:g}"
    )
    ex.add_argument("--injection", choices=("replace", "karvonen"), help="override the AV's injection mode")
    ex.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="override the sidecar's dtype")
    ex.add_argument("--json", action="store_true", help="one JSON record per line (with token_ids and raw)")
    cv = sub.add_parser(
        "convert",
        help="write a checkpoint (folder or Hub id, any NLA format) in this project's or the released layout",
        description="Convert an NLA checkpoint: a public one (nanoNLA, the paper's release) into this project's "
        "format, or this project's into the released (kitft) layout. Round trips are lossless.",
    )
    cv.add_argument("src", help="checkpoint folder or Hub id")
    cv.add_argument("dst", help="output folder (written atomically)")
    cv.add_argument("--to", choices=("nla", "kitft"), default="nla", help="target layout (default: nla)")
    cv.add_argument("--injection", choices=("replace", "karvonen"), help="override the AV's injection mode")
    sv = sub.add_parser(
        "serve",
        help="a local explorer in the browser: explanations token by token, eval rows, search",
        description="Serve the explorer (docs/serve.md): models load once, requests are queued and batched.",
    )
    sv.add_argument("--av", help="AV checkpoint folder or Hub id, any format (default: RL if present, else SFT)")
    sv.add_argument("--ar", help="AR checkpoint, for the round-trip FVE (cos only for public ARs)")
    sv.add_argument("--av2", help="a second AV, shown side by side")
    sv.add_argument("--ar2", help="the second AV's AR")
    sv.add_argument("--injection", choices=("replace", "karvonen"), help="override the AVs' injection mode")
    sv.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="override the sidecars' dtype")
    sv.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    sv.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    sv.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (no authentication!)")
    sv.add_argument("--device", default="auto")
    for flag, default, text in SERVE_NUMBERS:
        sv.add_argument(flag, type=type(default), default=default, help=f"{text} (default {default})")
    sv.add_argument("--activations", help=f"activations for the training index and eval rows (default {P.activations})")
    sv.add_argument("--splits", help=f"default {P.splits}")
    sv.add_argument("--labels", help=f"default {P.labels}")
    sv.add_argument("--rows", action="append", help="extra eval rows (.parquet/.jsonl with vector, token, prefix)")
    sv.add_argument("--corpus", help=f"search corpus: .txt, .jsonl or documents .parquet (default {P.documents})")
    sv.add_argument(
        "--cache-dir", help=f"where explained rows and corpus documents are cached (default {P.work}/serve)"
    )
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
    keep_freed_memory()  # before the first large tensor
    install_signal_handlers(f"nla {args.command}")  # SIGINT and SIGTERM unwind the stage, then exit 130 / 143
    try:
        _relaunch(args, argv)
        if args.command == "explain":
            _explain(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "profile":
            _profile(args)
        elif args.command == "convert":
            _convert(args)
        elif args.command == "plan":
            _plan(args)
        else:
            cfg = load_config(args.params, args.profile, allow_empty=args.defaults)
            _run_stage(cfg, args)
    except NLAError as err:
        print(f"nla {args.command}: error: {err}", file=sys.stderr)
        return 2
    except DistributedFailure as err:
        print(f"nla {args.command}: error: {err}; rerun the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # `Interrupted` (SIGINT, SIGTERM) or a KeyboardInterrupt from elsewhere
        exit_interrupted(f"nla {args.command}", getattr(err, "signum", signal.SIGINT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
