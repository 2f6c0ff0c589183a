"""GRPO pieces (group-relative policy optimisation), as in the RL-watermark development code.

Shared by the LM trainer (``methods.language_models.rl_watermark``) and the flow trainers
(planned Flow-GRPO, where a rollout's "tokens" are its denoising steps).

For a group of G rollouts of one input with rewards r_1..r_G:
    A_i = (r_i − mean_G r) / (std_G r + ε)                 (unbiased std, as ``torch.std``)
Per-token clipped surrogate over the rollout tokens t of every rollout i (M = token mask):
    ρ_it = exp(log π_new(y_it) − log π_old(y_it))
    L_pg = Σ_{i,t∈M} max(−A_i ρ_it, −A_i clip(ρ_it, 1 − c, 1 + c)) / |M|     (c = 0: unclipped)
Reward-gradient term (``add_reward_gradient``) with rewards r̃_i recomputed differentiably:
    L_rg = Σ_{i,t∈M} −r̃_i · sg(ρ_it) / |M|
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, G) rewards → (B, G) advantages normalised within each group."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def minmax_normalize(values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, G) → each group rescaled to [0, 1] (a constant group becomes 0)."""
    low = values.min(dim=1, keepdim=True).values
    high = values.max(dim=1, keepdim=True).values
    return (values - low) / (high - low + eps)


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.0) -> torch.Tensor:
    """L_pg for (N, T) token log-probabilities, (N,) advantages and an (N, T) token mask."""
    ratio = torch.exp(logp_new - logp_old)
    adv = advantages[:, None]
    loss = -adv * ratio
    if clip > 0:
        loss = torch.maximum(loss, -adv * ratio.clamp(1 - clip, 1 + clip))
    return (loss * mask).sum() / mask.sum()


def reward_gradient_loss(rewards: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_rg for differentiable (N,) rewards and (N, T) ratios (detached here)."""
    return (-rewards[:, None] * ratio.detach() * mask).sum() / mask.sum()
