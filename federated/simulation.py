"""Run a federation (FedAgain or a Flower baseline) with Flower's simulation engine on Ray."""

from __future__ import annotations

import time
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
from pydantic import Field, model_validator

from federated.apps import ClientSettings, build_model, federation, make_client_app
from federated.autoencoder import ConvAutoencoder, reconstruction_error
from federated.strategies import StrategyName, make_strategy


class FedSettings(ClientSettings):
    """Federation, server and resource settings (client data and training inherited)."""

    strategy: StrategyName = "fedagain"
    num_rounds: int = Field(15, ge=1)
    fraction_train: float = Field(0.5, gt=0, le=1)
    min_train_clients: int = Field(2, ge=1)  # sampled per round: max(int(K f), this)
    fraction_evaluate: float = Field(0.5, ge=0, le=1)  # 0 skips federated evaluation
    trimmed_beta: float = Field(0.2, ge=0, lt=0.5)  # fedtrimmedavg
    krum_malicious: int = Field(0, ge=0)  # krum's assumed number of malicious clients
    num_cpus: float = Field(1.0, gt=0)  # per client actor
    num_gpus: float = Field(0.0, ge=0)  # per client actor
    ray_num_cpus: int | None = Field(None, ge=1)  # only used when simulate() starts Ray
    round_timeout: float = Field(120.0, gt=0)  # seconds to wait for a round's replies

    @model_validator(mode="after")
    def _sample_fits(self) -> FedSettings:
        if self.min_train_clients > self.num_clients:
            raise ValueError("min_train_clients exceeds num_clients")
        return self


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


def _strategy_kwargs(s: FedSettings) -> dict:
    kwargs = dict(
        fraction_train=s.fraction_train, min_train_nodes=s.min_train_clients,
        fraction_evaluate=s.fraction_evaluate, min_evaluate_nodes=1,
        min_available_nodes=s.num_clients,
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
    """Run ``settings.num_rounds`` rounds with ``settings.num_clients`` virtual clients
    (``num_cpus`` and ``num_gpus`` each) on Ray, reusing a running Ray instance if there is one.

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
            grid=grid, initial_arrays=initial, num_rounds=settings.num_rounds,
            timeout=settings.round_timeout, evaluate_fn=server_eval,
        )

    init_args = {"address": "local"}
    if settings.ray_num_cpus:
        init_args["num_cpus"] = settings.ray_num_cpus
    with _keep_running_ray():
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(settings),
            num_supernodes=settings.num_clients,
            backend_name="ray",
            backend_config={
                # passed to the actors' options(): restart a dead client; never join the
                # caller's placement group (a Tune trial's bundle would not fit them)
                "client_resources": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus,
                                     "max_restarts": -1, "placement_group_capture_child_tasks": False},
                "init_args": init_args,
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
