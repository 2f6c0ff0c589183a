"""Ray Data: datasets built from package-bundled data and synthetic generators.

Driver side builds ``ray.data.Dataset``s: classifier splits with rows ``{idx, x, y, y_clean,
flipped}``, and rows of token sequences or images (:func:`row_dataset`), preprocessed with
``map_batches``; worker side reads its shard with ``get_dataset_shard`` / ``iter_torch_batches``
(:func:`load_shard`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import ray.data

DatasetName = Literal["digits", "synthetic"]


@dataclass(frozen=True)
class Splits:
    """Train/val/test Ray datasets and what a model needs to know about them."""

    train: "ray.data.Dataset"
    val: "ray.data.Dataset"
    test: "ray.data.Dataset"
    input_shape: tuple[int, ...]
    num_classes: int
    flipped: np.ndarray  # train idx whose label was flipped

    def as_dict(self) -> dict:
        return {"train": self.train, "val": self.val, "test": self.test}


def raw_arrays(name: DatasetName, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) with raw pixel values and labels: sklearn digits, or a synthetic set."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images[:, None].astype(np.float32), bunch.target.astype(np.int64)
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2000, n_features=64, n_informative=24, n_redundant=8,
                               n_classes=10, n_clusters_per_class=1, class_sep=1.5, random_state=seed)
    return x.reshape(-1, 1, 8, 8).astype(np.float32), y.astype(np.int64)


def split_indices(y: np.ndarray, seed: int, test_fraction: float, val_fraction: float) -> dict[str, np.ndarray]:
    """Stratified train/val/test index split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction, stratify=y[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def choose_flips(train_idx: np.ndarray, y: np.ndarray, fraction: float, num_classes: int,
                 seed: int) -> dict[int, int]:
    """Pick ``fraction`` of the train examples and a new, different label for each."""
    rng = np.random.default_rng(seed + 7919)
    chosen = rng.choice(train_idx, size=int(round(fraction * len(train_idx))), replace=False)
    shift = rng.integers(1, num_classes, size=len(chosen))
    return {int(i): int((y[i] + s) % num_classes) for i, s in zip(chosen, shift)}


def rescale(batch: dict[str, np.ndarray], shift: float, scale: float) -> dict[str, np.ndarray]:
    """``map_batches`` UDF: x ← (x − shift) / scale, with train-set statistics."""
    batch["x"] = ((batch["x"] - shift) / scale).astype(np.float32)
    return batch


def inject_label_noise(batch: dict[str, np.ndarray], flips: dict[int, int]) -> dict[str, np.ndarray]:
    """``map_batches`` UDF: replace y by the chosen wrong label for flipped rows; keep y_clean."""
    batch["y_clean"] = batch["y"].copy()
    new = np.array([flips.get(int(i), -1) for i in batch["idx"]], dtype=np.int64)
    batch["flipped"] = new >= 0
    batch["y"] = np.where(batch["flipped"], new, batch["y"])
    return batch


def build_splits(name: DatasetName = "digits", *, seed: int = 0, test_fraction: float = 0.33,
                 val_fraction: float = 0.1, label_noise: float = 0.0,
                 normalize: Literal["standardize", "unit"] = "standardize") -> Splits:
    """Ray datasets for one run; label noise (if any) is injected into the train split only.

    ``standardize``: zero mean, unit variance; ``unit``: min–max to [0, 1] (the input range attacks
    assume). Statistics come from the train split.
    """
    import ray.data

    x, y = raw_arrays(name, seed)
    num_classes = int(y.max()) + 1
    parts = split_indices(y, seed, test_fraction, val_fraction)
    train_x = x[parts["train"]]
    if normalize == "unit":
        shift, scale = float(train_x.min()), float(train_x.max() - train_x.min())
    else:
        shift, scale = float(train_x.mean()), float(train_x.std())
    flips = choose_flips(parts["train"], y, label_noise, num_classes, seed) if label_noise > 0 else {}

    def dataset(split: str) -> ray.data.Dataset:
        idx = parts[split]
        return row_dataset({"idx": idx, "x": x[idx], "y": y[idx]}, (rescale, {"shift": shift, "scale": scale}),
                           (inject_label_noise, {"flips": flips if split == "train" else {}}))

    return Splits(train=dataset("train"), val=dataset("val"), test=dataset("test"),
                  input_shape=tuple(x.shape[1:]), num_classes=num_classes,
                  flipped=np.array(sorted(flips), dtype=np.int64))


def row_dataset(columns: dict[str, np.ndarray], *udfs: tuple) -> "ray.data.Dataset":
    """Rows ``{idx, **columns}`` (one per leading index: token sequences, images, …; ``idx`` defaults to
    the position) as a Ray dataset, preprocessed by ``map_batches`` with each ``(fn, kwargs)`` of ``udfs``."""
    import ray.data

    count = len(next(iter(columns.values())))
    columns = {"idx": np.arange(count), **columns}
    ds = ray.data.from_items([{k: v[i] for k, v in columns.items()} for i in range(count)], override_num_blocks=2)
    for fn, kwargs in udfs:  # small UDFs: a fraction of a CPU each, so they never wait behind Train workers
        ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_format="numpy", num_cpus=0.25)
    return ds


def attention_mask(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, np.ndarray]:
    """``map_batches`` UDF for right-padded token rows: attention_mask = (input_ids ≠ pad)."""
    batch["attention_mask"] = (batch["input_ids"] != pad_token_id).astype(np.int64)
    return batch


def load_shard(name: str, device=None) -> dict:
    """Worker side: read this worker's whole shard of dataset ``name`` into tensors (small data), rows
    sorted by ``idx`` where there is one: Ray Data hands blocks over in the order they finish, and the
    order of training rows must not depend on that race."""
    import ray.train
    import torch

    shard = ray.train.get_dataset_shard(name)
    if shard is None:
        raise ValueError(f"no dataset {name!r} was passed to the trainer")
    parts: dict[str, list] = {}
    for batch in shard.iter_torch_batches(batch_size=4096, device="cpu"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    rows = {k: torch.cat(v) for k, v in parts.items()}
    if "idx" in rows:
        order = torch.argsort(rows["idx"])
        rows = {k: v[order] for k, v in rows.items()}
    return {k: v.to(device) if device is not None else v for k, v in rows.items()}
