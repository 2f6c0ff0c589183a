"""Samplers for the digit generators: DDIM (diffusion) and Euler ODE / Flow-GRPO SDE (flow).

Every step is a Gaussian transition x' = μ_θ + s·z, z ~ N(0, I), returned as a
``Transition`` with log N(x'; μ_θ, s²) averaged over non-batch dimensions (the DDPO
and Flow-GRPO convention), so policy-gradient methods can re-score stored steps.

Chains are deterministic per ``torch.Generator``: x_T and every step's z are drawn
from it in a fixed order. With ``grad_steps = K`` only the last K steps run with
autograd (each network call under ``torch.utils.checkpoint``); earlier steps run
under ``no_grad``, which equals AlignProp's detaching of their predictions.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_call

Predictor = Callable[[Tensor, Tensor], Tensor]
"""predict(x_t, t) → network output (ε̂ or v̂), with t of shape (B,)."""


@dataclass
class Transition:
    """One step x → x' = mean + std·z of a sampling chain."""

    sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None  # (B,); None for a deterministic step (std = 0)


@dataclass
class Trajectory:
    """A sampled chain of N steps."""

    sample: Tensor  # final x, carrying the graph of the last ``grad_steps`` steps
    latents: Tensor  # (B, N + 1, ...) detached states, noise first
    means: Tensor  # (B, N, ...) detached transition means μ_θ
    log_probs: Tensor | None  # (B, N) per-step log-probabilities; None for deterministic chains
    timesteps: Tensor  # (N,) the network timesteps of the steps


def cfg_predictor(model: nn.Module, labels: Tensor, guidance_scale: float = 1.0) -> Predictor:
    """Classifier-free guidance: out = out(x, t, ∅) + w·(out(x, t, c) − out(x, t, ∅)).

    w = 1 is the plain conditional model (one network call); otherwise the conditional
    and null-label halves go through the network as one batch.
    """
    null = torch.full_like(labels, model.null_label)

    def predict(x: Tensor, t: Tensor) -> Tensor:
        if guidance_scale == 1.0:
            return model(x, t, labels)
        out_null, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, labels])).chunk(2)
        return out_null + guidance_scale * (out_cond - out_null)

    return predict


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """mean over non-batch dims of −(x − μ)²/(2s²) − log s − log √(2π); x is treated as a constant."""
    std = std.expand_as(mean)
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _transition(
    mean: Tensor, std: Tensor, generator: torch.Generator | None, prev_sample: Tensor | None
) -> Transition:
    """Draw x' = mean + std·z (or take ``prev_sample``) and score it under N(mean, std²)."""
    if not bool((std > 0).all()):
        return Transition(mean if prev_sample is None else prev_sample, mean, std, None)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    return Transition(prev_sample, mean, std, gaussian_log_prob(prev_sample, mean, std))


