"""Federated core: FedAgain trust and aggregation, FedAvg, data, metrics, one simulation."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from federated import aggregation as agg  # noqa: E402
from federated.autoencoder import (  # noqa: E402
    ConvAutoencoder, benchmark_error, reconstruction_error,
)
from federated.clients import DataSettings, build_federation, dirichlet_split, forge  # noqa: E402
from federated.metrics import corruption_table, detection_metrics  # noqa: E402

torch.set_num_threads(1)


def _state(w, b, count=0):
    return {"w": np.asarray(w, np.float32), "b": np.asarray(b, np.float32),
            "bn.num_batches_tracked": np.asarray(count, np.int64)}


# --- FedAgain / FedAvg (pure) --------------------------------------------------------------


def test_divergence_is_one_minus_cosine_over_float_entries():
    g = _state([1.0, 0.0], [0.0], count=0)
    assert agg.divergence(g, _state([3.0, 0.0], [0.0], count=99)) == pytest.approx(0.0, abs=1e-12)
    assert agg.divergence(g, _state([0.0, 2.0], [0.0])) == pytest.approx(1.0)
    assert agg.divergence(g, _state([-1.0, 0.0], [0.0])) == pytest.approx(2.0)


def test_trust_formula():
    tau = agg.trust_scores([0.1, 0.0, -1.0], [0.5, 0.2, 0.2])
    expected = [1 / ((0.1 + 1e-6) * (0.5 + 1e-6)), 1 / (1e-6 * (0.2 + 1e-6))]
    np.testing.assert_allclose(tau[:2], expected)
    assert tau[2] == tau[1]  # a negative reported error is clamped to 0


def test_fedagain_trusts_identical_low_error_client_most():
    g = _state([1.0, 2.0, 3.0], [0.5], count=7)
    states = [
        _state([1.0, 2.0, 3.0], [0.5], count=10),  # identical floats, low error
        _state([1.2, 1.7, 3.1], [0.4], count=10),
        _state([-1.0, 2.0, -3.0], [0.5], count=10),  # divergent
    ]
    new, tau, d = agg.fedagain(g, states, errors=[0.01, 0.01, 0.01])
    weights = tau / tau.sum()
    assert weights.sum() == pytest.approx(1.0)
    assert np.argmax(weights) == 0 and np.argmin(weights) == 2
    assert d[0] == pytest.approx(0.0, abs=1e-9)
    expected = sum(w * s["w"].astype(np.float64) for w, s in zip(weights, states))
    np.testing.assert_allclose(new["w"], expected, rtol=1e-6)
    assert new["bn.num_batches_tracked"] == 7  # non-float entries keep the global value
    # with equal divergence, the lower benchmark error wins
    _, tau2, _ = agg.fedagain(g, [states[1], states[1]], errors=[0.5, 0.05])
    assert tau2[1] > tau2[0]


def test_aggregating_identical_states_returns_that_state():
    s = _state([0.3, -0.2], [1.5], count=4)
    new, _, _ = agg.fedagain(s, [s, s, s], errors=[0.2, 0.1, 0.3])
    for key in s:
        np.testing.assert_allclose(new[key], s[key], rtol=1e-6)
        assert new[key].dtype == s[key].dtype


def test_fedavg_weights_by_sample_counts():
    ref = _state([9.0, 9.0], [9.0], count=3)
    new = agg.fedavg([_state([0.0, 0.0], [0.0]), _state([4.0, 8.0], [1.0])], [1, 3], ref)
    np.testing.assert_allclose(new["w"], [3.0, 6.0])
    np.testing.assert_allclose(new["b"], [0.75])
    assert new["bn.num_batches_tracked"] == 3


# --- metrics ----------------------------------------------------------------------------


def test_detection_metrics_planted_case():
    m = detection_metrics(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6, 0.7]))
    assert m["auc"] == pytest.approx(15 / 16)
    assert m["threshold"] == pytest.approx(0.5)  # first of the tied Youden maxima
    assert (m["precision"], m["recall"]) == (1.0, 0.75)
    assert m["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert m["accuracy"] == pytest.approx(7 / 8)
    separated = detection_metrics(np.zeros(5), np.ones(5))
    assert separated["auc"] == separated["f1"] == 1.0
    diverged = detection_metrics(np.array([0.1, np.nan]), np.array([0.5, 0.6]))  # NaN model
    assert (diverged["auc"], diverged["recall"], diverged["f1"]) == (0.5, 0.0, 0.0)


def test_corruption_table_rows():
    x = np.random.default_rng(0).uniform(0.2, 0.4, size=(20, 1, 8, 8)).astype(np.float32)
    rows = corruption_table(lambda b: b.mean(axis=(1, 2, 3)), x, ["brightness", "darkness"], [1, 5])
    assert [(r["corruption"], r["severity"]) for r in rows] == [
        ("brightness", 1), ("brightness", 5), ("darkness", 1), ("darkness", 5)]
    assert rows[1]["auc"] == 1.0 and rows[3]["auc"] == 0.0  # darker images score lower


# --- model and data ---------------------------------------------------------------------


@pytest.mark.parametrize("channels,size", [(1, 8), (3, 16), (3, 32)])
def test_autoencoder_shapes_and_scores(channels, size):
    model = ConvAutoencoder(channels, size, latent_dim=32, width=4)
    x = np.random.default_rng(0).random((5, channels, size, size)).astype(np.float32)
    assert model(torch.as_tensor(x)).shape == x.shape
    assert model.encode(torch.as_tensor(x)).shape == (5, 32)
    scores = reconstruction_error(model, x)
    assert scores.shape == (5,) and np.all(scores > 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert benchmark_error(model, x, batch_size=2) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dirichlet_split_is_a_partition():
    labels = np.repeat(np.arange(5), 40)
    shards = dirichlet_split(labels, 6, alpha=0.3, rng=np.random.default_rng(0), min_size=2)
    joined = np.sort(np.concatenate(shards))
    np.testing.assert_array_equal(joined, np.arange(200))
    assert min(map(len, shards)) >= 2


def test_federation_roles_and_determinism():
    s = DataSettings(clients=10, corrupted_ratio=0.3, forgers=2, partition="dirichlet")
    a, b = build_federation(s), build_federation(s)
    kinds = [r.kind for r in a.roles]
    assert kinds.count("corrupted") == 3 and kinds.count("forger") == 2
    assert all(3 <= r.severity <= 5 for r in a.roles if r.kind == "corrupted")
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train))
    assert a.test.shape[1:] == (1, 8, 8)


def test_forge_attacks():
    g = {"w": torch.zeros(3), "n": torch.tensor(2)}
    local = {"w": torch.tensor([1.0, -1.0, 2.0]), "n": torch.tensor(5)}
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(forge(local, g, "scale", 10.0, gen)["w"], torch.tensor([10.0, -10.0, 20.0]))
    assert torch.equal(forge(local, g, "signflip", 1.0, gen)["w"], -local["w"])
    noisy = forge(local, g, "noise", 1.0, gen)
    assert noisy["w"].shape == (3,) and noisy["n"] == 5


# --- settings and strategies --------------------------------------------------------------


def test_settings_validation():
    from federated.simulation import FedSettings

    FedSettings(clients=4, min_fit_clients=4, fraction_fit=1.0)
    bad = [
        {"fraction_fit": 0.0}, {"fraction_fit": 1.5},
        {"clients": 4, "min_fit_clients": 5}, {"strategy": "fedprox"},
        {"corruptions": ["rain"]}, {"unknown_field": 1}, {"crash_clients": [10]},
        {"clients": 4, "corrupted_ratio": 0.5, "forgers": 3},
    ]
    for kwargs in bad:
        with pytest.raises(ValidationError):
            FedSettings(**kwargs)


def test_make_strategy_uses_flower_classes():
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

    from federated.strategies import STRATEGIES, FedAgain, make_strategy

    built = {name: make_strategy(name) for name in STRATEGIES}
    assert isinstance(built["fedagain"], FedAgain)
    assert isinstance(built["fedmedian"], FedMedian) and isinstance(built["krum"], Krum)
    assert make_strategy("fedtrimmedavg", beta=0.1).beta == 0.1
    assert isinstance(built["fedtrimmedavg"], FedTrimmedAvg)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedsgd")


# --- one end-to-end simulation on Ray ------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_simulation_survives_a_crashing_client(ray_session):
    from federated.simulation import FedSettings, simulate

    settings = FedSettings(
        strategy="fedagain", clients=4, rounds=2, fraction_fit=1.0,
        fraction_evaluate=1.0, normal_classes=[0], local_epochs=1, width=4, latent_dim=8,
        corrupted_ratio=0.25, forgers=1, crash_clients=[3], round_timeout=120,
    )
    result = simulate(settings)

    assert ray_session.is_initialized()  # a running Ray instance is left running
    assert result.failures == {1: {"train": 1, "evaluate": 1}, 2: {"train": 1, "evaluate": 1}}
    assert [result.train_metrics[r]["failures"] for r in (1, 2)] == [1, 1]
    for rnd in (1, 2):
        rows = [t for t in result.trust if t["round"] == rnd]
        assert sorted(t["partition_id"] for t in rows) == [0, 1, 2]
        assert sum(t["weight"] for t in rows) == pytest.approx(1.0)
    forger = next(pid for pid, role in result.roles.items() if role == "forger")
    assert all(t["weight"] < 0.1 for t in result.trust if t["partition_id"] == forger)
    assert set(result.server_metrics) == {0, 1, 2}
    model = result.model()
    assert reconstruction_error(model, build_federation(settings).test).shape[0] > 0
