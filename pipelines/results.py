"""The out-dir of a run: resolved config, metrics, parquet tables and plots, all written atomically."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipelines.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temp file beside ``path``, then rename it into place (with the mode the
    user's umask gives a new file, not the temp file's private 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_dir(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temp folder beside ``path``, then rename it into place, replacing any
    older folder there (concurrent writers, e.g. Tune trials filling one cache, may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the Agg backend (no display): a pipeline's figure, saved by the spine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def columns(rows: list[dict[str, Any]], keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Rows of records → a table of columns (``keys``, default every key in first-seen order; a row
    without a key holds NaN there)."""
    keys = keys or list(dict.fromkeys(k for row in rows for k in row))
    return {k: np.array([row.get(k, np.nan) for row in rows]) for k in keys}


def group_means(table: dict[str, np.ndarray], by: str) -> dict[str, dict[str, float]]:
    """Mean per value of column ``by`` (first-seen order) of every numeric column that is not all NaN
    there, other than ``by`` and ``seed``."""
    out: dict[str, dict[str, float]] = {}
    for group in dict.fromkeys(table[by]):
        rows = table[by] == group
        out[str(group)] = {k: float(np.mean(v[rows].astype(float))) for k, v in table.items()
                           if k not in (by, "seed") and np.issubdtype(np.asarray(v).dtype, np.number)
                           and not np.isnan(v[rows].astype(float)).all()}
    return out


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


class RunDir:
    """One run's output folder. Re-using it with the same config resumes; another config is refused."""

    def __init__(self, path: str | Path, method_id: str):
        self.path = Path(path).expanduser().resolve()
        self.method_id = method_id

    @property
    def storage(self) -> str:
        """Ray Train/Tune storage root (absolute) for this run's checkpoints."""
        return str(self.path / "ray")

    def claim(self, config: dict[str, Any]) -> bool:
        """Write ``config.yaml``; return True if the folder already held this run (resume)."""
        target = self.path / "config.yaml"
        resolved = {"method": self.method_id, **config}
        if target.exists():
            try:
                previous = yaml.safe_load(target.read_text())
            except yaml.YAMLError:
                previous = None
            if previous != resolved:
                raise UserError(f"{self.path} holds a run with another config; choose a new --out")
            return True
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"{self.path} is not empty and holds no gradworks run; choose a new --out")
        self.write_yaml("config.yaml", resolved)
        return False

    def move_aside(self) -> Path | None:
        """Rename a folder that holds a run to ``<name>.previous-<stamp>``; where it went, or None."""
        if not (self.path / "config.yaml").exists():
            return None
        target = self.path.with_name(f"{self.path.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.path, target)
        return target

    def write_yaml(self, name: str, data: dict[str, Any]) -> Path:
        path = self.path / name
        atomic_write(path, lambda p: p.write_text(yaml.safe_dump(jsonable(data), sort_keys=False)))
        return path

    def write_json(self, name: str, data: Any) -> Path:
        path = self.path / name
        atomic_write(path, lambda p: p.write_text(json.dumps(jsonable(data), indent=2) + "\n"))
        return path

    def write_table(self, name: str, columns: dict[str, Any]) -> Path:
        """Write equal-length columns as parquet."""
        table = pa.table({k: np.asarray(v) for k, v in columns.items()})
        path = self.path / name
        atomic_write(path, lambda p: pq.write_table(table, p))
        return path

    def save_figure(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        path = self.path / name
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        return path

    def log(self, message: str) -> None:
        """Progress line on stderr."""
        print(f"[{time.strftime('%H:%M:%S')} {self.method_id}] {message}", file=sys.stderr, flush=True)
