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
import threading
from typing import Any, Callable

import torch

from pipelines.config import TrainConfig

STATE_FILE = "state.pt"


def fit(loop: Callable[[dict], None], loop_config: dict[str, Any], cfg: TrainConfig, *, name: str,
        storage: str | None, datasets: dict | None = None, callbacks: list | None = None):
    """Run ``loop`` on ``cfg.num_workers`` Train workers; return the ``Result`` (raises on failure).

    ``loop_config`` gains ``"session"``, the settings :class:`WorkerSession` reads on each worker.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    session = {"local": cfg.num_workers == 0, "threads": max(1, int(cfg.cpus_per_worker)),
               "checkpoint_every": cfg.checkpoint_every, "checkpoint_seconds": cfg.checkpoint_seconds}
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "session": session},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    return _interruptible(trainer.fit)


def _interruptible(call: Callable[[], Any]) -> Any:
    """``call()``, on a helper thread when this is the main thread, so that Ctrl-C reaches the caller as
    ``KeyboardInterrupt`` (Train registers a SIGINT handler of its own on the main thread, which ends the
    process with Ray's exit code). The run's workers stop with the driver; a re-run resumes them."""
    if threading.current_thread() is not threading.main_thread():
        return call()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def read_state(checkpoint) -> dict | None:
    """The state dict saved in a Train checkpoint (tensors and plain containers only)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


class WorkerSession:
    """Per-worker view of the run: rank, device, the restored state, checkpoint settings, reporting.

    Built from the loop config that :func:`fit` passed (its ``"session"`` settings); sets the
    worker's torch threads.
    """

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        settings = loop_config["session"]
        torch.set_num_threads(settings["threads"])
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.checkpoint_every: int = settings["checkpoint_every"]
        self.checkpoint_seconds: float = settings["checkpoint_seconds"]
        self.state = read_state(ray.train.get_checkpoint())
        # Train local mode (num_workers=0) keeps a reported checkpoint where it lies instead of
        # copying it to storage, so its folder must outlive the report for the driver to read it.
        self._local = settings["local"]
        self._local_dir: str | None = None
        quiet_console("ray.train")

    def report(self, metrics: dict[str, Any], state: dict | None = None) -> None:
        """Every rank reports ``metrics``; rank 0 attaches ``state`` (if given) as a checkpoint."""
        import ray.train

        if state is None or self.rank != 0:
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

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions every rank must take alike, e.g. when to report)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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
    workers' ``print`` output (progress lines) and Ray modules' INFO records: its console handlers
    (stream handlers that are not files) drop only records below WARNING from Ray's own code.
    """
    for handler in logging.getLogger(logger_name).handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _RayInfoFilter) for f in handler.filters):
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
