"""Steady-state training throughput of the unit runner on Ray Train against the same loop in bare torch.

    python benchmarks/unit_runner.py [--epochs 40] [--rows 6000] [--rounds 2] [--address ADDR]

The loop: a 64-256-256-10 MLP trained by SGD on ``--rows`` synthetic rows, batches of 64, one
thread (an epoch of about 0.2 s at the default size). Three arms, alternating over ``--rounds``:
bare torch in this process; ``run_units`` on one Ray Train worker reporting a checkpoint every
epoch (the old runner's behaviour: ``checkpoint_seconds=0``); and the runner at its defaults
(checkpoints at most every 10 s, metric reports at most every 5 s). Each arm's time is the wall
time of epochs 2.. (epoch 1 warms up), measured inside the training process; the best round is
kept. Prints epochs per second and each Train arm's ratio to bare torch (1.0 = no overhead).
"""
from __future__ import annotations

import argparse
import time

import torch

from pipelines import train
from pipelines.config import TrainConfig
from pipelines.ray_session import ensure_ray
from pipelines.units import Unit, Work, run_units


def setup(rows: int) -> Work:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=generator)
    y = torch.randint(0, 10, (rows,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return Work(saved=("model", "optimizer", "generator", "ticks"), model=model, x=x, y=y, generator=generator,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), ticks=[])


def epoch(work: Work, index: int) -> dict:
    order = torch.randperm(len(work.x), generator=work.generator)
    total = 0.0
    for start in range(0, len(order), 64):
        batch = order[start:start + 64]
        loss = torch.nn.functional.cross_entropy(work.model(work.x[batch]), work.y[batch])
        work.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        work.optimizer.step()
        total += loss.item()
    work.ticks.append(time.perf_counter())
    return {"loss": total}


def steady_seconds(ticks: list[float]) -> float:
    """Wall time of epochs 2.. (the ticks mark each epoch's end, after its report)."""
    return ticks[-1] - ticks[0]


def bare(epochs: int, rows: int) -> float:
    torch.set_num_threads(1)
    work = setup(rows)
    for index in range(epochs):
        epoch(work, index)
    return steady_seconds(work.ticks)


def loop(config: dict) -> None:
    session = train.WorkerSession(config)
    finish = lambda work, done: {"seconds": steady_seconds(work.ticks)}  # noqa: E731
    run_units(session, [Unit("fit", config["epochs"], lambda done: setup(config["rows"]), epoch, finish)])


def on_train(epochs: int, rows: int, checkpoint_seconds: float, storage: str, name: str) -> float:
    cfg = TrainConfig(checkpoint_seconds=checkpoint_seconds)
    result = train.fit(loop, {"epochs": epochs, "rows": rows}, cfg, name=name, storage=storage)
    return train.read_state(result.checkpoint)["done"]["fit"]["seconds"]


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else local Ray)")
    args = parser.parse_args()
    ensure_ray(args.address)
    best = {"bare torch": float("inf"), "Train, checkpoint every epoch": float("inf"),
            "Train, runner defaults": float("inf")}
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.rounds):
            best["bare torch"] = min(best["bare torch"], bare(args.epochs, args.rows))
            best["Train, checkpoint every epoch"] = min(best["Train, checkpoint every epoch"], on_train(
                args.epochs, args.rows, 0.0, storage, f"every-{r}"))
            best["Train, runner defaults"] = min(best["Train, runner defaults"], on_train(
                args.epochs, args.rows, TrainConfig().checkpoint_seconds, storage, f"defaults-{r}"))
    steady = args.epochs - 1
    for name, seconds in best.items():
        print(f"{name:<32} {steady / seconds:7.2f} epochs/s   ratio to bare torch {best['bare torch'] / seconds:.2f}")


if __name__ == "__main__":
    main()
