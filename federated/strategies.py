"""Flower strategies: FedAgain (dual-signal trust) and Flower's own baselines.

Every strategy from ``make_strategy`` counts per round the failed clients, those whose reply
carries an error (the ClientApp raised, or its process died) or never came before the round
timeout, aggregates the remaining replies, and adds ``failures`` to the round's metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from pydantic import AfterValidator

from federated import aggregation

PARTITION_KEY = "partition-id"
ERROR_KEY = "benchmark_error"
BENCHMARK_KEY = "benchmark-error"  # train config flag: the client reports ERROR_KEY


def _numpy(record: ArrayRecord) -> dict:
    return {key: array.numpy() for key, array in record.items()}


def mean_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's example-weighted mean of the clients' metrics, without the partition id."""
    metrics = aggregate_metricrecords(records, weighted_by_key)
    metrics.pop(PARTITION_KEY, None)
    return metrics


class FedAgain(FedAvg):
    """FedAgain: theta <- sum_i tau_i theta_i / sum_i tau_i, tau_i = 1 / ((e_i + 1e-6)(d_i + 1e-6)).

    e_i is the client's ``benchmark_error`` metric (global-model MSE on its data before
    training), which ``configure_train`` asks for; d_i = 1 - cos(theta_global, theta_i) is
    computed here from the arrays sent in ``configure_train``, which remembers them. ``trust``
    collects one row per (round, client): partition id, e_i, d_i, tau_i and normalised weight.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trust: list[dict] = []
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        config[BENCHMARK_KEY] = True
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        states = [_numpy(m.content[self.arrayrecord_key]) for m in valid]
        records = [next(iter(m.content.metric_records.values())) for m in valid]
        errors = [float(r[ERROR_KEY]) for r in records]
        new, tau, div = aggregation.fedagain(_numpy(self._global), states, errors)
        for r, e, d, t in zip(records, errors, div, tau):
            self.trust.append(
                {"round": server_round, "partition_id": int(r[PARTITION_KEY]),
                 "benchmark_error": e, "divergence": float(d), "tau": float(t),
                 "weight": float(t / tau.sum())}
            )
        arrays = ArrayRecord({key: Array(value) for key, value in new.items()})
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class CountFailures:
    """Strategy mixin: ``failures[round] = {"train": n, "evaluate": m}`` failed clients, error
    replies plus messages sent without a reply."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.failures: dict[int, dict[str, int]] = {}
        self._sent: dict[str, int] = {}

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent["train"] = len(messages)
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent["evaluate"] = len(messages)
        return messages

    def _count(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
        replies = list(replies)
        missing = max(self._sent.get(stage, 0) - len(replies), 0)
        self.failures.setdefault(server_round, {})[stage] = missing + sum(m.has_error() for m in replies)
        return replies

    def aggregate_train(self, server_round, replies):
        replies = self._count(server_round, replies, "train")
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            metrics["failures"] = self.failures[server_round]["train"]
        return arrays, metrics

    def aggregate_evaluate(self, server_round, replies):
        replies = self._count(server_round, replies, "evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            metrics["failures"] = self.failures[server_round]["evaluate"]
        return metrics


STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedagain": FedAgain,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
_COUNTED = {name: type(cls.__name__, (CountFailures, cls), {}) for name, cls in STRATEGIES.items()}


def known_strategy(name: str) -> str:
    """Config validator: the name of a registered strategy."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return name


StrategyName = Annotated[str, AfterValidator(known_strategy)]


def make_strategy(name: str, **kwargs) -> FedAvg:
    """Strategy ``name`` built with Flower's keyword arguments (``fraction_train``, ``beta``
    for fedtrimmedavg, ``num_malicious_nodes`` for krum, ...), counting failed replies."""
    known_strategy(name)
    kwargs.setdefault("train_metrics_aggr_fn", mean_metrics)
    return _COUNTED[name](**kwargs)
