"""Metrics of a batch of class-conditional samples under the judges.

All images are clamped to the data range [−1, 1] first (as decoding to pixels would). With the gold
classifier g (the evaluation classifier) and its penultimate features φ:
- class_precision = mean[argmax g(x) = c], the share of samples recognised as their requested class;
- proxy_reward / gold_reward = mean log p(c | x) under the proxy / gold classifier;
- frechet_distance, precision, recall: Fréchet distance and k-NN precision/recall of φ(samples)
  against φ(real digits);
- diversity = mean over classes of the mean pairwise distance ‖φ(x_i) − φ(x_j)‖ within the class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.generative.judges import Judges, class_log_prob, extract_features, frechet_distance, precision_recall


def per_class_diversity(features: Tensor, labels: Tensor) -> float:
    values = [torch.pdist(features[labels == c]).mean() for c in labels.unique() if (labels == c).sum() > 1]
    return torch.stack(values).mean().item() if values else 0.0


@torch.no_grad()
def sample_metrics(images: Tensor, labels: Tensor, judges: Judges, real_features: Tensor,
                   k: int = 5) -> dict[str, float]:
    x = images.clamp(-1, 1)
    features = extract_features(judges.gold, x)
    precision, recall = precision_recall(real_features, features, k=k)
    return {
        "class_precision": (judges.gold(x).argmax(-1) == labels).float().mean().item(),
        "proxy_reward": class_log_prob(judges.proxy, x, labels).mean().item(),
        "gold_reward": class_log_prob(judges.gold, x, labels).mean().item(),
        "frechet_distance": frechet_distance(real_features, features),
        "precision": precision,
        "recall": recall,
        "diversity": per_class_diversity(features, labels),
    }


def balanced_labels(per_class: int, num_classes: int = 10) -> Tensor:
    """0, 1, …, 9, 0, 1, … : ``per_class`` samples of every class."""
    return torch.arange(per_class * num_classes) % num_classes
