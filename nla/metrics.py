"""The metric: normalised-vector MSE and the fraction of variance explained (FVE).

With unit vectors ``u = v/‖v‖`` and ``û = v̂/‖v̂‖``:

    mse_nrm = ‖û − u‖² = 2(1 − cos(v̂, v))      0 perfect, 2 orthogonal, 4 opposite
    fve_nrm = 1 − mean mse_nrm / mean ‖u − ū‖²

where ū is the mean unit vector of the AR's *training* rows (saved with the AR), so FVE is
the fraction of the held-out variance around the training mean that a reconstruction
explains. Predicting ū itself (not renormalised) scores exactly 0: the predict-the-mean
baseline. Per-row FVE uses the same denominator: 1 − mse_i / mean ‖u − ū‖².

Only directions count: the AV sees ``α·u`` (replace) or ``‖h‖·u`` (karvonen), never ‖v‖.
"""

from __future__ import annotations

import numpy as np
import torch

MSE_NORMALISATION = (
    "unit vectors: u = v/||v||, mse_nrm = ||u_hat - u||^2 per row, mean over rows; "
    "fve_nrm = 1 - mean mse_nrm / mean ||u - u_bar||^2 with u_bar the mean u of the AR's training rows"
)


def unit(vectors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """v/‖v‖ per row, in float32 (rows of norm below `eps` stay near zero instead of dividing by 0)."""
    vectors = vectors.float()
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)


def mse_nrm(pred: torch.Tensor, target: torch.Tensor, *, normalize_pred: bool = True) -> torch.Tensor:
    """Per-row ‖û − u‖². `normalize_pred=False` scores `pred` as given (for the mean baseline ū)."""
    u_hat = unit(pred) if normalize_pred else pred.float()
    return (u_hat - unit(target)).pow(2).sum(dim=-1)


def fve_denominator(target: torch.Tensor, mean_unit: torch.Tensor) -> float:
    """mean ‖u − ū‖²: the variance of the targets' directions around the training mean."""
    return float((unit(target) - mean_unit.float().to(target.device)).pow(2).sum(dim=-1).mean())


def fve_from_mse(mse: torch.Tensor, denominator: float) -> float:
    return 1.0 - float(mse.float().mean()) / denominator


def fve_nrm(pred: torch.Tensor, target: torch.Tensor, mean_unit: torch.Tensor, *, normalize_pred: bool = True) -> float:
    """1 − mean mse_nrm / mean ‖u − ū‖² (ū: mean unit vector of the training rows)."""
    return fve_from_mse(mse_nrm(pred, target, normalize_pred=normalize_pred), fve_denominator(target, mean_unit))


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (unit(pred) * unit(target)).sum(dim=-1)


def derangement(n: int, seed: int) -> np.ndarray:
    """partner[i] != i for every i (n ≥ 2): a random cycle, so each row gets another row's text."""
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def bootstrap_fve(
    mse: np.ndarray, deviation: np.ndarray, groups: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(FVE, 2.5% and 97.5% quantiles) with whole groups (documents) resampled with replacement.

    Rows of one document are correlated, so resampling rows would make the interval too narrow.
    Each resample draws as many documents as there are, and recomputes 1 − Σ mse / Σ ‖u − ū‖²
    over the rows of the drawn documents (numerator and denominator together).
    """
    _, index = np.unique(groups, return_inverse=True)
    n_groups = int(index.max()) + 1
    mse_sum = np.bincount(index, weights=mse, minlength=n_groups)  # (G,)
    dev_sum = np.bincount(index, weights=deviation, minlength=n_groups)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups))
    counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws])  # (R, G) times each group is drawn
    fves = 1 - (counts @ mse_sum) / (counts @ dev_sum)
    return float(1 - mse.mean() / deviation.mean()), float(np.quantile(fves, 0.025)), float(np.quantile(fves, 0.975))


def bootstrap_gain(
    mse: np.ndarray, mse_control: np.ndarray, deviation: np.ndarray, groups: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """FVE(mse) − FVE(mse_control) on the same rows, with the paired 95% interval: each resample draws the
    same documents for both, so the interval is of the difference, not of either FVE.

    FVE_a − FVE_b = −Σ(mse_a − mse_b) / Σ‖u − ū‖², i.e. the FVE of the per-row difference, minus 1.
    """
    fve, lo, hi = bootstrap_fve(mse - mse_control, deviation, groups, seed=seed)
    return fve - 1, lo - 1, hi - 1
