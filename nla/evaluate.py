"""The evaluate stage: FVE of the AR and of the AV→AR round trip against honest controls.

Two evaluation sets, each scored the same way:

* ``eval``: the held-out split of the training corpus (documents no stage trained on);
* ``foreign`` (metric keys end in ``_foreign``): documents of another corpus (`corpus.foreign`),
  which no stage trains on and whose text shares no long n-gram with the training corpus.

Every series is a per-row mse_nrm (`nla.metrics`), turned into FVE with the reference ū of the
AR-SFT's training rows and the set's own mean ‖u − ū‖², with a 95% bootstrap interval over
documents (`_lo`, `_hi`). Series:

    ar_gold        the AR reading the gold (warm-start) label
    roundtrip_sft  AR_sft(AV_sft(v));  roundtrip_rl: AR_rl(AV_rl(v)), ar_gold_rl: AR_rl on gold
    controls, all read by AR_sft; a useful NLA must beat all but no_context, an upper reference:
      shuffled     another row's gold label          empty       the empty explanation
      mean         predict ū (FVE 0 by construction) const       the best constant direction ū/‖ū‖
      copy         the label's lines read off the text (context lines, final token): no AV, no model
      final_only   only the last line of the gold label: the final-token feature, which names the
                   token alone (what knowing the token gives)
      no_context   the gold label without its context lines (Topic, Before): the final token and
                   the subject model's own next-token predictions, exactly
      untrained    the base model with injection and no fine-tuning, as the AV
    gain_roundtrip_rl_vs_<control>: the RL round trip's FVE minus the control's on the same rows,
    with a paired interval (the same documents drawn for both: `nla.metrics.bootstrap_gain`)

Collapse diagnostics per AV and set: the share of distinct explanations, the share of the
explanations' content words that occur in the context, and the share of the most frequent
explanation (its text goes to the report), and `token_match`: the share of rows whose explanation names the
gold label's final token. Per feature (`feature<i>_distinct`, `feature<i>_recall`): line i of the
explanation against line i of the gold label, so a collapsed topic line shows even when the whole
explanations differ (`feature_stats`). All figures go to one flat metrics JSON; the
report (`samples_path`) shows them as tables, then samples.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

import nla.distributed as distributed
from nla.ar import AR, MEAN_UNIT_FILE, load_ar
from nla.av import base_av, load_av
from nla.config import LabelConfig, NLAConfig
from nla.data import FOREIGN, labeled_rows, vectors_of
from nla.errors import NLAError
from nla.io import atomic_path, atomic_write_text, check_weight_files, write_json
from nla.label.backends.baseline import BEFORE, STOPWORDS, TOPIC, context_features
from nla.label.backends.grounded import final_feature
from nla.label.parse import FEATURE_SEP
from nla.label.prompt import context_of
from nla.metrics import bootstrap_fve, bootstrap_gain, derangement, mse_nrm, unit
from nla.models import autocast, release_memory, resolve_autocast, resolve_device, resolve_dtype
from nla.provenance import beside, write_provenance
from nla.sidecar import read_sidecar, require

REQUIRED_CHECKPOINTS = ("av_sft", "ar_sft")
SETS = {"": "eval", "_foreign": FOREIGN}  # metric-key suffix -> split
CONTROLS = ("shuffled", "empty", "mean", "const", "copy", "final_only", "no_context", "untrained")
# (series, control): the round trip's FVE gain over the control on the same rows, with a paired interval
GAINS = (("roundtrip_rl", "final_only"), ("roundtrip_rl", "copy"), ("roundtrip_rl", "no_context"))
# What `dvc metrics show` lists for evaluate (short name -> key of the full metrics): the round trips and
# the two strongest controls, few enough that the whole table fits 160 columns. Every number, these
# included, goes to the details file under its full name.
HEADLINE = {
    "fve_rl_foreign": "fve_roundtrip_rl_foreign",
    "fve_sft_foreign": "fve_roundtrip_sft_foreign",
    "fve_copy_foreign": "fve_copy_foreign",
    "fve_final_foreign": "fve_final_only_foreign",
    "fve_rl": "fve_roundtrip_rl",
    "fve_sft": "fve_roundtrip_sft",
}
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_LINE_WORD = re.compile(r"\w[\w'-]*")  # words, numbers and tokens such as "2000" or "u.s"
_SENTENCE_BREAK = re.compile(r"(?<=\.)\s+(?=[A-Z])")  # between features an AV wrote on one line
_FINAL_TOKEN = re.compile(r'Final token:? ("(?:[^"\\]|\\.)*")')  # the token named by the final feature, quoted
# Words of the label format itself, not of what it describes.
FORMAT_WORDS = frozenset(
    [
        "topic",
        "before",
        "final",
        "token",
        "next",
        "likely",
        "start",
        "word",
        "middle",
        "number",
        "punctuation",
        "none",
        "yet",
    ]
)
T = TypeVar("T")


def position_bucket(position: int) -> tuple[int, int]:
    """Power-of-two buckets of the token position: [0, 8), [8, 16), [16, 32), …"""
    if position < 8:
        return 0, 8
    low = 1 << (int(position).bit_length() - 1)
    return low, 2 * low


def _checkpoint(checkpoints: dict[str, str | Path | None], key: str) -> Path | None:
    path = checkpoints.get(key)
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        raise NLAError(f"checkpoint {key}={path} does not exist; train it first or leave it out")
    return path


def _check_pair(meta: dict, data_meta: dict, where: Path) -> None:
    """The checkpoint was trained on activations like these (same base model, width and layer)."""
    require(
        meta,
        where=str(where),
        fingerprint=data_meta.get("base_model_fingerprint"),
        d_model=data_meta.get("d_model"),
        layer=data_meta.get("layer"),
    )


def length_stats(token_counts: list[int], prefix: str, closed: list[bool] | None = None) -> dict[str, float]:
    counts = np.asarray(token_counts, dtype=float)
    stats = {
        f"{prefix}_tokens_mean": float(counts.mean()),
        f"{prefix}_tokens_median": float(np.median(counts)),
        f"{prefix}_tokens_max": float(counts.max()),
    }
    if closed is not None:
        stats[f"{prefix}_closed_frac"] = float(np.mean(closed))
    return stats


def by_batches(n: int, batches: list[np.ndarray], run: Callable[[np.ndarray], Sequence[T]]) -> list[T]:
    """`run(rows)` for this rank's dealt `batches` (all of them in one process), merged back into row order.

    Each call of `run` sees whole batches, exactly the batches one process forms, so every
    result is the one-process result to the last bit, whatever the number of processes.
    """
    mine = distributed.deal(batches)
    rows = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    out: list[T | None] = [None] * n
    for i, value in zip(rows.tolist(), run(rows) if len(rows) else [], strict=True):
        out[i] = value
    return distributed.merge(out)  # type: ignore[return-value]


def reconstruct(ar: AR, texts: list[str], batch_size: int, progress: bool = False) -> torch.Tensor:
    """`ar.reconstruct(texts)`, its length-sorted batches shared out over the processes of a launch: (n, d)."""
    order = np.argsort([len(ar.prompt_ids(t)) for t in texts], kind="stable")  # the batches reconstruct forms
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rows = by_batches(len(texts), batches, lambda r: list(ar.reconstruct([texts[i] for i in r], batch_size, progress)))
    return torch.stack(rows) if rows else torch.zeros(0, ar.d)


def explain(av, targets: torch.Tensor, max_new_tokens: int, batch_size: int) -> list:
    """Greedy `av.generate(targets)`, its consecutive batches shared out over the processes of a launch."""
    batches = [np.arange(i, min(i + batch_size, len(targets))) for i in range(0, len(targets), batch_size)]
    return by_batches(
        len(targets),
        batches,
        lambda r: av.generate(targets[torch.as_tensor(r)], max_new_tokens, temperature=0.0, batch_size=batch_size),
    )


def eval_rows(activations_dir, splits_dir, labels_dir, split: str, max_rows: int) -> pd.DataFrame:
    """The labeled rows of `split`, capped at `max_rows` by a fixed-seed sample (same rows every run)."""
    rows = labeled_rows(activations_dir, splits_dir, labels_dir, [split])
    if len(rows) > max_rows:
        rows = rows.sample(n=max_rows, random_state=0).sort_index()
    return rows.reset_index(drop=True)


def _foreign_rows(activations_dir, splits_dir, labels_dir, max_rows: int) -> pd.DataFrame | None:
    """The foreign set's labeled rows, or None when the corpus has none (no `corpus.foreign`)."""
    try:
        return eval_rows(activations_dir, splits_dir, labels_dir, FOREIGN, max_rows)
    except NLAError:  # no labeled foreign rows: the set is simply absent
        return None


