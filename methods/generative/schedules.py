"""Noise schedules (diffusers schedulers) and the training losses of the two model families.

Diffusion (DDPM): x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, the network predicts ε.
Rectified flow:   x_σ = (1 − σ)·x₀ + σ·ε with σ ∈ [0, 1] (σ = 1 is pure noise), the
network predicts the velocity v = ε − x₀ and sees the timestep t = σ·num_train_timesteps
(the convention of ``FlowMatchEulerDiscreteScheduler.timesteps``).
"""

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from methods.generative.models import drop_labels


def make_ddpm_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    """The DDPM training schedule over ``num_train_timesteps``; "linear" is β from 1e-4 to 0.02."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


def make_ddim_scheduler(ddpm: DDPMScheduler, num_inference_steps: int = 20) -> DDIMScheduler:
    """A DDIM sampler over the same ᾱ with ``num_inference_steps`` steps.

    Configured like Stable Diffusion 1.x, the model AlignProp/DDPO fine-tune: no x₀
    clipping (it would cut reward gradients), ``set_alpha_to_one=False`` and
    ``steps_offset=1`` so that every step, the last included, has a non-zero σ_t at
    eta > 0 and hence a finite log-probability.
    """
    scheduler = DDIMScheduler.from_config(ddpm.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def make_flow_scheduler(
    num_inference_steps: int = 10, shift: float = 1.0, num_train_timesteps: int = 1000
) -> FlowMatchEulerDiscreteScheduler:
    """Rectified-flow sigmas σ_0 = 1 > … > σ_{N−1} > σ_N = 0, with σ' = sσ / (1 + (s − 1)σ) for shift s."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: Tensor,
    labels: Tensor,
    label_dropout: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ε-prediction loss E‖ε_θ(x_t, t, c̃) − ε‖², t ~ U{0, …, T − 1}, c̃ = c or null with p = label_dropout."""
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=device)
    t = t.to(x0.device)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    labels = drop_labels(labels, label_dropout, model.null_label, generator)
    return F.mse_loss(model(x_t, t, labels), noise)


def flow_matching_loss(
    model: nn.Module,
    x0: Tensor,
    labels: Tensor,
    label_dropout: float = 0.1,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Velocity loss E‖v_θ(x_σ, σ·T, c̃) − (ε − x₀)‖², σ ~ U(0, 1), x_σ = (1 − σ)x₀ + σε."""
    device = generator.device if generator is not None else x0.device
    sigma = torch.rand(x0.shape[0], generator=generator, device=device).to(x0)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_sigma = (1 - s) * x0 + s * noise
    labels = drop_labels(labels, label_dropout, model.null_label, generator)
    return F.mse_loss(model(x_sigma, sigma * num_train_timesteps, labels), noise - x0)
