"""Run a federation (FedAgain or a Flower baseline) with Flower's simulation engine on Ray."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import numpy as np
import ray
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from pydantic import Field, ValidationInfo, field_validator

from federated.apps import ClientSettings, build_model, federation, make_client_app
from federated.autoencoder import ConvAutoencoder, reconstruction_error
from federated.strategies import STRATEGIES, StrategyName, make_strategy


class FedSettings(ClientSettings):
    """The one federated settings model: data, clients, server and Ray resources (a method's config
    derives it)."""

    strategy: StrategyName = Field("fedagain", description=f"aggregation: {', '.join(STRATEGIES)}")
    rounds: int = Field(15, ge=1)
    fraction_fit: float = Field(0.5, gt=0, le=1, description="share of clients sampled per round")
    min_fit_clients: int = Field(2, ge=1, description="sampled per round: max(int(clients × fraction_fit), this)")
    fraction_evaluate: float = Field(0.0, ge=0, le=1, description="federated evaluation share (0: none)")
    trimmed_beta: float = Field(0.2, ge=0, lt=0.5, description="fedtrimmedavg")
    krum_malicious: int = Field(0, ge=0, description="krum's assumed number of malicious clients")
    client_cpus: float = Field(1.0, gt=0, description="CPUs per client actor")
    client_gpus: float | None = Field(None, ge=0, description="GPUs per client actor (default: use_gpu)")
    round_timeout: float = Field(120.0, gt=0, description="seconds a round waits for replies")

    @field_validator("min_fit_clients")
    @classmethod
    def _sample_fits(cls, sampled: int, info: ValidationInfo) -> int:
        clients = info.data.get("clients")
        if clients is not None and sampled > clients:
            raise ValueError(f"{sampled} clients sampled per round but only clients={clients} exist")
        return sampled

    @property
    def gpus_per_client(self) -> float:
        """GPUs per client actor: ``client_gpus``, else one with ``use_gpu``."""
        return self.client_gpus if self.client_gpus is not None else float(self.use_gpu)


def fitting_client_cpus(wanted: float, wait_s: float = 60.0) -> float:
    """CPUs per client actor such that Flower's pool, int(total / c) actors, fits in the CPUs free
    now (Tune trials hold some): n actors of free / n CPUs, n <= free / wanted and
    n < free / (total - free). Waits up to ``wait_s`` for a previous simulation's actors to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        total, free = ray.cluster_resources()["CPU"], ray.available_resources().get("CPU", 0.0)
        n = max(1, int(free // wanted))
        if total > free:
            n = min(n, math.ceil(free / (total - free)) - 1)
        if n >= 1:
            return free / n
        if time.monotonic() > deadline:
            raise RuntimeError(f"{free:g} of {total:g} CPUs free: too few for a Flower simulation")
        time.sleep(1.0)


@dataclass
class SimulationResult:
    settings: FedSettings
    state: dict[str, np.ndarray]  # final global state dict
    train_metrics: dict[int, dict]  # round -> clients' mean metrics (+ failures)
    evaluate_metrics: dict[int, dict]  # round -> federated evaluation (+ failures)
    server_metrics: dict[int, dict]  # round (0 = initial) -> test_mse, seconds, on_round's metrics
    trust: list[dict]  # FedAgain: round, partition_id, benchmark_error, divergence, tau, weight
    failures: dict[int, dict[str, int]]  # round -> {"train": n, "evaluate": m} failed replies
    roles: dict[int, str]  # partition id -> clean | corrupted:<name>@<severity> | forger

    def model(self) -> ConvAutoencoder:
        """The final global autoencoder (eval mode)."""
        image_shape = federation(self.settings).test.shape[1:]
        model = build_model(self.settings, image_shape)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in self.state.items()})
        return model.eval()

    def trust_rows(self) -> list[dict]:
        """FedAgain's trust rows with each client's role, its kind and its relative weight (weight ×
        clients aggregated that round: 1 = an equal share)."""
        per_round = Counter(row["round"] for row in self.trust)
        return [{**row, "role": self.roles[row["partition_id"]], "kind": self.roles[row["partition_id"]].split(":")[0],
                 "relative_weight": row["weight"] * per_round[row["round"]]} for row in self.trust]

    def round_rows(self) -> list[dict]:
        """Per round (0 = the initial model): the clean test MSE, wall seconds and failed replies."""
        return [{"round": r, "test_mse": m["test_mse"], "seconds": m["seconds"],
                 "train_failures": self.failures.get(r, {}).get("train", 0),
                 "evaluate_failures": self.failures.get(r, {}).get("evaluate", 0)}
                for r, m in sorted(self.server_metrics.items())]