def copy_of_context(rows: pd.DataFrame, label: LabelConfig) -> list[str]:
    """The label format filled from the context alone: the grounded label's context lines and final token,
    with no AV and no model (its lines read off the text, in the wording the AR was trained on)."""
    return [
        FEATURE_SEP.join(
            [
                *context_features(context_of(prefix, label.context_tokens), label.topic_words, label.before_words),
                final_feature(token),
            ]
        )
        for prefix, token in zip(rows.prefix, rows.token, strict=True)
    ]


def final_line(explanations: list[str]) -> list[str]:
    """Only the last feature of each label: by the label contract, the one about the final token."""
    return [e.split(FEATURE_SEP)[-1] for e in explanations]


def _final_token(explanation: str) -> re.Match | None:
    return _FINAL_TOKEN.search(explanation.split(FEATURE_SEP)[-1])


def named_token(explanation: str) -> str | None:
    """The quoted token that the explanation's final feature names, or None if it names none."""
    found = _final_token(explanation)
    return found.group(1) if found else None


def no_context(explanations: list[str]) -> list[str]:
    """Each label without its context lines (read off the text): what the subject model's own lines give."""
    return [
        FEATURE_SEP.join(line for line in e.split(FEATURE_SEP) if not line.startswith((TOPIC, BEFORE)))
        for e in explanations
    ]


