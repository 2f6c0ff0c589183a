"""Metrics of a batch of class-conditional samples under the judges.

All images are clamped to the data range [−1, 1] first (as decoding to pixels would). With the gold
classifier g (the evaluation classifier) and its penultimate features φ:
- class_precision = mean[argmax g(x) = c], the share of samples recognised as their requested class;
- proxy_reward / gold_reward = mean log p(c | x) under the proxy / gold classifier;
- frechet_distance, precision, recall: Fréchet distance and k-NN precision/recall of φ(samples)
  against φ(real digits);
- diversity = mean over classes of the mean pairwise distance ‖φ(x_i) − φ(x_j)‖ within the class.
:class:`Evaluation` holds what a method scores with: the cached judges, the gold features of the real
digits and the DDIM schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import Tensor

from methods.generative.data import load_digit_images
from methods.generative.judges import Judges, class_log_prob, extract_features, frechet_distance, precision_recall
from methods.generative.pretrain import GenerativeConfig, judge_spec, load_judges
from methods.generative.samplers import Predictor, sample_ddim
from methods.generative.schedules import make_ddim_scheduler, make_ddpm_scheduler
from pipelines.results import subplots


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


@dataclass(frozen=True)
class Evaluation:
    judges: Judges
    real: Tensor  # gold features of the real digits
    scheduler: DDIMScheduler

    def sample(self, predict: Predictor, labels: Tensor, eta: float, seed: int) -> tuple[dict[str, float], Tensor]:
        """``sample_metrics`` of a DDIM chain from the noise of ``seed``, and its samples in [−1, 1]."""
        with torch.no_grad():
            x = sample_ddim(predict, self.scheduler, (len(labels), 1, 8, 8), eta=eta,
                            generator=torch.Generator().manual_seed(seed)).sample
        return sample_metrics(x, labels, self.judges, self.real), x.clamp(-1, 1)


def load_evaluation(root: Path, cfg: GenerativeConfig) -> Evaluation:
    """The cached judges of ``cfg``, the gold features of the digits and a DDIM schedule of ``num_inference_steps``."""
    judges = load_judges(root, judge_spec(cfg))
    return Evaluation(judges, extract_features(judges.gold, load_digit_images()[0]),
                      make_ddim_scheduler(make_ddpm_scheduler(), cfg.num_inference_steps))


def balanced_labels(per_class: int, num_classes: int = 10) -> Tensor:
    """0, 1, …, 9, 0, 1, … : ``per_class`` samples of every class."""
    return torch.arange(per_class * num_classes) % num_classes


def plot_sample_rows(rows: dict[str, Tensor], row_height: float = 0.8):
    """One row of digits per title (``rows``: title → images (N, 1, H, W) in [−1, 1])."""
    fig, axes = subplots(len(rows), 1, figsize=(10, row_height * len(rows) + 0.5))
    for ax, (title, grid) in zip(np.atleast_1d(axes), rows.items()):
        ax.imshow(torch.cat(list(grid[:, 0]), dim=1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_axis_off()
        ax.set_title(title, fontsize=8, loc="left")
    return fig
