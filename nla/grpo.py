"""The GRPO objective, as plain tensor functions: rewards, group advantages, k3 KL, the clipped surrogate.

Kept apart from the RL loop (`nla.rl`) so the math reads on one page and is tested on known
numbers (tests/test_rl.py). Shapes: rewards and advantages are (N,) with N = prompts × G, the
rows of one group consecutive; per-token tensors are (N, T) with a 0/1 mask over real tokens.
"""

from __future__ import annotations

import torch

from nla.config import RLConfig


def shaped_rewards(
    mse: torch.Tensor, malformed: torch.Tensor, capped: torch.Tensor, n_tokens: torch.Tensor, cfg: RLConfig
) -> torch.Tensor:
    """Reward per explanation: −mse (or −log mse), malformed → fixed value, minus length penalties."""
    base = -mse.clamp_min(1e-6).log() if cfg.reward == "neg_log_mse" else -mse
    reward = torch.where(malformed, torch.full_like(base, cfg.malformed_reward), base)
    return reward - cfg.length_cap_penalty * capped.float() - cfg.per_token_penalty * n_tokens.float()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r − group mean) / (group std + eps); groups are consecutive runs of `group_size` rows."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)  # unbiased, as TRL's GRPO
    return ((groups - mean) / (std + eps)).view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π ‖ π_ref): exp(Δ) − Δ − 1 with Δ = ℓ_ref − ℓ (≥ 0, unbiased)."""
    delta = ref_logp - logp
    return delta.exp() - delta - 1


def clipped_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level mean of the clipped surrogate plus β·k3 KL; returns (loss, stats)."""
    mask = mask.float()
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    kl = k3_kl(logp, ref_logp)
    per_token = -surrogate + beta * kl
    n = mask.sum().clamp_min(1.0)
    loss = (per_token * mask).sum() / n
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    stats = {"kl": float((kl.detach() * mask).sum() / n), "clip_frac": float((clipped.float() * mask).sum() / n)}
    return loss, stats


def duplicate_share(texts: list[str], group_size: int) -> torch.Tensor:
    """Per row, the share of the other rows of its group that wrote the same text (0: unique, 1: all alike).

    Subtracted (times `rl.duplicate_penalty`) from the reward: a group that writes one template
    gets no advantage between its rows, so nothing pushes it away from that template.
    """
    out = torch.zeros(len(texts))
    for start in range(0, len(texts), group_size):
        group = texts[start : start + group_size]
        for j, text in enumerate(group):
            out[start + j] = (group.count(text) - 1) / max(group_size - 1, 1)
    return out
