"""fedagain through the CLI: config checks (exit 2 before Ray), and one tiny run with failing clients."""
import json

import pyarrow.parquet as pq
import pytest
import yaml

from federated.simulation import FedSettings, fitting_client_cpus
from methods.federated import fedagain
from pipelines.cli import main


@pytest.mark.parametrize("sets, message", [
    (["fraction_fit=0"], "fraction_fit: Input should be greater than 0"),
    (["fraction_fit=1.5"], "fraction_fit: Input should be less than or equal to 1"),
    (["clients=4", "min_fit_clients=5"], "5 clients sampled per round but only clients=4 exist"),
    (["strategy=fedprox"], "unknown strategy 'fedprox'"),
    (["corruptions=[rain]"], "unknown corruptions ['rain']"),
    (["clients=4", "corrupted_ratio=0.5", "forgers=3"], "forgers: Value error"),
    (["vanish_clients=[10]"], "partition ids must be in [0, clients=10)"),
])
def test_bad_config_is_one_line_and_exit_2(sets, message, capsys, tmp_path):
    assert main(["run", "fedagain", "--set", *sets, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gradworks: error: invalid config:") and message in err
    assert not (tmp_path / "out").exists()


def test_profiles_map_onto_the_federation_settings():
    for profile in fedagain.PIPELINE.profiles.values():
        cfg = fedagain.FedAgainConfig(**profile)
        settings = fedagain.Arm("forgers", "krum", cfg.seed, cfg.forgers).settings(cfg)
        assert isinstance(settings, FedSettings)
        assert (settings.clients, settings.rounds, settings.fraction_fit) == (
            cfg.clients, cfg.rounds, cfg.fraction_fit)
        assert settings.corrupted_ratio == cfg.corrupted_ratio and settings.strategy == "krum"
    assert fedagain.FedAgainConfig(use_gpu=True).gpus_per_client == 1.0


@pytest.mark.parametrize("total, free, wanted", [(2, 1.8, 1), (2, 2, 1), (16, 15.8, 1), (8, 7.9, 2.5)])
def test_trial_client_cpus_fit_the_free_cpus(monkeypatch, total, free, wanted):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": total})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": free})
    cpus = fitting_client_cpus(wanted)
    pool = int(total / cpus)  # Flower's actor pool size
    assert pool >= 1 and pool * cpus <= free + 1e-9


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_run_four_clients_two_rounds_with_a_raising_and_a_vanishing_client(ray_session, tmp_path, monkeypatch):
    out = tmp_path / "run"
    sets = ["clients=4", "rounds=2", "fraction_fit=1.0", "corrupted_ratio=0.25", "local_epochs=1",
            "width=4", "latent_dim=8", "corruptions=[gaussian_noise,darkness]", "severities=[1,5]",
            "crash_clients=[3]", "vanish_clients=[2]"]
    assert main(["run", "fedagain", "--set", *sets, "--out", str(out)]) == 0

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "fedagain" and config["clients"] == 4 and config["strategy"] == "fedagain"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["deviations"] and 0.0 <= metrics["f1"] <= 1.0
    assert set(metrics["roles"]) == {"0", "1", "2", "3"}
    # the raising and the vanished client fail every round (a message sent to the restarting
    # actor may fail too); the rounds aggregate the rest and the run completes
    assert set(metrics["failures"]) == {"1", "2"}
    assert all(f["train"] >= 2 for f in metrics["failures"].values())

    results = pq.read_table(out / "results.parquet").to_pandas()
    assert sorted(zip(results.corruption, results.severity)) == [
        ("darkness", 1), ("darkness", 5), ("gaussian_noise", 1), ("gaussian_noise", 5)]
    assert {"auc", "threshold", "precision", "recall", "f1"} <= set(results.columns)
    trust = pq.read_table(out / "trust.parquet").to_pandas()
    assert set(trust["round"]) == {1, 2} and not set(trust.partition_id) & {2, 3}
    assert trust.groupby("round").weight.sum().to_numpy() == pytest.approx([1.0, 1.0])
    rounds = pq.read_table(out / "rounds.parquet").to_pandas()
    assert list(rounds["round"]) == [0, 1, 2] and (rounds.train_failures[1:] >= 2).all()
    for plot in ("f1_heatmap.png", "trust.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"

    # the finished simulation is cached under units/: the same command, interrupted before it wrote
    # metrics.json (a finished run is not re-run), resumes from it without simulating
    assert len(list((out / "units").glob("simulation-*/simulation.json"))) == 1
    (out / "metrics.json").unlink()
    monkeypatch.setattr(fedagain, "simulate", lambda *args, **kwargs: pytest.fail("the resumed run simulated"))
    assert main(["run", "fedagain", "--set", *sets, "--out", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["resumed"] and again["f1"] == metrics["f1"] and again["failures"] == metrics["failures"]


def test_claims_pair_fedagain_and_fedavg_by_seed_with_their_margins():
    from pipelines.pipeline import Outputs
    from pipelines.results import columns

    cfg = fedagain.FedAgainConfig(seeds=3, severities=[1, 5], forgers=2)
    det = [{"scenario": scenario, "strategy": strategy, "seed": seed, "corruption": "darkness", "severity": severity,
            **dict.fromkeys(fedagain.SCORES, (0.8 if strategy == "fedagain" else 0.5) + 0.01 * seed
                            + (0.05 * severity if strategy == "fedagain" else 0.0))}
           for scenario in ("corrupted", "forgers") for strategy in ("fedagain", "fedavg")
           for seed in range(3) for severity in (1, 5)]
    trust = [{"scenario": scenario, "strategy": "fedagain", "seed": seed, "kind": kind,
              "relative_weight": {"clean": 1.2, "corrupted": 0.5, "forger": 0.1}[kind] + 0.02 * seed}
             for scenario in ("corrupted", "forgers") for seed in range(3) for kind in ("clean", "corrupted", "forger")]
    found = fedagain.claims(cfg, [], Outputs({"results": columns(det), "trust": columns(trust)}))
    assert [c.margin for c in found] == [-0.01, -0.01, 0.1, 0.01, -0.01, 0.1]
    assert all(c.pairs == [0, 1, 2] and c.seeds == 3 and "paired" in c.test for c in found)
    assert found[0].method == pytest.approx(0.8 + 0.01 + 0.15) and found[0].baseline == pytest.approx(0.51)
    assert found[2].method == pytest.approx(0.52) and found[2].baseline == pytest.approx(1.22)
    assert found[3].difference == pytest.approx(0.2)  # the gain grows by 4 × 0.05 from severity 1 to 5
    assert all(c.verdict == "reproduced" for c in found)