def collapse_stats(texts: list[str], contexts: list[str]) -> tuple[dict[str, float], str]:
    """(distinct share, share of content words found in the context, top explanation's share), and its text."""
    counts = Counter(texts)
    top, top_n = counts.most_common(1)[0]
    found = total = 0
    for text, context in zip(texts, contexts, strict=True):
        seen = {w.lower() for w in _WORD.findall(context)}
        words = [w.lower() for w in _WORD.findall(text)]
        words = [w for w in words if len(w) > 2 and w not in STOPWORDS and w not in FORMAT_WORDS]
        total += len(words)
        found += sum(w in seen for w in words)
    stats = {"distinct": len(counts) / len(texts), "in_context": found / max(total, 1), "top_share": top_n / len(texts)}
    return stats, top


def features_of(text: str) -> list[str]:
    """An explanation's features: its lines, or, when written on one line, its sentences."""
    parts = text.split(FEATURE_SEP) if FEATURE_SEP in text.strip() else _SENTENCE_BREAK.split(text)
    return [p.strip() for p in parts if p.strip()]


def _line_words(line: str) -> set[str]:
    return {w for w in _LINE_WORD.findall(line.lower()) if w not in FORMAT_WORDS}


def label_lines(golds: list[str]) -> int:
    """The number of features the gold labels hold (the most common count)."""
    return Counter(len(features_of(g)) for g in golds).most_common(1)[0][0]


def _paired_line(mine: list[str], i: int, n: int) -> str:
    """The AV's line that pairs with gold line i of n: the last with the last (the final token's), the
    others by position, never reaching the AV's last line; "" where the AV wrote too few."""
    if i == n - 1:
        return mine[-1] if mine else ""
    return mine[i] if i < len(mine) - 1 else ""


