"""End to end at tiny budget: run, sweep and reproduce through the CLI on the shared Ray session."""
import json

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TINY = ["inits=1", "score_epochs=1", "retrain_epochs=2", "hidden=[32]", "keep_fractions=[0.5]"]


def test_run_writes_config_metrics_scores_and_plots(ray_session, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "data_diet", "--set", *TINY, "arms=[el2n,random]", "label_noise=0.1",
                 "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "data_diet" and config["inits"] == 1 and config["lr"] == 0.05
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["deviations"] and 0.0 <= metrics["noise"]["el2n_auroc"] <= 1.0
    assert set(metrics["test_acc"]) == {"el2n", "random", "full"}
    scores = pq.read_table(out / "results.parquet").to_pandas()
    assert len(scores) == metrics["examples"] == scores["idx"].nunique()
    assert {"idx", "label", "flipped", "el2n", "grand"} <= set(scores.columns)
    assert scores["flipped"].mean() == pytest.approx(0.1, abs=0.01)
    assert (scores["el2n"] >= 0).all() and (scores["el2n"] <= 2 ** 0.5 + 1e-6).all()
    for plot in ("scores.png", "pruning.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_sweep_two_trials(ray_session, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "data_diet", "--samples", "2", "--set", *TINY, "--out", str(out)]) == 0
    trials = pq.read_table(out / "sweep.parquet").to_pandas()
    assert len(trials) == 2 and "val_acc" in trials.columns
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "val_acc" and best["trials"] == 2 and best["errors"] == 0
    assert set(best["config"]) == {"lr", "score_epochs", "keep_fractions", "batch_size"}
    assert best["value"] == pytest.approx(trials["val_acc"].max())


def test_reproduce_quick_writes_claims(ray_session, tmp_path, capsys):
    out = tmp_path / "claim"
    assert main(["reproduce", "data_diet", "--quick", "--set", "inits=1", "retrain_epochs=2",
                 "--out", str(out)]) == 0
    claim = json.loads((out / "claim.json").read_text())
    for record in [claim, *claim["more"]]:
        assert {"claim", "metric", "method", "baseline", "seeds", "reproduced", "deviations"} <= set(record)
        assert record["seeds"] == 3 and isinstance(record["reproduced"], bool)
    assert "50%" in claim["claim"] and len(claim["more"]) == 3
    assert claim["more"][1]["metric"].startswith("AUROC")
    assert "reproduced" in capsys.readouterr().out
    assert (out / "pruning.png").exists() and (out / "scores.png").exists()
