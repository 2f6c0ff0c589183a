"""Small convolutional autoencoder; anomaly score = per-image reconstruction MSE."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


class ConvAutoencoder(nn.Module):
    """3 conv + 3 deconv autoencoder for (C, S, S) inputs in [0, 1], S in {8, 16, 32}.

    Encoder: conv3x3/1 (C->w), conv4x4/2 (w->2w), conv4x4/2 (2w->4w), each BN + LeakyReLU(0.2),
    then FC to the latent. Decoder: FC, deconv4x4/2 (4w->2w), deconv4x4/2 (2w->w), each
    BN + ReLU, then deconv3x3/1 (w->C) + sigmoid. The BN layers mirror the paper's model,
    whose running statistics enter FedAgain's divergence.
    """

    def __init__(self, channels: int = 1, size: int = 8, latent_dim: int = 32, width: int = 16):
        super().__init__()
        if size % 4:
            raise ValueError(f"image size must be a multiple of 4, got {size}")
        self.shape = (4 * width, size // 4, size // 4)
        flat = int(np.prod(self.shape))
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.BatchNorm2d(4 * width), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(flat, latent_dim),
        )
        self.fc = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 3, 1, 1), nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc(self.encode(x)).view(-1, *self.shape))


def _batches(model: nn.Module, images: np.ndarray, batch_size: int, order=None):
    """Batches of ``images`` (in ``order`` if given) on the model's device."""
    device = next(model.parameters()).device
    x = torch.as_tensor(images, dtype=torch.float32)
    idx = torch.arange(len(x)) if order is None else order
    for start in range(0, len(x), batch_size):
        yield x[idx[start : start + batch_size]].to(device)


@torch.no_grad()
def reconstruction_error(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Anomaly score s(x) = mean_{c,h,w} (AE(x) - x)^2 per image, model in eval mode."""
    model.eval()
    errs = [((model(b) - b) ** 2).mean(dim=(1, 2, 3)) for b in _batches(model, images, batch_size)]
    return torch.cat(errs).cpu().numpy()


@torch.no_grad()
def benchmark_error(model: nn.Module, images: np.ndarray, batch_size: int = 32) -> float:
    """FedAgain's e_i: mean over batches of the batch MSE of the received model.

    As in the official code the model runs in training mode (BN batch statistics); a copy is
    used so the running statistics of ``model`` are left untouched.
    """
    probe = copy.deepcopy(model).train()
    batches = _batches(probe, images, batch_size)
    losses = [nn.functional.mse_loss(probe(b), b).item() for b in batches]
    return float(np.mean(losses))


def fit(
    model: nn.Module, images: np.ndarray, epochs: int, lr: float, batch_size: int, seed: int
) -> float:
    """Adam on the MSE reconstruction loss; returns the mean batch loss of the last epoch."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        order = torch.randperm(len(images), generator=gen)
        for b in _batches(model, images, batch_size, order):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(b), b)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return float(np.mean(losses))
