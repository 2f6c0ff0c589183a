"""DDPO (Black et al., 2023), the policy-gradient baseline of AlignProp, on the same DDIM sampler.

Each iteration samples a batch of chains without gradients, storing every state x_j and the
per-step log-probability log π_old(x_{j+1} | x_j, c) of the η > 0 DDIM transition. Rewards are
turned into advantages per prompt (class) c:  A = (r − μ_c)/(σ_c + 1e-6), with μ_c, σ_c over the
last ``buffer`` rewards of c (over the whole batch while c has fewer than ``min_count``), clipped
to ±``adv_clip``. Each minibatch then takes one optimizer step on the PPO-clip loss accumulated
over all N steps of the chain:
    L = (1/N) Σ_j mean_b max(−A·ρ_j, −A·clip(ρ_j, 1 − ε, 1 + ε)),   ρ_j = π_θ(x_{j+1}|x_j)/π_old(x_{j+1}|x_j).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.generative.judges import class_log_prob
from methods.generative.samplers import cfg_predictor, ddim_step, sample_ddim


class PerPromptStatTracker:
    """DDPO's per-prompt reward normaliser; ``buffers`` (class → recent rewards) is its checkpointed state."""

    def __init__(self, buffer: int = 16, min_count: int = 16):
        self.buffer, self.min_count = buffer, min_count
        self.buffers: dict[str, list[float]] = {}

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.buffers.items()}

    def load_state_dict(self, buffers: dict[str, list[float]]) -> None:
        self.buffers = {k: list(v) for k, v in buffers.items()}

    def advantages(self, labels: Tensor, rewards: Tensor) -> Tensor:
        out = torch.empty_like(rewards)
        for c in labels.unique().tolist():
            mask = labels == c
            history = (self.buffers.get(str(c), []) + rewards[mask].tolist())[-self.buffer :]
            self.buffers[str(c)] = history
            ref = torch.tensor(history) if len(history) >= self.min_count else rewards
            out[mask] = (rewards[mask] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return out


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """mean max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) with ρ = exp(log π − log π_old)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()


def ddpo_iteration(model: nn.Module, proxy: nn.Module, scheduler, labels: Tensor, generator: torch.Generator,
                   tracker: PerPromptStatTracker, optimizer: torch.optim.Optimizer, *, minibatch: int,
                   clip_range: float, adv_clip: float, max_grad_norm: float, guidance_scale: float = 1.0,
                   eta: float = 1.0, reduce_grads=lambda: None) -> dict[str, float]:
    """Sample ``len(labels)`` chains, then one PPO-clip step per minibatch; returns reward and clip statistics."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        chain = sample_ddim(cfg_predictor(model, labels, guidance_scale), scheduler, (len(labels), 1, 8, 8),
                            eta=eta, generator=generator)
        rewards = class_log_prob(proxy, chain.sample.clamp(-1, 1), labels)
    advantages = tracker.advantages(labels, rewards).clamp(-adv_clip, adv_clip)
    steps, clipped = len(chain.timesteps), []
    for batch in torch.randperm(len(labels), generator=generator).split(minibatch):
        predict = cfg_predictor(model, labels[batch], guidance_scale)
        optimizer.zero_grad(set_to_none=True)
        for j, t in enumerate(chain.timesteps):
            x = chain.latents[batch, j]
            out = predict(x, t.expand(len(batch)))
            step = ddim_step(scheduler, out, t, x, eta, prev_sample=chain.latents[batch, j + 1])
            loss = ppo_clip_loss(step.log_prob, chain.log_probs[batch, j], advantages[batch], clip_range) / steps
            loss.backward()
            clipped.append(((step.log_prob.detach() - chain.log_probs[batch, j]).exp() - 1).abs().gt(clip_range))
        reduce_grads()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    return {"train_reward": rewards.mean().item(), "clip_fraction": torch.cat(clipped).float().mean().item()}
