"""The evaluate stage: held-out FVE of the AR and of the AV→AR round trip, with controls.

The metric itself (mse_nrm, FVE and its reference ū) lives in `nla.metrics`. Every figure
here uses the FVE reference of the AR-SFT checkpoint (ū and mean ‖u − ū‖² of its training
rows), so the SFT and RL numbers are comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

import nla.distributed as distributed
from nla.ar import MEAN_UNIT_FILE, load_ar
from nla.av import load_av
from nla.config import NLAConfig
from nla.data import labeled_rows, vectors_of
from nla.errors import NLAError
from nla.io import atomic_path, atomic_write_text, write_json
from nla.metrics import derangement, fve_denominator, fve_from_mse, mse_nrm
from nla.models import release_memory
from nla.sidecar import read_sidecar

REQUIRED_CHECKPOINTS = ("av_sft", "ar_sft")
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
    for key in ("layer", "d_model", "base_model_fingerprint"):
        if data_meta.get(key) is not None and meta.get(key) != data_meta.get(key):
            raise NLAError(
                f"{where}: {key}={meta.get(key)!r} but the activations have {data_meta.get(key)!r}; "
                "evaluate checkpoints trained on these activations"
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
    for i, value in zip(rows.tolist(), run(rows), strict=True):
        out[i] = value
    return distributed.merge(out)  # type: ignore[return-value]


def reconstruct(ar, texts: list[str], batch_size: int) -> torch.Tensor:
    """`ar.reconstruct(texts)`, its length-sorted batches shared out over the processes of a launch: (n, d)."""
    order = np.argsort([len(ar.prompt_ids(t)) for t in texts], kind="stable")  # the batches reconstruct forms
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rows = by_batches(len(texts), batches, lambda r: list(ar.reconstruct([texts[i] for i in r], batch_size, True)))
    return torch.stack(rows) if rows else torch.zeros(0, ar.d)


def explain(av, targets: torch.Tensor, max_new_tokens: int, batch_size: int) -> list:
    """Greedy `av.generate(targets)`, its consecutive batches shared out over the processes of a launch."""
    batches = [np.arange(i, min(i + batch_size, len(targets))) for i in range(0, len(targets), batch_size)]
    return by_batches(
        len(targets),
        batches,
        lambda r: av.generate(targets[torch.as_tensor(r)], max_new_tokens, temperature=0.0, batch_size=batch_size),
    )


def eval_rows(activations_dir, splits_dir, labels_dir, max_rows: int) -> pd.DataFrame:
    """The labeled held-out rows, capped at `max_rows` by a fixed-seed sample (same rows every run)."""
    rows = labeled_rows(activations_dir, splits_dir, labels_dir, ["eval"])
    if len(rows) > max_rows:
        rows = rows.sample(n=max_rows, random_state=0).sort_index()
    return rows.reset_index(drop=True)


def run_evaluate(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    checkpoints: dict[str, str | Path | None],
    metrics_path: str | Path,
    plots_dir: str | Path,
    samples_path: str | Path,
) -> dict[str, float]:
    """FVE of the AR on gold labels, of the AV→AR round trip per checkpoint pair, and the controls.

    `checkpoints`: av_sft and ar_sft (required), av_rl and ar_rl (optional, both or neither).
    Writes `metrics_path` (flat JSON), `plots_dir`/fve_by_checkpoint.csv and fve_by_position.csv,
    and `samples_path` (markdown).
    """
    ev = cfg.evaluate
    start = time.perf_counter()
    missing = [k for k in REQUIRED_CHECKPOINTS if checkpoints.get(k) is None]
    if missing:
        raise NLAError(f"evaluate needs checkpoints {missing}; run av_sft and ar_sft first")
    paths = {k: _checkpoint(checkpoints, k) for k in ("av_sft", "ar_sft", "av_rl", "ar_rl")}
    if (paths["av_rl"] is None) != (paths["ar_rl"] is None):
        raise NLAError("give both av_rl and ar_rl checkpoints (an RL pair) or neither")
    data_meta = read_sidecar(activations_dir)
    rows = eval_rows(activations_dir, splits_dir, labels_dir, ev.max_rows)
    if len(rows) < 2:
        raise NLAError(f"only {len(rows)} labeled eval rows; evaluation needs at least 2 (check split/label)")
    targets = torch.from_numpy(vectors_of(rows))
    gold = rows.explanation.tolist()
    n = len(rows)

    metrics: dict[str, float] = {"n_rows": n}
    per_row: dict[str, torch.Tensor] = {}  # name -> per-row mse_nrm
    texts: dict[str, list[str]] = {}
    closed: dict[str, list[bool]] = {}

    # The AR-SFT fixes the FVE reference ū (its training rows) for every number below.
    device = cfg.model.device
    ar = load_ar(paths["ar_sft"], device)
    _check_pair(ar.meta, data_meta, paths["ar_sft"])
    if ar.mean_unit is None:
        raise NLAError(f"{paths['ar_sft']} has no {MEAN_UNIT_FILE}; retrain it with `nla ar-sft`")
    mean_unit = ar.mean_unit
    denom = fve_denominator(targets, mean_unit)
    rec_gold = reconstruct(ar, gold, ev.batch_size)
    per_row["ar_gold"] = mse_nrm(rec_gold, targets)
    per_row["shuffled"] = mse_nrm(rec_gold[torch.from_numpy(derangement(n, seed=0))], targets)
    per_row["empty"] = mse_nrm(ar.reconstruct([""]).expand(n, -1), targets)
    per_row["mean"] = mse_nrm(mean_unit.expand(n, -1), targets, normalize_pred=False)
    ar_tokens = [len(ar.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in gold]
    metrics.update(length_stats(ar_tokens, "gold"))

    pairs = [("sft", paths["av_sft"], None)]
    if paths["av_rl"] is not None:
        pairs.append(("rl", paths["av_rl"], paths["ar_rl"]))
    for name, av_path, ar_path in pairs:
        av = load_av(av_path, device)
        _check_pair(av.meta, data_meta, av_path)
        explanations = explain(av, targets, ev.max_new_tokens, ev.batch_size)
        del av
        release_memory()
        texts[name] = [e.text for e in explanations]
        closed[name] = [e.closed for e in explanations]
        metrics.update(length_stats([len(e.token_ids) for e in explanations], f"expl_{name}", closed[name]))
        if ar_path is not None:  # the RL pair brings its own AR
            del ar
            release_memory()
            ar = load_ar(ar_path, device)
            _check_pair(ar.meta, data_meta, ar_path)
            per_row[f"ar_gold_{name}"] = mse_nrm(reconstruct(ar, gold, ev.batch_size), targets)
        per_row[f"roundtrip_{name}"] = mse_nrm(reconstruct(ar, texts[name], ev.batch_size), targets)
    del ar
    release_memory()

    for key, mse in per_row.items():
        metrics[f"fve_{key}"] = fve_from_mse(mse, denom)
        metrics[f"mse_nrm_{key}"] = float(mse.mean())
        if key != "mean":  # ū is not a unit vector, so 1 - mse/2 is a cosine only for the others
            metrics[f"cos_{key}"] = float((1 - mse / 2).mean())  # mse_nrm = 2(1 - cos)
    metrics["fve_denominator"] = denom
    metrics["eval_seconds"] = time.perf_counter() - start

    if distributed.is_main():  # every rank holds the same numbers; one writes them
        write_json(metrics_path, metrics)
        _write_plots(Path(plots_dir), rows, per_row, denom)
        _write_samples(Path(samples_path), rows, texts, closed, per_row, denom, ev.n_samples)
    distributed.barrier()
    return metrics


def _write_plots(plots_dir: Path, rows: pd.DataFrame, per_row: dict[str, torch.Tensor], denom: float) -> None:
    """fve_by_checkpoint.csv (checkpoint, fve) and fve_by_position.csv: one row per power-of-two position
    bucket, x = `position_bucket` (its first position), y = `fve` (round trip of the last pair: RL when
    evaluated, else SFT) plus one `fve_<name>` column per AR/round-trip series."""
    by_checkpoint = pd.DataFrame([{"checkpoint": key, "fve": fve_from_mse(mse, denom)} for key, mse in per_row.items()])
    buckets = [position_bucket(p) for p in rows.position]
    frame = pd.DataFrame({"position_bucket": [b[0] for b in buckets], "position_end": [b[1] for b in buckets]})
    series = [k for k in per_row if k.startswith(("ar_gold", "roundtrip"))]
    for key in series:
        frame[f"fve_{key}"] = (1 - per_row[key] / denom).numpy()
    frame["fve"] = frame[f"fve_{[k for k in series if k.startswith('roundtrip')][-1]}"]
    groups = frame.groupby(["position_bucket", "position_end"])
    by_position = groups.mean().reset_index()
    by_position.insert(2, "n_rows", groups.size().to_numpy())
    labels = [f"{a}-{b - 1}" for a, b in zip(by_position.position_bucket, by_position.position_end, strict=True)]
    by_position.insert(1, "bucket_label", labels)
    for name, table in (("fve_by_checkpoint.csv", by_checkpoint), ("fve_by_position.csv", by_position)):
        with atomic_path(plots_dir / name) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")


def _write_samples(
    path: Path,
    rows: pd.DataFrame,
    texts: dict[str, list[str]],
    closed: dict[str, list[bool]],
    per_row: dict[str, torch.Tensor],
    denom: float,
    n_samples: int,
) -> None:
    def fve(key: str, i: int) -> str:
        return f"{1 - float(per_row[key][i]) / denom:+.3f}"

    lines = [
        "# Sample explanations (held-out eval rows)",
        "",
        f"Per-row FVE = 1 − mse_nrm / {denom:.4f} (mean ‖u − ū‖² over these rows). Greedy AV decoding.",
        "",
    ]
    for i in range(min(n_samples, len(rows))):
        row = rows.iloc[i]
        tail = row.prefix[-300:].replace("\n", " ")
        lines += [
            f"## {row.row_id} (position {row.position} of {row.n_tokens})",
            "",
            f"- **source (tail)**: …{tail}",
            f"- **token**: `{row.token!r}`",
            f"- **gold label** (AR FVE {fve('ar_gold', i)}): {row.explanation}",
        ]
        for name in texts:
            flag = "" if closed[name][i] else " _(not closed: hit the token cap)_"
            lines.append(f"- **AV {name}** (round-trip FVE {fve(f'roundtrip_{name}', i)}): {texts[name][i]}{flag}")
        lines.append("")
    atomic_write_text(path, "\n".join(lines))
