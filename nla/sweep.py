"""The α sweep (`nla sweep-alpha`): which injection scale makes the AV read the vector most.

    nla sweep-alpha                 # writes reports/alpha_sweep.json; av_sft then uses its α

For each α of `sweep.alphas` (empty: `default_alpha_grid`) a short AV SFT run (`sweep.steps`
steps, `nla.av_sft.fit_av`) trains on the av_sft rows minus a held-out set of whole
documents (about `sweep.eval_rows` rows). On those held-out rows it scores the completion
loss with each row's own vector and with another row's vector; the chosen α has the largest
gap (shuffled − correct): there the explanation depends most on the injected vector.
Applies to `injection.mode: replace` only (karvonen is norm-matched and has no scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from nla.av_sft import fit_av
from nla.config import NLAConfig
from nla.data import labeled_rows, vectors_of
from nla.errors import NLAError
from nla.io import write_json
from nla.sidecar import read_sidecar


def default_alpha_grid(activations_meta: dict) -> list[float]:
    """Four decades-spaced α around the 75th-percentile norm (the embedding scale sits far below it)."""
    q75 = float(activations_meta["norm_quantiles"]["0.75"])
    return [round(q75 * f, 3) for f in (1 / 64, 1 / 8, 1 / 2, 1.0)]


def heldout_split(rows: pd.DataFrame, n_eval: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole documents (about `n_eval` rows) so the gap is measured on unseen text."""
    docs = np.random.default_rng(seed).permutation(sorted(rows.doc_id.unique()))
    held, count = [], 0
    for doc in docs:
        if count >= n_eval:
            break
        held.append(doc)
        count += int((rows.doc_id == doc).sum())
    mask = rows.doc_id.isin(held)
    return rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)


def run_sweep_alpha(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    out_path: str | Path,
    *,
    work_dir: str | Path = "data/work/sweep_alpha",
) -> dict:
    """Short SFT per α; pick the α whose held-out loss gap (shuffled − correct pairing) is largest."""
    if cfg.injection.mode != "replace":
        raise NLAError("the α sweep applies to injection.mode 'replace' only; 'karvonen' has no scale")
    sweep = cfg.sweep
    rows = labeled_rows(activations_dir, splits_dir, labels_dir, ["av_sft"], layer=cfg.model.layer)
    act_meta = read_sidecar(activations_dir)
    alphas = list(sweep.alphas) or default_alpha_grid(act_meta)
    train, held = heldout_split(rows, sweep.eval_rows, cfg.av_sft.seed)
    if len(held) < 2 or train.empty:
        raise NLAError(f"too few av_sft rows ({len(rows)}) for an α sweep; label more rows or skip the sweep")
    vectors = torch.from_numpy(vectors_of(held))  # (n_held, d)
    shuffled = vectors[torch.roll(torch.arange(len(held)), 1)]  # every row gets another row's vector
    explanations = held.explanation.tolist()
    table = []
    for alpha in tqdm(alphas, desc="sweep α", unit="α"):
        sweep_cfg = cfg.model_copy(deep=True)
        sweep_cfg.injection.scale = float(alpha)
        av, log, _ = fit_av(sweep_cfg, train, float(alpha), Path(work_dir) / f"alpha-{alpha:g}", max_steps=sweep.steps)
        correct, wrong = av.completion_loss(vectors, explanations), av.completion_loss(shuffled, explanations)
        table.append(
            {
                "alpha": float(alpha),
                "loss_correct": correct,
                "loss_shuffled": wrong,
                "gap": wrong - correct,
                "train_loss_last": float(log[-1]["loss"]) if log else float("nan"),
            }
        )
        del av
    best = max(table, key=lambda r: r["gap"])
    result = {
        "alpha": best["alpha"],
        "table": table,
        "steps_per_alpha": sweep.steps,
        "train_rows": len(train),
        "heldout_rows": len(held),
        "norm_quantiles": act_meta.get("norm_quantiles"),
        "criterion": "max(loss_shuffled - loss_correct)",
    }
    write_json(out_path, result)
    return result