def ddim_std(scheduler: DDIMScheduler, timestep: int, eta: float) -> Tensor:
    """DDIM eq. (16): s = η·√((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)), prev = t − T/N."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = scheduler.alphas_cumprod[timestep]
    alpha_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    return eta * torch.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))


def ddim_step(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int,
    x: Tensor,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> Transition:
    """DDIM step t → prev (Song et al. eq. 12) with noise weight η (η = 1 as in AlignProp/DDPO).

    x̂₀ = (x − √(1 − ᾱ_t)·ε̂)/√ᾱ_t;  μ = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − s²)·ε̂;  x' = μ + s·z.
    μ comes from ``scheduler.step`` with zero noise, s from ``ddim_std``. Given
    ``prev_sample``, the step only re-scores it under the current μ (for PPO ratios).
    """
    timestep = int(timestep)
    mean = scheduler.step(model_output, timestep, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    std = ddim_std(scheduler, timestep, eta).to(x)
    return _transition(mean, std, generator, prev_sample)


def flow_step(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: Tensor,
    step_index: int | Tensor,
    x: Tensor,
    noise_level: float = 0.0,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> Transition:
    """Flow-GRPO SDE step σ → σ_next (``sde_step_with_logprob``, sde_type "sde"); a = noise_level.

    dt = σ_next − σ < 0;  σ_t = a·√(σ/(1 − σ̃)), σ̃ = σ except σ̃ = σ_1 when σ = 1;
    μ = x·(1 + σ_t²/(2σ)·dt) + v̂·(1 + σ_t²(1 − σ)/(2σ))·dt;  x' = μ + σ_t·√(−dt)·z.
    a = 0 is the Euler ODE step x' = x + v̂·dt of ``FlowMatchEulerDiscreteScheduler``.
    ``step_index`` may be a (B,) tensor of per-sample steps.
    """
    sigmas = scheduler.sigmas.to(x)
    sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
    if sigma.ndim:
        sigma, sigma_next = (s.view(-1, *([1] * (x.ndim - 1))) for s in (sigma, sigma_next))
    dt = sigma_next - sigma
    std_dev = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma)))
    mean = x * (1 + std_dev**2 / (2 * sigma) * dt) + model_output * (1 + std_dev**2 * (1 - sigma) / (2 * sigma)) * dt
    return _transition(mean, std_dev * torch.sqrt(-dt), generator, prev_sample)


def _run_chain(
    predict: Predictor,
    x: Tensor,
    timesteps: Tensor,
    step: Callable[[int, Tensor, Tensor], Transition],
    grad_steps: int,
    checkpoint: bool,
) -> Trajectory:
    """x ← step(i, predict(x, t_i), x).sample for each t_i; autograd on the last ``grad_steps`` steps only."""
    first_grad_step = len(timesteps) - grad_steps
    latents, means, log_probs = [x], [], []
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad_step):
            t_batch = t.to(x.device).expand(x.shape[0])
            if torch.is_grad_enabled() and checkpoint:
                output = checkpoint_call(predict, x, t_batch, use_reentrant=False)
            else:
                output = predict(x, t_batch)
            transition = step(i, output, x)
        x = transition.sample
        latents.append(x.detach())
        means.append(transition.mean.detach())
        log_probs.append(transition.log_prob)
    return Trajectory(
        sample=x,
        latents=torch.stack(latents, dim=1),
        means=torch.stack(means, dim=1),
        log_probs=None if log_probs[0] is None else torch.stack(log_probs, dim=1),
        timesteps=timesteps,
    )


def sample_ddim(
    predict: Predictor,
    scheduler: DDIMScheduler,
    shape: tuple[int, ...],
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    grad_steps: int = 0,
    checkpoint: bool = True,
    device: torch.device | str = "cpu",
) -> Trajectory:
    """x_T ~ N(0, I), then ``ddim_step`` over ``scheduler.timesteps`` (set by ``make_ddim_scheduler``)."""
    x = randn_tensor(shape, generator=generator, device=torch.device(device))

    def step(i: int, output: Tensor, x: Tensor) -> Transition:
        return ddim_step(scheduler, output, scheduler.timesteps[i], x, eta, generator)

    return _run_chain(predict, x, scheduler.timesteps, step, grad_steps, checkpoint)


def sample_flow(
    predict: Predictor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    shape: tuple[int, ...],
    noise_level: float = 0.0,
    generator: torch.Generator | None = None,
    grad_steps: int = 0,
    checkpoint: bool = True,
    device: torch.device | str = "cpu",
) -> Trajectory:
    """x_1 ~ N(0, I), then ``flow_step`` over the scheduler's sigmas; noise_level > 0 gives the SDE with log-probs."""
    x = randn_tensor(shape, generator=generator, device=torch.device(device))

    def step(i: int, output: Tensor, x: Tensor) -> Transition:
        return flow_step(scheduler, output, i, x, noise_level, generator)

    return _run_chain(predict, x, scheduler.timesteps, step, grad_steps, checkpoint)