def feature_stats(texts: list[str], golds: list[str]) -> dict[str, float]:
    """Per feature of the label (`feature<i>_`, 1-based; the last one is the final token's): the share of
    distinct lines the AV wrote there, and `recall`, the mean share of the gold line's words that the AV's
    line holds. Lines pair up by position, the last with the last (the label contract puts the final
    token there), so a wrong topic line and a right final-token line tell apart."""
    n = label_lines(golds)
    lines: list[list[str]] = [[] for _ in range(n)]
    recall: list[list[float]] = [[] for _ in range(n)]
    for text, gold in zip(texts, golds, strict=True):
        mine, theirs = features_of(text), features_of(gold)
        if len(theirs) != n:
            continue
        for i in range(n):
            line = _paired_line(mine, i, n)
            lines[i].append(line)
            if gold_words := _line_words(theirs[i]):
                recall[i].append(len(gold_words & _line_words(line)) / len(gold_words))
    stats = {}
    for i in range(n):
        if lines[i]:
            stats[f"feature{i + 1}_distinct"] = len(set(lines[i])) / len(lines[i])
            stats[f"feature{i + 1}_recall"] = float(np.mean(recall[i])) if recall[i] else 0.0
    return stats


class _Set:
    """One evaluation set: rows, targets, the per-row deviation ‖u − ū‖², and the series scored so far."""

    def __init__(self, rows: pd.DataFrame, mean_unit: torch.Tensor):
        self.rows = rows
        self.targets = torch.from_numpy(vectors_of(rows))  # (n, d)
        self.deviation = (unit(self.targets) - mean_unit).pow(2).sum(-1)  # (n,)
        self.mse: dict[str, torch.Tensor] = {}  # series -> (n,) mse_nrm
        self.gold_token = [named_token(e) for e in rows.explanation]  # the token each gold label ends on
        self.texts: dict[str, list[str]] = {}  # AV name -> explanations
        self.closed: dict[str, list[bool]] = {}  # AV name -> closed before the token cap
        self.tokens: dict[str, list[int]] = {}  # AV name -> generated tokens per row
        self.gold_tokens: list[int] = []  # gold label length in AR tokens

    def score(self, name: str, pred: torch.Tensor, *, normalize: bool = True) -> None:
        self.mse[name] = mse_nrm(pred, self.targets, normalize_pred=normalize)

    def fve(self, name: str, subset: torch.Tensor | None = None) -> float:
        """FVE of a series over all rows, or over the `subset` (bool (n,)) against the whole set's denominator."""
        mse = self.mse[name] if subset is None else self.mse[name][subset]
        return 1 - float(mse.mean()) / float(self.deviation.mean())

    def names_gold_token(self, name: str) -> torch.Tensor:
        """(n,) bool: the AV `name`'s explanation ends on the token the gold label ends on."""
        return torch.tensor(
            [g is not None and g == named_token(t) for g, t in zip(self.gold_token, self.texts[name], strict=True)]
        )

    def row_fve(self, name: str, i: int) -> float:
        return 1 - float(self.mse[name][i]) / float(self.deviation.mean())


