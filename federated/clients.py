"""Federation data: datasets, IID / Dirichlet splits, corrupted clients and forgers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from methods.engines.corruptions import CORRUPTIONS, CorruptionNames, corrupt
from pipelines.config import MethodConfig

Attack = Literal["scale", "signflip", "noise"]


class DataSettings(MethodConfig):
    """How the federation's data is built (deterministic given ``seed``); the root of the one
    federated settings model (``federated.simulation.FedSettings``)."""

    dataset: Literal["digits", "sample_crops"] = Field("digits", description="1×8×8 digits or 3×32×32 photo crops")
    normal_classes: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
    test_fraction: float = Field(0.25, gt=0, lt=1, description="clean images held out for the test set")
    clients: int = Field(10, ge=2)
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration")
    corrupted_ratio: float = Field(0.3, ge=0, lt=1, description="clients with one corruption at severity 3-5")
    corruptions: CorruptionNames = Field(sorted(CORRUPTIONS), min_length=1)
    forgers: int = Field(0, ge=0, description="clients that send crafted updates")
    forger_attack: Attack = "signflip"
    forger_scale: float = Field(10.0, gt=0)

    @field_validator("forgers")
    @classmethod
    def _roles_fit(cls, forgers: int, info: ValidationInfo) -> int:
        """Checked against ``clients`` (validated earlier), so the error names the user's keys."""
        clients = info.data.get("clients")
        if clients is not None and int(info.data.get("corrupted_ratio", 0) * clients) + forgers > clients:
            raise ValueError(f"int(corrupted_ratio × clients) + forgers exceeds clients={clients}")
        return forgers


@dataclass(frozen=True)
class Role:
    """A client's role: clean, persistently corrupted (one corruption, severity 3-5), or forger."""

    kind: Literal["clean", "corrupted", "forger"] = "clean"
    corruption: str | None = None
    severity: int | None = None

    def __str__(self) -> str:
        return f"corrupted:{self.corruption}@{self.severity}" if self.corruption else self.kind


@dataclass
class Federation:
    train: list[np.ndarray]  # per client, (n_i, C, H, W) in [0, 1], corruption applied
    roles: list[Role]
    test: np.ndarray  # clean held-out images


def load_images(dataset: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, H, W) float32 in [0, 1] and labels; offline (bundled with scikit-learn).

    ``digits``: the 1797 8x8 digits, label = digit. ``sample_crops``: 600 random 32x32 crops
    of each of the two sample photos, label = photo index.
    """
    from sklearn.datasets import load_digits, load_sample_images

    if dataset == "digits":
        d = load_digits()
        return (d.images[:, None] / 16.0).astype(np.float32), d.target
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for label, img in enumerate(load_sample_images().images):
        rows = rng.integers(0, img.shape[0] - 32, 600)
        cols = rng.integers(0, img.shape[1] - 32, 600)
        crops += [img[r : r + 32, c : c + 32].transpose(2, 0, 1) for r, c in zip(rows, cols)]
        labels += [label] * 600
    return (np.stack(crops) / 255.0).astype(np.float32), np.array(labels)


def iid_split(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then ``array_split`` into equal shards (as the official script)."""
    return np.array_split(rng.permutation(n), num_clients)


def dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
    min_size: int = 2, max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skew split: for each class c, p_c ~ Dir(alpha 1_K) sets the clients' shares of c.

    Redrawn until every client has at least ``min_size`` samples.
    """
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts[:-1])):
                shard.extend(part.tolist())
        if min(map(len, shards)) >= min_size:
            return [np.array(sorted(s)) for s in shards]
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gives every client {min_size} samples")


def assign_roles(
    num_clients: int, corrupted_fraction: float, num_forgers: int, corruptions: list[str],
    rng: np.random.Generator,
) -> list[Role]:
    """int(fraction * K) random clients get one random corruption at severity 3-5; the next
    ``num_forgers`` of the same permutation are forgers; the rest are clean."""
    n_bad = int(corrupted_fraction * num_clients)
    perm = rng.permutation(num_clients)
    roles = [Role() for _ in range(num_clients)]
    for pid in perm[:n_bad]:
        roles[pid] = Role("corrupted", str(rng.choice(corruptions)), int(rng.integers(3, 6)))
    for pid in perm[n_bad : n_bad + num_forgers]:
        roles[pid] = Role("forger")
    return roles


def build_federation(s: DataSettings) -> Federation:
    """Normal-class images, test hold-out, client shards, roles, corrupted shards."""
    rng = np.random.default_rng(s.seed)
    images, labels = load_images(s.dataset, s.seed)
    keep = np.isin(labels, s.normal_classes)
    images, labels = images[keep], labels[keep]
    order = rng.permutation(len(images))
    n_test = int(round(s.test_fraction * len(images)))
    test, train = order[:n_test], order[n_test:]
    if s.partition == "iid":
        shards = [train[i] for i in iid_split(len(train), s.clients, rng)]
    else:
        shards = [train[i] for i in dirichlet_split(labels[train], s.clients, s.alpha, rng)]
    roles = assign_roles(s.clients, s.corrupted_ratio, s.forgers, s.corruptions, rng)
    data = [
        corrupt(images[idx], r.corruption, r.severity, np.random.default_rng([s.seed, pid]))
        if r.corruption else images[idx]
        for pid, (idx, r) in enumerate(zip(shards, roles))
    ]
    return Federation(train=data, roles=roles, test=images[test])


def forge(
    local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor], attack: Attack,
    scale: float, generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Crafted update from the honest one, Delta = theta_local - theta_global (float entries):
    ``scale``: theta_g + s Delta; ``signflip``: theta_g - s Delta;
    ``noise``: theta_g + s std(Delta) eps, eps ~ N(0, I) (std per tensor)."""
    out = {}
    for key, theta in local.items():
        if not theta.is_floating_point():
            out[key] = theta
            continue
        g = global_[key].to(theta.dtype)
        delta = theta - g
        if attack == "scale":
            out[key] = g + scale * delta
        elif attack == "signflip":
            out[key] = g - scale * delta
        else:
            eps = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
            out[key] = g + scale * delta.std(correction=0) * eps
    return out
