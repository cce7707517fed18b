"""fp32 vs bf16 autocast, per stage: speed (bf16 / fp32) and what the precision does to the loss and FVE.

The stages train and decode with fp32 weights under bf16 autocast where the CPU has bf16
matrix instructions (`model.autocast: auto`, `nla.models.resolve_autocast`). This benchmark
runs every stage's own code twice in one process, with `model.autocast: off` (fp32) and
`bfloat16`, on the same real rows (a small corpus of the embedded documents, extracted in
fp32 and labeled by the grounded labeler, built in a temporary folder with the stage
functions), with the same seeds, rows and steps. Rounds alternate (fp32 bf16 fp32 bf16 ...)
so a drifting machine load favours neither side; speeds are medians over the rounds. A
training stage runs three times instead: fp32, bf16, fp32 with the next seed (`training_runs`).

- extract: `extract_shard` (with the top-next-token pass the grounded labeler needs),
  tokens/s; check: cosine of the bf16 vectors to the fp32 ones, same top-1 next token.
- av_sft: `run_av_sft` for k steps, steps/min of its training loop; the training loss at step
  k (the same batch on both sides) and the held-out completion loss of each trained AV,
  both evaluated in fp32 (`AV.completion_loss`), so the difference is the training's.
- ar_sft: `run_ar_sft` for k steps (gold labels only), steps/min; the held-out FVE of each
  trained AR, evaluated in fp32: the FVE effect of training precision.
- rl: one `rl_step` from the bf16-trained SFT pair (trainable weights, optimizer state and
  RNG restored before every call, so each call does the same step); steps/min.
- evaluate: `AV.generate` (greedy, the loaded, merged AV) tokens/s and `AR.reconstruct`
  rows/s of the bf16-trained pair; the FVE of the same AR on the gold labels and on the AV's
  explanations, decoded and read in fp32 vs bf16: the inference precision effect.

The effects table puts bf16 − fp32 next to (fp32, next seed) − fp32: a training precision
effect smaller than the seed's is noise. A rerun with the same seed gives the same numbers
(CPU training is deterministic for a fixed thread count).

    python benchmarks/bench_precision.py                       # ~9 min on 2 cores
    python benchmarks/bench_precision.py --size tiny           # ~2 min: a smoke run
    python benchmarks/bench_precision.py --results benchmarks/results-cpu.md   # + its section there
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import pandas as pd
import torch
from common import Result, device_label, environment, nla_config, parser, replace_section, setup, table

from nla.ar import load_ar
from nla.ar_sft import run_ar_sft
from nla.av import load_av
from nla.av_sft import run_av_sft
from nla.config import NLAConfig
from nla.corpus import run_corpus
from nla.data import labeled_rows, vectors_of
from nla.extract import extract_shard, run_extract, run_split
from nla.io import atomic_write_text, read_table
from nla.label.stage import run_label
from nla.metrics import cosine, fve_nrm
from nla.models import autocast, cpu_supports_bf16, load_model, release_memory
from nla.rl import reference_log_probs, rl_step

PRECISIONS = {"fp32": "off", "bf16": "bfloat16"}  # side -> model.autocast
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}  # side -> the dtype of an `autocast` region
SECTION = "Precision: fp32 vs bf16 autocast (bench_precision.py)"


@dataclass(frozen=True)
class PrecisionSize:
    """The workload: corpus and rows, steps per training stage, RL and evaluate shapes.

    `rounds`: timed calls per side of extract, rl and evaluate (training stages: `training_runs`).
    """

    docs: int
    max_tokens: int
    positions_per_doc: int
    extract_docs: int
    av_steps: int
    av_batch: int
    ar_steps: int
    ar_batch: int
    rl_prompts: int
    rl_group: int
    rl_new_tokens: int
    eval_rows: int
    eval_new_tokens: int
    rounds: int


SIZES = {
    "tiny": PrecisionSize(
        docs=16,
        max_tokens=48,
        positions_per_doc=3,
        extract_docs=8,
        av_steps=2,
        av_batch=4,
        ar_steps=2,
        ar_batch=4,
        rl_prompts=2,
        rl_group=2,
        rl_new_tokens=8,
        eval_rows=8,
        eval_new_tokens=8,
        rounds=1,
    ),
    # the 2-core CPU machines: about 9 minutes. The AR needs ~80 steps to beat the mean (FVE > 0) on these rows.
    "small": PrecisionSize(
        docs=72,
        max_tokens=96,
        positions_per_doc=6,
        extract_docs=32,
        av_steps=10,
        av_batch=4,
        ar_steps=80,
        ar_batch=4,
        rl_prompts=2,
        rl_group=4,
        rl_new_tokens=24,
        eval_rows=16,
        eval_new_tokens=24,
        rounds=2,
    ),
}


@dataclass
class Effect:
    """What the precision does to one quality number: both values, and fp32 with another seed where it means something."""

    stage: str
    metric: str
    fp32: float
    bf16: float
    other_seed: float | None = None  # fp32 again with the next seed: the training noise to read bf16 - fp32 against

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def alternate(sides: dict[str, Callable[[], tuple[float, Any]]], rounds: int) -> dict[str, list[tuple[float, Any]]]:
    """Call each side `rounds` times, interleaved (A B A B ...); each call returns (its seconds, its output)."""
    runs: dict[str, list[tuple[float, Any]]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            runs[name].append(fn())
    return runs


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def with_autocast(cfg: NLAConfig, side: str) -> NLAConfig:
    out = cfg.model_copy(deep=True)
    out.model.autocast = PRECISIONS[side]
    return out


def speed_result(stage: str, config: str, unit: str, work: float, runs: dict, check: str, scale: float = 1.0) -> Result:
    """A result row: ours = bf16, baseline = fp32, `work / median seconds` (× `scale`) each."""
    fp32, bf16 = (work * scale / median(s for s, _ in runs[side]) for side in ("fp32", "bf16"))
    return Result(f"precision: {stage}", config, unit, bf16, fp32, "bf16 autocast", "fp32", check=check)


# ----------------------------------------------------------------------------- the rows


def base_config(args, size: PrecisionSize) -> NLAConfig:
    cfg = nla_config(args)
    cfg.model.autocast = "off"  # the data itself: fp32 activations, whatever the CPU
    cfg.corpus = cfg.corpus.model_copy(
        update={"source": args.corpus or "embedded", "max_docs": size.docs, "foreign": {}}
    )
    cfg.extract.max_tokens, cfg.extract.positions_per_doc = size.max_tokens, size.positions_per_doc
    cfg.split.fractions = {"av_sft": 0.45, "ar_sft": 0.3, "rl": 0.05, "eval": 0.2}
    cfg.label.backend, cfg.label.splits = "grounded", ["av_sft", "ar_sft", "eval"]
    cfg.av_sft.max_steps, cfg.av_sft.batch_size, cfg.av_sft.save_steps = size.av_steps, size.av_batch, 0
    cfg.ar_sft.max_steps, cfg.ar_sft.batch_size, cfg.ar_sft.av_explanations = size.ar_steps, size.ar_batch, 0
    cfg.ar_sft.checkpoint_every = size.ar_steps + 1  # no mid-run checkpoint inside the timed loop
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.max_new_tokens = (
        size.rl_prompts,
        size.rl_group,
        size.rl_new_tokens,
    )
    cfg.evaluate.max_new_tokens = size.eval_new_tokens
    return cfg


def build_rows(cfg: NLAConfig, root: Path) -> dict[str, Path]:
    """corpus → extract (fp32) → split → grounded labels, with the stage functions, under `root`."""
    paths = {k: root / k for k in ("act", "split", "labels")} | {"docs": root / "documents.parquet"}
    run_corpus(cfg.corpus, paths["docs"])
    run_extract(cfg, paths["docs"], paths["act"], root / "work" / "extract", provenance_path=root / "p_extract.json")
    run_split(cfg, paths["act"], paths["split"], paths["docs"])
    run_label(cfg, paths["act"], paths["split"], paths["labels"], provenance_path=root / "p_label.json")
    return paths


# ----------------------------------------------------------------------------- the stages


def both(fn: Callable[[str], tuple[float, Any]]) -> dict[str, Callable[[], tuple[float, Any]]]:
    return {side: partial(fn, side) for side in PRECISIONS}


def warm_up(sides: dict[str, Callable[[], Any]]) -> None:
    """One untimed call per side: oneDNN picks its kernels per dtype and shape on the first call."""
    for fn in sides.values():
        fn()


def bench_extract(cfg: NLAConfig, size: PrecisionSize, docs: pd.DataFrame) -> list[Result]:
    """`extract_shard` on the first documents with one loaded model, per side."""
    model, tokenizer, _ = load_model(cfg.model)
    docs = docs.head(size.extract_docs)
    encoded = tokenizer(list(docs.text), truncation=True, max_length=cfg.extract.max_tokens)["input_ids"]
    n_tokens = sum(len(ids) for ids in encoded)
    configs = {side: with_autocast(cfg, side) for side in PRECISIONS}

    def extract(side: str) -> tuple[float, pd.DataFrame]:
        return timed(lambda: extract_shard(model, tokenizer, docs, configs[side]))

    sides = both(extract)
    warm_up(sides)
    runs = alternate(sides, size.rounds)
    fp32, bf16 = runs["fp32"][-1][1], runs["bf16"][-1][1]
    cos = cosine(torch.from_numpy(vectors_of(bf16)), torch.from_numpy(vectors_of(fp32)))
    top1 = float(np.mean([a[0] == b[0] for a, b in zip(fp32.next_tokens, bf16.next_tokens, strict=True)]))
    config = (
        f"{len(docs)} docs, {n_tokens} tokens (max {cfg.extract.max_tokens}), batch {cfg.extract.batch_size}, "
        f"layer {cfg.model.layer}, top_next {cfg.extract.top_next}"
    )
    check = (
        f"cos(bf16, fp32 vectors) mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}; same top-1 next {top1:.0%}"
    )
    return [speed_result("extract", config, "tokens/s", n_tokens, runs, check)]


def heldout(paths: dict[str, Path], cfg: NLAConfig) -> pd.DataFrame:
    rows = labeled_rows(paths["act"], paths["split"], paths["labels"], ["eval"], layer=cfg.model.layer)
    return rows.sort_values("row_id").reset_index(drop=True)


def training_runs(cfg: NLAConfig, fit: Callable[[NLAConfig, str], tuple[float, dict]]) -> dict[str, list]:
    """`fit(config, run name)` three times: fp32, bf16 (same seed), fp32 with the next seed.

    The third run serves twice. Its distance from the first is the training noise a precision
    effect has to be read against (a run of a few steps moves with its seed: LoRA init, batch
    order). And its time brackets the bf16 run with two fp32 ones (A B A), so a drifting load
    favours neither side, at the cost of three runs instead of four; the same work per step
    up to the batches drawn. Returns {"fp32": [seed s, seed s+1], "bf16": [seed s]}.
    """
    reseeded = with_autocast(cfg, "fp32")
    reseeded.av_sft.seed, reseeded.ar_sft.seed = cfg.av_sft.seed + 1, cfg.ar_sft.seed + 1
    first, bf16 = fit(with_autocast(cfg, "fp32"), "fp32"), fit(with_autocast(cfg, "bf16"), "bf16")
    return {"fp32": [first, fit(reseeded, "fp32_seed")], "bf16": [bf16]}


def train_stage(run_stage, cfg: NLAConfig, paths: dict[str, Path], out: Path, seconds_key: str) -> tuple[dict, float]:
    """One SFT stage (`run_av_sft` or `run_ar_sft`) into `out`, its work and provenance beside it: (metrics, seconds)."""
    provenance = out.with_name(f"{out.name}_provenance.json")
    metrics = run_stage(
        cfg,
        paths["act"],
        paths["split"],
        paths["labels"],
        out,
        work_dir=out.parent / "work" / out.name,
        provenance_path=provenance,
    )
    return metrics, json.loads(provenance.read_text())[seconds_key]


def bench_av_sft(cfg: NLAConfig, size: PrecisionSize, paths: dict[str, Path], root: Path, held: pd.DataFrame):
    """k steps of `run_av_sft` per side; held-out completion loss of each AV in fp32. Returns (rows, effects, av dirs)."""
    vectors, texts = torch.from_numpy(vectors_of(held)), held.explanation.tolist()

    def fit(run_cfg: NLAConfig, name: str) -> tuple[float, dict]:
        out = root / f"av_{name}"
        metrics, seconds = train_stage(run_av_sft, run_cfg, paths, out, "train_seconds")
        av = load_av(out)  # fp32 inference: the loss difference is the training's
        heldout_loss = av.completion_loss(vectors, texts)
        release_memory()
        return seconds, {**metrics, "heldout_loss": heldout_loss, "dir": out}

    runs = training_runs(cfg, fit)
    config = (
        f"{size.av_steps} steps, batch {size.av_batch}, {runs['fp32'][0][1]['rows']} rows, LoRA r={cfg.av_sft.lora.r}"
    )
    effects = [
        Effect("av_sft", f"train loss at step {size.av_steps} (same batch)", *_pair(runs, "loss_last", reseeded=False)),
        Effect(
            "av_sft",
            f"held-out completion loss, {len(held)} rows, fp32 eval",
            *_pair(runs, "heldout_loss"),
        ),
    ]
    check = _effects_check(effects, ("loss@k", "held-out loss"))
    result = speed_result("av_sft", config, "steps/min", size.av_steps, runs, check, scale=60.0)
    return [result], effects, {side: runs[side][0][1]["dir"] for side in PRECISIONS}


def bench_ar_sft(cfg: NLAConfig, size: PrecisionSize, paths: dict[str, Path], root: Path, held: pd.DataFrame):
    """k steps of `run_ar_sft` per side; held-out FVE of each AR in fp32. Returns (rows, effects, ar dirs)."""
    targets, texts = torch.from_numpy(vectors_of(held)), held.explanation.tolist()

    def fit(run_cfg: NLAConfig, name: str) -> tuple[float, dict]:
        out = root / f"ar_{name}"
        metrics, seconds = train_stage(run_ar_sft, run_cfg, paths, out, "ar_sft_seconds")
        ar = load_ar(out)
        fve = fve_nrm(ar.reconstruct(texts, cfg.evaluate.batch_size), targets, ar.mean_unit)  # outside autocast: fp32
        loss_last = float(pd.read_csv(root / f"{out.name}_loss.csv").loss.iloc[-1])
        release_memory()
        return seconds, {**metrics, "loss_last": loss_last, "fve": fve, "dir": out}

    runs = training_runs(cfg, fit)
    n_rows = runs["fp32"][0][1]["ar_sft_rows"]
    config = f"{size.ar_steps} steps, batch {size.ar_batch}, {n_rows} rows (gold labels), LoRA r={cfg.ar_sft.lora.r}"
    effects = [
        Effect("ar_sft", f"train loss at step {size.ar_steps} (same batch)", *_pair(runs, "loss_last", reseeded=False)),
        Effect("ar_sft", f"held-out FVE, {len(held)} rows, fp32 eval", *_pair(runs, "fve")),
    ]
    check = _effects_check(effects, ("loss@k", "held-out FVE"))
    result = speed_result("ar_sft", config, "steps/min", size.ar_steps, runs, check, scale=60.0)
    return [result], effects, {side: runs[side][0][1]["dir"] for side in PRECISIONS}


def _pair(runs: dict, key: str, reseeded: bool = True) -> tuple[float, float, float | None]:
    """(fp32, bf16, fp32 with the next seed or None) of one metric of `training_runs`."""
    other = float(runs["fp32"][1][1][key]) if reseeded else None  # None: another seed draws another batch
    return float(runs["fp32"][0][1][key]), float(runs["bf16"][0][1][key]), other


def _effects_check(effects: list[Effect], names: tuple[str, ...]) -> str:
    return "; ".join(
        f"{name} {e.fp32:.4f} / {e.bf16:.4f} (Δ {e.bf16 - e.fp32:+.4f})" for name, e in zip(names, effects, strict=True)
    )


def bench_rl(cfg: NLAConfig, size: PrecisionSize, av_dir: Path, ar_dir: Path, vectors: torch.Tensor) -> list[Result]:
    """One `rl_step` per call from the same state: trainable weights, optimizer state and RNG restored first."""
    rl = cfg.rl
    av = load_av(av_dir, layer=cfg.model.layer, trainable=True)
    ar = load_ar(ar_dir)
    ref = reference_log_probs(av, av_dir, rl.temperature)
    av_params = [p for p in av.model.parameters() if p.requires_grad]
    av_opt = torch.optim.AdamW(av_params, lr=rl.actor_learning_rate, weight_decay=0.0)
    ar_opt = torch.optim.AdamW(ar.parameters_to_train(), lr=rl.ar_learning_rate, weight_decay=0.0)
    batch = vectors[: size.rl_prompts]
    params = av_params + ar.parameters_to_train()
    start = [p.detach().clone() for p in params]
    opt_start = [copy.deepcopy(opt.state_dict()) for opt in (av_opt, ar_opt)]

    def step(side: str) -> tuple[float, dict]:
        with torch.no_grad():
            for p, saved in zip(params, start, strict=True):
                p.copy_(saved)
        for opt, saved in zip((av_opt, ar_opt), opt_start, strict=True):
            opt.load_state_dict(copy.deepcopy(saved))
        torch.manual_seed(rl.seed)
        with autocast(av.device, AUTOCAST[side]):
            return timed(lambda: rl_step(av, ref, ar, batch, rl, av_opt, ar_opt, ar.mean_unit))

    sides = both(step)
    warm_up(sides)  # also builds the merged copy and its decoder
    runs = alternate(sides, size.rounds)
    lens = {side: np.mean([out["len_mean"] for _, out in runs[side]]) for side in PRECISIONS}
    config = (
        f"{size.rl_prompts} prompts x {size.rl_group} samples x <={size.rl_new_tokens} tokens, "
        f"LoRA r={cfg.av_sft.lora.r}"
    )
    check = f"mean length fp32 {lens['fp32']:.1f} / bf16 {lens['bf16']:.1f} tokens"
    return [speed_result("rl step", config, "steps/min", 1.0, runs, check, scale=60.0)]


def bench_evaluate(
    cfg: NLAConfig, size: PrecisionSize, av_dir: Path, ar_dir: Path, held: pd.DataFrame
) -> tuple[list[Result], list[Effect]]:
    """AV.generate tokens/s and AR.reconstruct rows/s of one trained pair, and its FVE read in each precision."""
    ev = cfg.evaluate
    decoded = held.head(size.eval_rows)  # decoding is the slow part: fewer rows than the AR reads
    vectors = torch.from_numpy(vectors_of(decoded))
    targets, gold = torch.from_numpy(vectors_of(held)), held.explanation.tolist()
    av = load_av(av_dir, layer=cfg.model.layer)

    def generate(side: str) -> tuple[float, list]:
        with autocast(av.device, AUTOCAST[side]):
            return timed(lambda: av.generate(vectors, ev.max_new_tokens, 0.0, ev.batch_size))

    warm_up(both(generate))
    gen_runs = alternate(both(generate), size.rounds)
    av = None  # one model at a time: the AV goes before the AR loads
    release_memory()
    explanations = {side: gen_runs[side][-1][1] for side in PRECISIONS}
    texts = {side: [e.text for e in explanations[side]] for side in PRECISIONS}
    same = float(np.mean([a == b for a, b in zip(texts["fp32"], texts["bf16"], strict=True)]))

    ar = load_ar(ar_dir)

    def reconstruct(side: str, what: list[str] = gold) -> tuple[float, torch.Tensor]:
        with autocast(ar.device, AUTOCAST[side]):
            return timed(lambda: ar.reconstruct(what, ev.batch_size))

    warm_up(both(reconstruct))
    rec_runs = alternate(both(reconstruct), size.rounds)
    fve_gold = {side: fve_nrm(rec_runs[side][0][1], targets, ar.mean_unit) for side in PRECISIONS}
    # the round trip: each side reads its own explanations, in its own precision
    fve_trip = {side: fve_nrm(reconstruct(side, texts[side])[1], vectors, ar.mean_unit) for side in PRECISIONS}

    # generated tokens per second: each side's own count (greedy texts may differ in length)
    fp32_tps, bf16_tps = (
        sum(len(e.token_ids) for e in explanations[s]) / median(t for t, _ in gen_runs[s]) for s in ("fp32", "bf16")
    )
    gen = Result(
        "precision: evaluate AV.generate",
        f"{len(decoded)} rows x <={ev.max_new_tokens} new tokens, batch {ev.batch_size}, greedy",
        "tokens/s",
        bf16_tps,
        fp32_tps,
        "bf16 autocast",
        "fp32",
        check=f"same greedy text {same:.0%}; round-trip FVE {fve_trip['fp32']:.4f} / {fve_trip['bf16']:.4f} "
        f"(Δ {fve_trip['bf16'] - fve_trip['fp32']:+.4f})",
    )
    rec = speed_result(
        "evaluate AR.reconstruct",
        f"{len(held)} gold labels, batch {ev.batch_size}",
        "rows/s",
        len(held),
        rec_runs,
        f"FVE {fve_gold['fp32']:.4f} / {fve_gold['bf16']:.4f} (Δ {fve_gold['bf16'] - fve_gold['fp32']:+.4f})",
    )
    effects = [
        Effect(
            "evaluate", f"AR FVE, {len(held)} gold labels (one AR, read in each)", fve_gold["fp32"], fve_gold["bf16"]
        ),
        Effect(
            "evaluate",
            f"round-trip FVE, {len(decoded)} rows (AV decodes, AR reads)",
            fve_trip["fp32"],
            fve_trip["bf16"],
        ),
    ]
    return [gen, rec], effects


# ----------------------------------------------------------------------------- report


def effects_table(effects: list[Effect]) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "| stage | metric | fp32 | bf16 | bf16 − fp32 | fp32 other seed − fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for e in effects:
        seed = None if e.other_seed is None else e.other_seed - e.fp32
        lines.append(
            f"| {e.stage} | {e.metric} | {e.fp32:.4f} | {e.bf16:.4f} | {e.bf16 - e.fp32:+.4f} | {num(seed, '+.4f')} |"
        )
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run(args, size: PrecisionSize) -> tuple[list[Result], list[Effect], dict[str, Any]]:
    """Build the rows, then every stage in turn; returns (speed rows, effects, run facts)."""
    cfg = base_config(args, size)
    facts: dict[str, Any] = {"load_start": loadavg(), "cpu_bf16": cpu_supports_bf16()}
    started = time.perf_counter()
    results: list[Result] = []
    effects: list[Effect] = []

    def stage(name: str, fn: Callable[[], tuple[list[Result], list[Effect], Any]]) -> Any:
        t0 = time.perf_counter()
        rows, found, out = fn()
        release_memory()  # the stage's models
        results.extend(rows)
        effects.extend(found)
        facts[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        print(table(rows), f"\n({facts[f'{name}_seconds']:.0f} s)", flush=True)
        return out

    with tempfile.TemporaryDirectory(prefix="nla-precision-") as tmp:
        root = Path(tmp)
        paths = build_rows(cfg, root)
        held = heldout(paths, cfg)
        facts["setup_seconds"], facts["heldout_rows"] = round(time.perf_counter() - started, 1), len(held)
        docs = read_table(paths["docs"])
        stage("extract", lambda: (bench_extract(cfg, size, docs), [], None))
        av_dirs = stage("av_sft", lambda: bench_av_sft(cfg, size, paths, root, held))
        ar_dirs = stage("ar_sft", lambda: bench_ar_sft(cfg, size, paths, root, held))
        # the pipeline's default pair (trained under bf16 autocast) for RL and evaluate
        vectors = torch.from_numpy(vectors_of(held))  # real vectors; the step's work does not depend on which
        stage("rl", lambda: (bench_rl(cfg, size, av_dirs["bf16"], ar_dirs["bf16"], vectors), [], None))
        stage("evaluate", lambda: (*bench_evaluate(cfg, size, av_dirs["bf16"], ar_dirs["bf16"], held), None))
    facts |= {"total_seconds": round(time.perf_counter() - started, 1), "load_end": loadavg()}
    return results, effects, facts


def report(args, results: list[Result], effects: list[Effect], facts: dict[str, Any]) -> str:
    env = environment()
    lines = [
        f"- command: `python {shlex.join(['benchmarks/bench_precision.py', *sys.argv[1:]])}`",
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {device_label(torch.device('cpu'))}; "
        f"bf16 instructions: {'yes' if facts['cpu_bf16'] else 'no'}; size `{args.size}`; model `{args.model}`; "
        f"torch {env['torch']}, transformers {env['transformers']}",
        f"- load average (1, 5, 15 min) at the start {facts['load_start']}, at the end {facts['load_end']}; "
        f"total {facts['total_seconds']:.0f} s (rows built in {facts['setup_seconds']:.0f} s)",
        "- ratio = bf16 / fp32 speed, both measured in this run with rounds alternating (training stages: fp32, "
        "bf16, fp32 with the next seed); "
        "'ours' is bf16 autocast, 'baseline' fp32 (`model.autocast: off`).",
        "",
        table(results),
        "",
        "What the precision does to the numbers (same seed, rows and steps; training effects evaluated in fp32):",
        "",
        effects_table(effects),
        "",
        "<details><summary>JSON lines</summary>",
        "",
        "```json",
        *[json.dumps(r.to_dict()) for r in results],
        *[json.dumps(e.to_dict()) for e in effects],
        json.dumps(facts),
        "```",
        "</details>",
    ]
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.splitlines()[0], sizes=SIZES, default_size="small")
    p.add_argument("--results", default=None, help=f"also write the report as the section '{SECTION}' of this file")
    args = p.parse_args()
    setup(args)
    results, effects, facts = run(args, SIZES[args.size])
    text = report(args, results, effects, facts)
    print(text)
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r.to_dict()) + "\n" for r in results))
    if args.results:
        replace_section(args.results, SECTION, text)
        print(f"wrote the section '{SECTION}' of {args.results}")


if __name__ == "__main__":
    main()
