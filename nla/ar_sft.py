"""The ar_sft stage: train the AR to map each warm-start explanation back to its activation.

    nla ar-sft                      # or: dvc repro ar_sft

`run_ar_sft` reads the labeled ar_sft rows (`nla.data.labeled_rows`), adds the SFT AV's own greedy
explanations of `ar_sft.av_explanations` of them, each paired with its true vector (`av_pairs`),
trains a fresh AR on both (`fit_ar`: AdamW, linear warm-up then cosine decay, the head on its own
learning rate, loss mean mse_nrm) and saves it with `AR.save`, plus the per-step log (CSV) and
metrics (JSON).

Why the AV's texts: the AR is scored on what the AV writes, not on gold labels. An AR that has
only read gold labels takes every line at face value, so the AV's wrong topic or "before" lines
pull its reconstruction away; trained on both, it learns how far each line of an AV explanation
can be trusted (measured in reports/explanations.md: the round trip rises, AR-on-gold drops a
little). Gold labels stay in: an AR on AV texts alone falls back to predicting ū.

Resume: every `ar_sft.checkpoint_every` steps the trainable weights, optimizer, scheduler,
batch order and RNG states go atomically to the work folder; a rerun with the same inputs
(`ar_fingerprint`) continues from there with the same batches and updates.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import nla.distributed as distributed
from nla.ar import AR, new_ar
from nla.av import load_av
from nla.config import PATHS, NLAConfig
from nla.data import labeled_rows, vectors_of
from nla.errors import NLAError
from nla.io import atomic_dir, atomic_path, write_json
from nla.label.parse import FEATURE_SEP
from nla.models import autocast, d_model, decoder_blocks, load_model, model_autocast, release_memory
from nla.provenance import beside, write_provenance
from nla.sidecar import read_sidecar, sidecar_path

AR_CHECKPOINT, AR_STATE_FILE = "checkpoint", "state.pt"  # mid-run state of ar_sft, under its work folder
TIMINGS = ("ar_sft_seconds", "ar_sft_tokens_per_s")  # of `fit_ar`'s metrics: run facts (nla.provenance), not results

# Greedy decoding reads every weight once per step whatever the batch: wide batches amortise the reads.
AV_BATCH = 128


# ----------------------------------------------------------------------------- training


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def drop_lines(texts: list[str], share: float, seed: int) -> list[str]:
    """`share` of the labels, drawn at random, each lose 1 to all of their lines before the last (the final
    token's, which always stays): an AR that has read only whole labels misreads a partial one."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        *context, last = text.split(FEATURE_SEP)
        if context and rng.random() < share:
            keep = sorted(rng.choice(len(context), size=int(rng.integers(0, len(context))), replace=False))
            text = FEATURE_SEP.join([*(context[i] for i in keep), last])
        out.append(text)
    return out


def fit_ar(
    cfg: NLAConfig,
    texts: list[str],
    targets: torch.Tensor,
    loaded=None,
    work_dir: str | Path | None = None,
    fingerprint: str = "",
) -> tuple[AR, list[dict], dict]:
    """Train a fresh AR on (text → target vector) pairs: AdamW, warm-up + cosine, the head on its own lr.

    Returns (AR, per-step log, summary metrics). ū and the FVE denominator come from `targets`.
    With `work_dir`, a checkpoint every `ar_sft.checkpoint_every` steps lets a killed run continue
    exactly where it stopped (same batches, same updates) when the inputs match `fingerprint`.
    """
    sft = cfg.ar_sft
    torch.manual_seed(sft.seed)
    ar = new_ar(cfg, loaded)
    mixed = model_autocast(ar.backbone, cfg.model.autocast)  # bf16 matmuls on a bf16-capable CPU
    ar.set_reference(targets)
    ar.train()
    if sft.batch_size < distributed.world_size():
        raise NLAError(
            f"ar_sft.batch_size={sft.batch_size} is below the {distributed.world_size()} processes; raise it"
        )
    distributed.shard_model(ar, decoder_blocks(ar.backbone), cfg.distributed.strategy)  # in place; no-op alone
    optimizer = torch.optim.AdamW(ar.param_groups(sft.learning_rate, sft.head_learning_rate), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(texts) / sft.batch_size)
    total = sft.max_steps if sft.max_steps > 0 else max(1, round(sft.epochs * steps_per_epoch))
    warmup = max(1, round(sft.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
    rng = np.random.default_rng(sft.seed)
    order: list[int] = []
    log: list[dict[str, float]] = []
    denom, tokens = ar.fve_denominator, 0
    first = 0
    if work_dir is not None and (state := _load_ar_state(Path(work_dir), fingerprint, ar, optimizer, scheduler)):
        first, log, order, tokens = state["step"], state["log"], state["order"], state["tokens"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(distributed.own(state["torch_rng"]))
        tqdm.write(f"ar_sft: resumed at step {first} from {Path(work_dir) / AR_CHECKPOINT}")
    start = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
    bar = tqdm(range(first, total), initial=first, total=total, desc="ar_sft", unit="step")
    for step in bar:
        if len(order) < sft.batch_size:  # epochs of fresh permutations, batches may straddle two
            order += rng.permutation(len(texts)).tolist()
        idx, order = order[: sft.batch_size], order[sft.batch_size :]
        idx = distributed.shard(idx)  # this rank's slice of the global batch (all of it in one process)
        batch = [texts[i] for i in idx]
        with autocast(ar.device, mixed):
            loss = ar.loss(batch, targets[idx])
        optimizer.zero_grad(set_to_none=True)
        (loss * distributed.share(len(idx))).backward()  # averaged over ranks: the gradient of the global mean
        distributed.sync_gradients(ar.parameters_to_train())
        torch.nn.utils.clip_grad_norm_(ar.parameters_to_train(), sft.max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = distributed.mean_over_ranks(float(loss.detach()), len(idx))  # the global batch's mean
        tokens += int(distributed.all_sum(sum(len(ar.prompt_ids(t)) for t in batch)))
        log.append(
            {
                "step": step + 1,
                "epoch": (step + 1) / steps_per_epoch,
                "loss": value,
                "fve_train_batch": 1 - value / denom,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - start,
            }
        )
        bar.set_postfix(loss=f"{value:.3f}")
        if work_dir is not None and (step + 1) % sft.checkpoint_every == 0 and step + 1 < total:
            _save_ar_state(Path(work_dir), fingerprint, step + 1, log, order, tokens, ar, optimizer, scheduler, rng)
    ar.eval()
    seconds = time.perf_counter() - start
    train_mse = float(np.mean([r["loss"] for r in log[-steps_per_epoch:]]))  # ≈ the last epoch's fit
    metrics = {
        "ar_sft_train_mse_nrm": train_mse,
        "ar_sft_train_fve": 1 - train_mse / denom,
        "ar_sft_first_loss": log[0]["loss"],
        "ar_sft_steps": total,
        "ar_sft_rows": len(texts),
        "ar_sft_seconds": seconds,
        "ar_sft_tokens_per_s": tokens / max(seconds, 1e-9),
    }
    return ar, log, metrics


# ----------------------------------------------------------------------------- mid-run state


def _save_ar_state(
    work_dir: Path, fingerprint: str, step: int, log, order, tokens: int, ar: AR, optimizer, scheduler, rng
) -> None:
    """Everything `fit_ar` needs to continue exactly after `step`, written atomically."""
    state = {
        "fingerprint": fingerprint,
        "step": step,
        "log": log,
        "order": order,
        "tokens": tokens,
        "params": distributed.full_tensors(ar.parameters_to_train()),  # full weights, also when sharded
        "optimizer": distributed.full_optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": distributed.per_rank(torch.get_rng_state()),
    }
    if distributed.is_main():
        with atomic_dir(work_dir / AR_CHECKPOINT) as tmp:
            torch.save(state, tmp / AR_STATE_FILE)
    distributed.barrier()


def _load_ar_state(work_dir: Path, fingerprint: str, ar: AR, optimizer, scheduler) -> dict | None:
    """Restore a mid-run checkpoint into `ar`, `optimizer` and `scheduler`; None when there is none for these inputs."""
    path = work_dir / AR_CHECKPOINT / AR_STATE_FILE
    # Rank 0 reads the checkpoint and hands it to the others, so only its file system needs to hold it.
    state = distributed.main_computes(
        lambda: torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    )
    if state is None:
        return None
    params = ar.parameters_to_train()
    if state["fingerprint"] != fingerprint or [t.shape for t in state["params"]] != [p.shape for p in params]:
        tqdm.write(f"ar_sft: ignoring the checkpoint in {work_dir} (other inputs or params); starting over")
        return None
    distributed.load_full_(params, state["params"])
    optimizer.load_state_dict(distributed.shard_optimizer_state(state["optimizer"], params))
    scheduler.load_state_dict(state["scheduler"])
    return state


def ar_fingerprint(
    cfg: NLAConfig, source_fingerprint: str, row_ids: list[str], texts: list[str], targets: torch.Tensor
) -> str:
    """Identity of an ar_sft run for resuming: its params, the model and the exact training pairs."""
    blob = json.dumps(
        [cfg.ar_sft.model_dump(), cfg.model.model_dump(), cfg.prompts.ar_template, source_fingerprint, row_ids, texts],
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode())
    digest.update(targets.numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- the AV's own explanations


def av_pairs(cfg: NLAConfig, av_dir: str | Path, rows, device: str = "auto") -> tuple[list[str], torch.Tensor, list]:
    """(explanation, vector) pairs from the SFT AV: greedy explanations of `ar_sft.av_explanations` rows.

    The rows are a fixed-seed sample of `rows`; each explanation is paired with its row's true vector,
    so the AR learns to map what the AV writes (right or wrong) to what it should have conveyed.
    Returns (texts, vectors (n, d_model), row ids).
    """
    sample = rows.sample(n=min(cfg.ar_sft.av_explanations, len(rows)), random_state=cfg.ar_sft.seed)
    vectors = torch.from_numpy(vectors_of(sample))  # (n, d_model)
    av = load_av(av_dir, device, layer=cfg.model.layer)
    try:
        with autocast(av.device, model_autocast(av.model, cfg.model.autocast)):  # decoding only: no weights cached
            explanations = av.generate(vectors, cfg.ar_sft.av_max_new_tokens, temperature=0.0, batch_size=AV_BATCH)
    finally:
        del av
        release_memory()
    return [e.text for e in explanations], vectors, sample.row_id.tolist()


# ----------------------------------------------------------------------------- the stage


def run_ar_sft(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    *,
    av_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    plots_path: str | Path | None = None,
    work_dir: str | Path = Path(PATHS.work) / "ar_sft",
    provenance_path: str | Path | None = None,
) -> dict[str, Any]:
    """Train the AR on (explanation → activation) over the ar_sft rows; save checkpoint, log and metrics.

    With `av_dir` (the SFT AV) and `ar_sft.av_explanations` > 0, the AV's greedy explanations of that
    many rows join the gold labels (`av_pairs`). A killed run resumes from its last mid-run checkpoint
    in `work_dir` (removed once the AR is saved).

    The headline metrics (JSON, for `dvc metrics`) go to `metrics_path`, the per-step loss (CSV, for
    `dvc plots`) to `plots_path` and the timings to `provenance_path`; they default to files beside
    `out_dir` (DVC outputs must not overlap). The sidecar's `training` holds every other metric.
    """
    loaded = load_model(cfg.model, for_training=True)
    model, _, source = loaded
    data_meta = read_sidecar(activations_dir)
    if data_meta.get("base_model_fingerprint") not in (None, source.fingerprint):
        raise NLAError(
            f"{activations_dir} was extracted from {data_meta['base_model_fingerprint']} but model.name "
            f"gives {source.fingerprint}; re-run extract or fix model.name"
        )
    rows = labeled_rows(
        activations_dir, splits_dir, labels_dir, ["ar_sft"], d_model=d_model(model), layer=cfg.model.layer
    )
    labels_meta = read_sidecar(labels_dir) if sidecar_path(labels_dir).is_file() else {}
    texts = drop_lines(rows.explanation.tolist(), cfg.ar_sft.line_dropout, cfg.ar_sft.seed)
    targets, row_ids = torch.from_numpy(vectors_of(rows)), rows.row_id.tolist()
    n_av = 0
    if cfg.ar_sft.av_explanations > 0:
        if av_dir is None:
            raise NLAError("ar_sft.av_explanations > 0 needs the SFT AV (av_dir); train av_sft first or set it to 0")
        av_texts, av_vectors, av_ids = av_pairs(cfg, av_dir, rows, str(model.device))
        texts, targets, row_ids = texts + av_texts, torch.cat([targets, av_vectors]), row_ids + av_ids
        n_av = len(av_texts)
    fingerprint = ar_fingerprint(cfg, source.fingerprint, row_ids, texts, targets)
    ar, log, metrics = fit_ar(cfg, texts, targets, loaded, work_dir, fingerprint)
    timings = {key: metrics.pop(key) for key in TIMINGS}
    with distributed.full_weights(ar, ar.backbone):  # every rank gathers (when sharded), rank 0 writes
        if distributed.is_main():
            ar.save(
                out_dir,
                {
                    "stage": "ar_sft",
                    "train_rows": len(rows),
                    "train_av_explanations": n_av,
                    "train_steps": metrics["ar_sft_steps"],
                    "labeler": labels_meta.get("labeler", labels_meta.get("label")),
                    "training": {**cfg.ar_sft.model_dump(), **metrics},
                    "parents": [str(activations_dir), str(splits_dir), str(labels_dir)]
                    + ([str(av_dir)] if n_av else []),
                },
            )
            out_dir = Path(out_dir)
            _write_log(plots_path or out_dir.with_name(out_dir.name + "_loss.csv"), log)
            write_json(metrics_path or out_dir.with_name(out_dir.name + "_metrics.json"), headline(log))
            write_provenance(provenance_path or beside(out_dir), "ar_sft", **timings)
            shutil.rmtree(Path(work_dir) / AR_CHECKPOINT, ignore_errors=True)  # the AR is saved: no run to resume
    distributed.barrier()
    return metrics


def headline(log: list[dict[str, float]]) -> dict[str, float]:
    """What `dvc metrics show` lists for ar_sft: the loss (mse_nrm) at the end, as for av_sft."""
    k = max(1, len(log) // 10)
    return {"ar_loss": float(np.mean([r["loss"] for r in log[-k:]]))}


def _write_log(path: Path, log: list[dict[str, float]]) -> None:
    """The per-step curve for `dvc plots`, without the wall-clock column (a timing, not a result)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k in log[0] if k != "seconds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(log)
