"""A thin layer over Ray Train's ``TorchTrainer``.

Driver side: :func:`fit` builds ``ScalingConfig`` / ``RunConfig`` from the method config, with a
deterministic run name under the run's storage so that re-running with the same out dir resumes
from the latest checkpoint. Worker side: :class:`WorkerSession` restores the latest state and
reports metrics with a checkpoint (rank 0 writes it, every rank reports).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Callable

import torch

from pipelines.config import MethodConfig

STATE_FILE = "state.pt"


def fit(loop: Callable[[dict], None], loop_config: dict[str, Any], cfg: MethodConfig, *, name: str,
        storage: str | None, datasets: dict | None = None, callbacks: list | None = None):
    """Run ``loop`` on ``cfg.num_workers`` Train workers; return the ``Result`` (raises on failure)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()


def read_state(checkpoint) -> dict | None:
    """The state dict saved in a Train checkpoint (tensors and plain containers only)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


class WorkerSession:
    """Per-worker view of the run: rank, device, the restored state, and reporting."""

    def __init__(self, checkpoint_every: int = 1):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.checkpoint_every = checkpoint_every
        self.state = read_state(ray.train.get_checkpoint())
        self._reports = 0
        # Train local mode (num_workers=0) keeps a reported checkpoint where it lies instead of
        # copying it to storage, so its folder must outlive the report for the driver to read it.
        from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

        self._local = not get_train_fn_utils().is_distributed()
        self._local_dir: str | None = None
        quiet_console("ray.train")

    @property
    def resumed(self) -> bool:
        return self.state is not None

    def report(self, metrics: dict[str, Any], state: dict | None = None, *, force: bool = False) -> None:
        """Every rank reports; rank 0 attaches ``state`` as a checkpoint every ``checkpoint_every`` calls."""
        import ray.train

        self._reports += 1
        due = state is not None and (force or self._reports % self.checkpoint_every == 0)
        if not (due and self.rank == 0):
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix="gradworks-checkpoint-")
        torch.save(state, os.path.join(tmp, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self._local:  # keep only the latest local checkpoint (the one the driver reads)
            tmp, self._local_dir = self._local_dir, tmp
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _all(self, value: Any) -> list:
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Concatenate per-rank tensors (e.g. per-example scores of each shard) on every rank."""
        parts = self._all({k: v.cpu() for k, v in tensors.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in tensors}

    def smallest(self, value: int) -> int:
        """Minimum of ``value`` over ranks: DDP needs the same number of steps on every rank."""
        return min(self._all(value))


class _RayInfoFilter(logging.Filter):
    """Drops records below WARNING that Ray's own modules logged; keeps everything else."""

    def __init__(self):
        super().__init__()
        import ray

        self.ray_dir = os.path.dirname(ray.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.ray_dir)


def quiet_console(logger_name: str) -> None:
    """Keep Ray's per-report INFO lines in the log files, out of the console.

    Train shares ``logger_name``'s console handler with the root logger, which also carries the
    workers' ``print`` output (progress lines) and Ray modules' INFO records: the handler drops
    only records below WARNING that come from Ray's own code.
    """
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger(logger_name).handlers:
        if isinstance(handler, PlainRayHandler) and not any(isinstance(f, _RayInfoFilter) for f in handler.filters):
            handler.addFilter(_RayInfoFilter())


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Move to the worker's device and wrap in DDP when there are several workers."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """All-reduce the mean gradient over Train workers, for models that skip DDP (e.g. called several
    times per backward)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
