"""Frozen digit classifiers that judge generated samples, and feature-space sample metrics.

- proxy: a small CNN whose class log-probability is the differentiable reward;
- gold: an MLP (another architecture, seed and data half) that detects over-optimisation
  of the proxy; its penultimate layer is the evaluation feature space for the
  Fréchet distance and the k-NN precision/recall of Kynkäänniemi et al. (2019).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.classifiers import train_epoch


class _FeatureClassifier(nn.Module):
    """``body`` maps images to penultimate features, ``head`` maps features to class logits."""

    body: nn.Module
    head: nn.Module

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ConvClassifier(_FeatureClassifier):
    """Two 3×3 conv layers → global average pool → 64-d features → class logits."""

    def __init__(self, num_classes: int = 10, channels: int = 1, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)


class MLPClassifier(_FeatureClassifier):
    """Flattened pixels → 256 → 128-d features → class logits."""

    def __init__(self, image_size: int = 8, num_classes: int = 10, channels: int = 1, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * image_size**2, 256),
            nn.ReLU(),
            nn.Linear(256, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Cross-entropy training with Adam on shuffled mini-batches; returns ``model`` frozen in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        train_epoch(model, optimizer, images, labels, batch_size=batch_size, generator=generator)
    return model.eval().requires_grad_(False)


@dataclass
class Judges:
    proxy: ConvClassifier  # reward model
    gold: MLPClassifier  # held-out judge and evaluation feature space


def train_judges(images: Tensor, labels: Tensor, seed: int = 0, epochs: int = 30) -> Judges:
    """Proxy (CNN, seed) on one random half of the data, gold (MLP, seed + 1) on the other half."""
    half_a, half_b = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).chunk(2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        proxy = ConvClassifier(channels=images.shape[1])
        torch.manual_seed(seed + 1)
        gold = MLPClassifier(images.shape[-1], channels=images.shape[1])
    return Judges(
        proxy=train_classifier(proxy, images[half_a], labels[half_a], epochs, seed=seed),
        gold=train_classifier(gold, images[half_b], labels[half_b], epochs, seed=seed + 1),
    )


def class_log_prob(classifier: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """log p(c | x) per sample, differentiable in ``images`` (the reward of the target class c)."""
    return F.log_softmax(classifier(images), dim=-1).gather(1, labels[:, None]).squeeze(1)


@torch.no_grad()
def extract_features(classifier: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    """Penultimate-layer features, (N, D)."""
    return torch.cat([classifier.features(batch) for batch in images.split(batch_size)])


def _psd_sqrt(matrix: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a^½ Σ_b Σ_a^½)^½) of Gaussians fitted to the features (float64)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    sqrt_a = _psd_sqrt(cov_a)
    cross = _psd_sqrt(sqrt_a @ cov_b @ sqrt_a)
    return ((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)).item()


def _knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    return torch.cdist(features, features).kthvalue(k + 1, dim=1).values


def precision_recall(real: Tensor, fake: Tensor, k: int = 5) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019) improved precision and recall with k-NN balls.

    precision = share of fake points inside some real point's ball (radius = its k-NN
    distance among the reals); recall = share of real points inside some fake ball.
    """
    real, fake = real.double(), fake.double()
    distances = torch.cdist(fake, real)  # (fake, real)
    precision = (distances <= _knn_radii(real, k)[None, :]).any(dim=1).float().mean().item()
    recall = (distances <= _knn_radii(fake, k)[:, None]).any(dim=0).float().mean().item()
    return precision, recall