def _ar_controls(data: _Set, ar: AR, mean_unit: torch.Tensor, cfg: NLAConfig) -> None:
    """Every series that needs only the AR-SFT: gold, and the controls a useful AV must beat."""
    bs, n = cfg.evaluate.batch_size, len(data.rows)
    gold = data.rows.explanation.tolist()
    data.gold_tokens = [len(ar.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in gold]
    rec_gold = reconstruct(ar, gold, bs, progress=True)
    data.score("ar_gold", rec_gold)
    data.score("shuffled", rec_gold[torch.from_numpy(derangement(n, seed=0))])
    data.score("empty", ar.reconstruct([""]).expand(n, -1))
    data.score("mean", mean_unit.expand(n, -1), normalize=False)
    data.score("const", mean_unit.expand(n, -1))
    data.score("copy", reconstruct(ar, copy_of_context(data.rows, cfg.label), bs))
    data.score("final_only", reconstruct(ar, final_line(gold), bs))
    data.score("no_context", reconstruct(ar, no_context(gold), bs))


def run_evaluate(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    checkpoints: dict[str, str | Path | None],
    metrics_path: str | Path,
    plots_dir: str | Path,
    samples_path: str | Path,
    *,
    details_path: str | Path | None = None,
    rows_path: str | Path | None = None,
    provenance_path: str | Path | None = None,
) -> dict[str, float]:
    """Score every series and control on the held-out and foreign sets; write metrics, plots and the report.

    `checkpoints`: av_sft and ar_sft (required), av_rl and ar_rl (optional, both or neither).
    Models load one at a time. Writes `metrics_path` (the headline, `HEADLINE`), `details_path` (every
    metric returned here, flat JSON; default `<metrics>_details.json`), `rows_path` (optional: one JSON line
    per row, `write_rows`), `plots_dir`/fve_by_checkpoint.csv
    and fve_by_position.csv, `samples_path` (markdown: tables, then samples) and the timing to
    `provenance_path`.
    """
    ev = cfg.evaluate
    start = time.perf_counter()
    missing = [k for k in REQUIRED_CHECKPOINTS if checkpoints.get(k) is None]
    if missing:
        raise NLAError(f"evaluate needs checkpoints {missing}; run av_sft and ar_sft first")
    paths = {k: _checkpoint(checkpoints, k) for k in ("av_sft", "ar_sft", "av_rl", "ar_rl")}
    if (paths["av_rl"] is None) != (paths["ar_rl"] is None):
        raise NLAError("give both av_rl and ar_rl checkpoints (an RL pair) or neither")
    for path in filter(None, paths.values()):  # every checkpoint whole before any work, not after the first pair
        read_sidecar(path)
        check_weight_files(path)
    data_meta = read_sidecar(activations_dir)
    held = eval_rows(activations_dir, splits_dir, labels_dir, "eval", ev.max_rows)
    if len(held) < 2:
        raise NLAError(f"only {len(held)} labeled eval rows; evaluation needs at least 2 (check split/label)")
    foreign = _foreign_rows(activations_dir, splits_dir, labels_dir, ev.max_rows)
    row_sets = {"": held} | ({"_foreign": foreign} if foreign is not None and len(foreign) >= 2 else {})

    # The AR-SFT fixes the FVE reference ū (its training rows) for every number below.
    device = cfg.model.device
    torch_device = resolve_device(device)
    mixed = resolve_autocast(cfg.model.autocast, torch_device, resolve_dtype(cfg.model.dtype, torch_device))
    with autocast(torch_device, mixed):
        sets = _score_all(cfg, paths, row_sets, data_meta, device)
    metrics, top_texts = _metrics(sets, cfg)
    metrics_path = Path(metrics_path)
    if distributed.is_main():  # every rank holds the same numbers; one writes them
        write_json(metrics_path, {short: metrics[key] for short, key in HEADLINE.items() if key in metrics})
        write_json(details_path or metrics_path.with_name(f"{metrics_path.stem}_details.json"), metrics)
        if rows_path is not None:
            write_rows(Path(rows_path), sets)
        write_provenance(provenance_path or beside(metrics_path), "evaluate", eval_seconds=time.perf_counter() - start)
        _write_plots(Path(plots_dir), sets)
        _write_report(Path(samples_path), sets, metrics, top_texts, ev.n_samples)
    distributed.barrier()
    return metrics


def _score_all(
    cfg: NLAConfig, paths: dict[str, Path | None], row_sets: dict[str, pd.DataFrame], data_meta: dict, device: str
) -> dict[str, _Set]:
    """Load each model once, in turn, and score every series on every set."""
    ev = cfg.evaluate
    ar = load_ar(paths["ar_sft"], device)
    _check_pair(ar.meta, data_meta, paths["ar_sft"])
    if ar.mean_unit is None:
        raise NLAError(f"{paths['ar_sft']} has no {MEAN_UNIT_FILE}; retrain it with `nla ar-sft`")
    mean_unit = ar.mean_unit
    sets = {suffix: _Set(rows, mean_unit) for suffix, rows in row_sets.items()}
    for data in sets.values():
        _ar_controls(data, ar, mean_unit, cfg)

    avs = [("sft", paths["av_sft"]), ("untrained", paths["av_sft"])]
    if paths["av_rl"] is not None:
        avs.append(("rl", paths["av_rl"]))
    for name, av_path in avs:
        av = base_av(av_path, device) if name == "untrained" else load_av(av_path, device)
        _check_pair(av.meta, data_meta, av_path)
        for data in sets.values():
            explanations = explain(av, data.targets, ev.max_new_tokens, ev.batch_size)
            data.texts[name] = [e.text for e in explanations]
            data.closed[name] = [e.closed for e in explanations]
            data.tokens[name] = [len(e.token_ids) for e in explanations]
        del av
        release_memory()
    for data in sets.values():
        data.score("roundtrip_sft", reconstruct(ar, data.texts["sft"], ev.batch_size, progress=True))
        data.score("untrained", reconstruct(ar, data.texts["untrained"], ev.batch_size))
    del ar
    release_memory()
    if paths["ar_rl"] is not None:  # the RL pair brings its own AR
        ar = load_ar(paths["ar_rl"], device)
        _check_pair(ar.meta, data_meta, paths["ar_rl"])
        for data in sets.values():
            data.score("ar_gold_rl", reconstruct(ar, data.rows.explanation.tolist(), ev.batch_size))
            data.score("roundtrip_rl", reconstruct(ar, data.texts["rl"], ev.batch_size, progress=True))
        del ar
        release_memory()
    return sets


def _metrics(sets: dict[str, _Set], cfg: NLAConfig) -> tuple[dict[str, float], dict[str, str]]:
    """The flat metrics dict (keys `<stat>_<series>[_foreign]`), and each AV's most frequent explanation."""
    metrics: dict[str, float] = {}
    top_texts: dict[str, str] = {}
    for suffix, data in sets.items():
        rows = data.rows
        metrics[f"n_rows{suffix}"] = len(rows)
        metrics[f"n_docs{suffix}"] = int(rows.doc_id.nunique())
        metrics[f"fve_denominator{suffix}"] = float(data.deviation.mean())
        metrics |= length_stats(data.gold_tokens, f"gold{suffix}")
        docs = rows.doc_id.to_numpy()
        for name, mse in data.mse.items():
            fve, lo, hi = bootstrap_fve(mse.numpy(), data.deviation.numpy(), docs)
            metrics[f"fve_{name}{suffix}"] = fve
            metrics[f"fve_{name}{suffix}_lo"] = lo
            metrics[f"fve_{name}{suffix}_hi"] = hi
            if name.startswith(("ar_gold", "roundtrip")):
                metrics[f"cos_{name}{suffix}"] = float((1 - mse / 2).mean())  # mse_nrm = 2(1 - cos)
        for name, control in GAINS:
            if name in data.mse and control in data.mse:
                mse, base = data.mse[name].numpy(), data.mse[control].numpy()
                key = f"gain_{name}_vs_{control}{suffix}"
                metrics[key], metrics[f"{key}_lo"], metrics[f"{key}_hi"] = bootstrap_gain(
                    mse, base, data.deviation.numpy(), docs
                )
        contexts = [context_of(p, cfg.label.context_tokens) for p in rows.prefix]
        gold = rows.explanation.tolist()
        for name, texts in data.texts.items():
            stats, top_texts[f"{name}{suffix}"] = collapse_stats(texts, contexts)
            metrics |= {f"{key}_{name}{suffix}": value for key, value in stats.items()}
            metrics |= {f"{key}_{name}{suffix}": v for key, v in feature_stats(texts, gold).items()}
            metrics[f"token_match_{name}{suffix}"] = float(data.names_gold_token(name).float().mean())
            metrics |= length_stats(data.tokens[name], f"expl_{name}{suffix}", data.closed[name])
    return metrics, top_texts


def write_rows(path: Path, sets: dict[str, _Set]) -> None:
    """One JSON line per scored row: its token, gold label, each AV's explanation, and each series'
    mse_nrm with the row's ‖u − ū‖², so any per-row FVE or subset mean can be recomputed from it."""
    lines = []
    for suffix, data in sets.items():
        for i, row in enumerate(data.rows.itertuples()):
            record = {
                "set": SETS[suffix],
                "row_id": row.row_id,
                "token": row.token,
                "gold": row.explanation,
                "explanations": {name: texts[i] for name, texts in data.texts.items()},
                "mse_nrm": {name: round(float(mse[i]), 6) for name, mse in data.mse.items()},
                "deviation": round(float(data.deviation[i]), 6),
            }
            lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
    atomic_write_text(path, "\n".join(lines) + "\n")


def token_breakdown(data: _Set) -> list[tuple[str, float, int, float, float]]:
    """Per AV: (name, share of rows naming the gold final token, those rows' count, their round-trip FVE and
    their final-token-only FVE). Where the round trip loses to the final-token line: on the rows it names
    the token, or on the rows it misses."""
    out = []
    for name in data.texts:
        if name == "untrained":  # free prose: it names no final token
            continue
        named = data.names_gold_token(name)
        for subset, label in ((named, "named"), (~named, "missed")):
            if subset.any():
                share, n = float(subset.float().mean()), int(subset.sum())
                out.append(
                    (
                        f"{name}, token {label}",
                        share,
                        n,
                        data.fve(f"roundtrip_{name}", subset),
                        data.fve("final_only", subset),
                    )
                )
    return out


def _write_plots(plots_dir: Path, sets: dict[str, _Set]) -> None:
    """fve_by_checkpoint.csv (checkpoint, fve: one row per series and set) and fve_by_position.csv (held-out
    set: one row per power-of-two position bucket, x = `position_bucket`, y = `fve` = the last pair's round
    trip, plus one `fve_<series>` column per AR/round-trip series)."""
    by_checkpoint = pd.DataFrame(
        [
            {"checkpoint": name + (" (foreign)" if suffix else ""), "set": SETS[suffix], "fve": data.fve(name)}
            for suffix, data in sets.items()
            for name in data.mse
        ]
    )
    held = sets[""]
    buckets = [position_bucket(p) for p in held.rows.position]
    frame = pd.DataFrame({"position_bucket": [b[0] for b in buckets], "position_end": [b[1] for b in buckets]})
    series = [k for k in held.mse if k.startswith(("ar_gold", "roundtrip"))]
    for key in series:
        frame[f"fve_{key}"] = (1 - held.mse[key] / held.deviation.mean()).numpy()
    frame["fve"] = frame["fve_roundtrip_rl" if "roundtrip_rl" in held.mse else "fve_roundtrip_sft"]
    groups = frame.groupby(["position_bucket", "position_end"])
    by_position = groups.mean().reset_index()
    by_position.insert(2, "n_rows", groups.size().to_numpy())
    labels = [f"{a}-{b - 1}" for a, b in zip(by_position.position_bucket, by_position.position_end, strict=True)]
    by_position.insert(1, "bucket_label", labels)
    for name, table in (("fve_by_checkpoint.csv", by_checkpoint), ("fve_by_position.csv", by_position)):
        with atomic_path(plots_dir / name) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")


def _write_report(
    path: Path, sets: dict[str, _Set], metrics: dict[str, float], top_texts: dict[str, str], n_samples: int
) -> None:
    """Markdown: the FVE table (with 95% CIs) and collapse diagnostics per set, then sample rows."""
    names = [s for s in ("ar_gold", "roundtrip_sft", "roundtrip_rl", "ar_gold_rl", *CONTROLS) if s in sets[""].mse]
    header = "| series | " + " | ".join(f"{SETS[s]} FVE [95% CI]" for s in sets) + " |"
    lines = [
        "# Evaluation: held-out and foreign text",
        "",
        "FVE = 1 − mean mse_nrm / mean ‖u − ū‖² (ū: the AR-SFT's training rows; the mean over each set's rows).",
        "95% intervals: 1000 bootstrap resamples of documents. Greedy AV decoding.",
        "",
        " | ".join(f"{SETS[s]}: {metrics[f'n_rows{s}']} rows from {metrics[f'n_docs{s}']} documents" for s in sets),
        "",
        header,
        "|---|" + "---|" * len(sets),
    ]
    for name in names:
        cells = [
            f"{metrics[f'fve_{name}{s}']:+.3f} [{metrics[f'fve_{name}{s}_lo']:+.3f}, {metrics[f'fve_{name}{s}_hi']:+.3f}]"
            for s in sets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gains = [(name, control) for name, control in GAINS if f"gain_{name}_vs_{control}" in metrics]
    if gains:
        lines += [
            "",
            "Paired gains: the round trip's FVE minus the control's on the same rows, 95% CI (same documents drawn).",
            "",
        ]
        lines += ["| gain | " + " | ".join(SETS[s] for s in sets) + " |", "|---|" + "---|" * len(sets)]
        for name, control in gains:
            key = f"gain_{name}_vs_{control}"
            cells = [
                f"{metrics[key + s]:+.3f} [{metrics[key + s + '_lo']:+.3f}, {metrics[key + s + '_hi']:+.3f}]"
                for s in sets
            ]
            lines.append(f"| {name} − {control} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Collapse diagnostics",
        "",
        "| AV | set | distinct | content words in context | top share | top explanation |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for suffix, data in sets.items():
        for name in data.texts:
            key = f"{name}{suffix}"
            top = top_texts[key].replace("\n", " / ").replace("|", "\\|")[:120]
            lines.append(
                f"| {name} | {SETS[suffix]} | {metrics[f'distinct_{key}']:.2f} | {metrics[f'in_context_{key}']:.2f} "
                f"| {metrics[f'top_share_{key}']:.2f} | {top} |"
            )
    lines += [
        "",
        "## Per feature: what each line of the explanation gets right",
        "",
        "Line i of the AV's explanation against line i of the gold label (the last against the last: the final",
        "token's). distinct: the share of distinct lines; recall: the mean share of the gold line's words in it.",
        "",
    ]
    n_features = max(label_lines(list(data.rows.explanation)) for data in sets.values())
    columns = [f"feature {i} distinct / recall" for i in range(1, n_features + 1)]
    lines += ["| AV | set | " + " | ".join(columns) + " |", "|---|---|" + "---|" * n_features]
    for suffix, data in sets.items():
        for name in data.texts:
            cells = [
                f"{metrics[f'feature{i}_distinct_{name}{suffix}']:.2f} / {metrics[f'feature{i}_recall_{name}{suffix}']:.2f}"
                if f"feature{i}_distinct_{name}{suffix}" in metrics
                else "–"
                for i in range(1, n_features + 1)
            ]
            lines.append(f"| {name} | {SETS[suffix]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Round trip against the final-token line, by whether the AV names the final token",
        "",
        "| set | AV, rows | share | rows | round-trip FVE | final_only FVE on those rows |",
        "|---|---|---|---|---|---|",
    ]
    for suffix, data in sets.items():
        for label, share, n, fve, control in token_breakdown(data):
            lines.append(f"| {SETS[suffix]} | {label} | {share:.2f} | {n} | {fve:+.3f} | {control:+.3f} |")
    for suffix, data in sets.items():
        lines += ["", f"# Sample explanations ({SETS[suffix]} rows)", ""]
        for i in range(min(n_samples, len(data.rows))):
            row = data.rows.iloc[i]
            tail = row.prefix[-300:].replace("\n", " ")
            lines += [
                f"## {row.row_id} (position {row.position} of {row.n_tokens})",
                "",
                f"- **source (tail)**: …{tail}",
                f"- **token**: `{row.token!r}`",
                f"- **gold label** (AR FVE {data.row_fve('ar_gold', i):+.3f}): {row.explanation}",
            ]
            for name, texts in data.texts.items():
                series = "untrained" if name == "untrained" else f"roundtrip_{name}"
                flag = "" if data.closed[name][i] else " _(not closed: hit the token cap)_"
                lines.append(f"- **AV {name}** (round-trip FVE {data.row_fve(series, i):+.3f}): {texts[i]}{flag}")
            lines.append("")
    atomic_write_text(path, "\n".join(lines))
