"""One fingerprint-keyed cache: a folder per thing a run produced once and reuses (a pretrained LM,
a generator and its judges, sampled texts, a finished simulation).

``CacheEntry(root, kind, spec)`` is ``<root>/<kind>-<fingerprint of spec>``; ``spec`` is everything
that decides the contents (settings, a version, for data a digest of it). ``write(fill, meta)``
fills a temporary folder and renames it into place, so a reader sees a whole entry or none, and
concurrent writers (Tune trials sharing a storage) at worst write the same entry twice.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.results import atomic_dir, jsonable

META = "meta.json"


def fingerprint(spec: Any) -> str:
    """A short stable digest of ``spec`` (JSON-able values; arrays and tensors by their bytes)."""
    digest = hashlib.sha256()

    def feed(value: Any) -> Any:
        if hasattr(value, "numpy") and hasattr(value, "dtype"):  # a tensor
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            digest.update(np.ascontiguousarray(value).tobytes())
            return {"array": list(value.shape), "dtype": str(value.dtype)}
        if isinstance(value, dict):
            return {str(k): feed(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [feed(v) for v in value]
        return value

    digest.update(json.dumps(jsonable(feed(spec)), sort_keys=True).encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class CacheEntry:
    """``<root>/<kind>-<fingerprint(spec)>``: ready once written, with its ``meta.json``."""

    root: Path
    kind: str
    spec: Any

    @property
    def path(self) -> Path:
        return Path(self.root) / f"{self.kind}-{fingerprint(self.spec)}"

    @property
    def ready(self) -> bool:
        return (self.path / META).exists()

    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())

    def write(self, fill: Callable[[Path], None], meta: dict | None = None) -> Path:
        """``fill(folder)`` writes the files; ``meta`` (with the spec) is written last, marking it ready."""
        def write(tmp: Path) -> None:
            fill(tmp)
            (tmp / META).write_text(json.dumps(jsonable({"spec": self.spec, **(meta or {})})))

        atomic_dir(self.path, write)
        return self.path