def _strategy_kwargs(s: FedSettings) -> dict:
    kwargs = dict(
        fraction_train=s.fraction_fit, min_train_nodes=s.min_fit_clients,
        fraction_evaluate=s.fraction_evaluate, min_evaluate_nodes=1,
        min_available_nodes=s.clients,
    )
    if s.strategy == "fedtrimmedavg":
        kwargs["beta"] = s.trimmed_beta
    if s.strategy == "krum":
        kwargs["num_malicious_nodes"] = s.krum_malicious
    return kwargs


@contextmanager
def _keep_running_ray():
    """Flower's RayBackend.terminate() ends with ray.shutdown(). When Ray was already running
    (a pipeline's or a test session's instance), stop only the client actors instead."""
    if not ray.is_initialized():
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    def terminate(backend: RayBackend) -> None:
        if backend.pool:
            backend.pool.terminate_all_actors()

    with mock.patch.object(RayBackend, "terminate", terminate):
        yield


def simulate(
    settings: FedSettings, on_round: Callable[[int, ConvAutoencoder], dict] | None = None
) -> SimulationResult:
    """Run ``settings.rounds`` rounds with ``settings.clients`` virtual clients
    (``client_cpus`` and ``gpus_per_client`` each) on Ray, reusing a running Ray instance if there is one.

    After each round the server records the clean test MSE, the round's wall-clock seconds
    (training and federated evaluation; round 0 is the initial model) and
    ``on_round(round, global model)``'s metrics. A client actor whose process dies is
    restarted by Ray; its message counts as a failure of that round.
    """
    fed = federation(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        initial = ArrayRecord(build_model(settings, fed.test.shape[1:]).state_dict())
    strategy = make_strategy(settings.strategy, **_strategy_kwargs(settings))
    holder = {}
    clock = [time.perf_counter()]

    def server_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seconds = time.perf_counter() - clock[0]
        model = build_model(settings, fed.test.shape[1:])
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = {"test_mse": float(reconstruction_error(model, fed.test).mean()), "seconds": seconds}
        metrics.update(on_round(server_round, model) if on_round else {})
        clock[0] = time.perf_counter()
        return MetricRecord(metrics)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["result"] = strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=settings.rounds,
            timeout=settings.round_timeout, evaluate_fn=server_eval,
        )

    with _keep_running_ray():
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(settings),
            num_supernodes=settings.clients,
            backend_name="ray",
            backend_config={
                # passed to the actors' options(): restart a dead client; never join the
                # caller's placement group (a Tune trial's bundle would not fit them)
                "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": settings.gpus_per_client,
                                     "max_restarts": -1, "placement_group_capture_child_tasks": False},
                "init_args": {"address": "local"},
            },
        )
    if "result" not in holder:
        raise RuntimeError("the ServerApp ended without a result; see the Flower log above")
    result = holder["result"]
    arrays = result.arrays if len(result.arrays) else initial
    return SimulationResult(
        settings=settings,
        state={key: array.numpy() for key, array in arrays.items()},
        train_metrics={r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        evaluate_metrics={r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        server_metrics={r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
        trust=list(getattr(strategy, "trust", [])),
        failures=dict(strategy.failures),
        roles={pid: str(role) for pid, role in enumerate(fed.roles)},
    )
