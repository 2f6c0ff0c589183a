"""A new method needs only its module: a toy one, declared in a few lines inside the test, gets
`run`, `reproduce` and a 2-trial `sweep` from the spine through the CLI."""
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import Field

from pipelines import registry
from pipelines.claims import compare, per_seed
from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.pipeline import Outputs, Pipeline
from pipelines.train import WorkerSession
from pipelines.units import Unit, Work, run_units

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def toy_pipeline() -> Pipeline:
    """Least squares by SGD, one unit per seed; the claim: the fit beats predicting zero."""

    class ToyConfig(TrainConfig):
        lr: float = Field(0.1, gt=0)
        steps: int = Field(20, ge=1)

    def loop(config: dict) -> None:
        cfg, session = ToyConfig(**config["cfg"]), WorkerSession(config)

        def start(seed):
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(64, 3, generator=generator)
            model = torch.nn.Linear(3, 1)
            return Work(saved=("model", "optimizer"), model=model, x=x, y=x.sum(1, keepdim=True),
                        optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr))

        def step(work, index):
            loss = ((work.model(work.x) - work.y) ** 2).mean()
            work.optimizer.zero_grad()
            loss.backward()
            work.optimizer.step()
            return {"loss": loss.item()}

        def finish(work, done):
            with torch.no_grad():
                return {"mse": float(((work.model(work.x) - work.y) ** 2).mean()), "zero_mse": float((work.y ** 2).mean())}

        run_units(session, [Unit(str(seed), cfg.steps, lambda done, s=seed: start(s), step, finish)
                            for seed in cfg.seed_range()])

    def execute(cfg, stage):
        return stage.fit(loop, {"cfg": cfg.model_dump()}, cfg)["done"]

    def outputs(cfg, done):
        table = {"seed": np.array(list(cfg.seed_range())),
                 "mse": np.array([done[str(s)]["mse"] for s in cfg.seed_range()]),
                 "zero_mse": np.array([done[str(s)]["zero_mse"] for s in cfg.seed_range()])}
        return Outputs(tables={"results": table}, metrics={"mse": float(table["mse"].mean())})

    def claims(cfg, done, out):
        table = out.tables["results"]
        return [compare("SGD fits better than predicting zero", "training MSE", per_seed(table, "mse"),
                        per_seed(table, "zero_mse"), higher_is_better=False, margin=0.0, why="any fit beats none")]

    return Pipeline(config=ToyConfig, execute=execute, outputs=outputs, claims=claims, deviations=["a toy"],
                    budget=lambda cfg: f"{cfg.seeds} seeds, {cfg.steps} steps", trial=lambda cfg: cfg,
                    sweep_metric="loss", sweep_mode="min", profiles={"quick": {"seeds": 2, "steps": 10}})


class ToyEntry(registry.Entry):
    def pipeline(self) -> Pipeline:
        return toy_pipeline()


@pytest.fixture
def toy(monkeypatch):
    entry = ToyEntry("toy", "A toy", "toys", "none", "none", "none", "none", module=None)
    monkeypatch.setattr(registry, "get", lambda method_id: entry)


def test_a_toy_method_runs_reproduces_and_sweeps_through_the_spine(ray_session, toy, tmp_path, capsys):
    run = ["run", "toy", "--set", "steps=5", "--out", str(tmp_path / "run")]
    assert main(run) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["deviations"] == ["a toy"] and metrics["mse"] > 0
    assert len(pq.read_table(tmp_path / "run" / "results.parquet")) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^  mse +{metrics['mse']:.4g}$", out, re.M) and f"results: {tmp_path / 'run'}" in out

    # a finished run says so at once; --force re-runs it after moving the old results aside
    assert main(run) == 0
    assert "run is complete" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert main([*run, "--force"]) == 0
    (previous,) = tmp_path.glob("run.previous-*")
    assert json.loads((previous / "metrics.json").read_text()) == metrics
    assert (tmp_path / "run" / "metrics.json").exists()

    assert main(["reproduce", "toy", "--quick", "--out", str(tmp_path / "claim")]) == 0
    claim = json.loads((tmp_path / "claim" / "claim.json").read_text())
    assert claim["seeds"] == 2 and claim["reproduced"] is True
    assert "SGD fits better than predicting zero" in capsys.readouterr().out
    assert claim["deviations"] == ["a toy", "2 seeds, 10 steps"]

    space = tmp_path / "space.yaml"
    space.write_text("scheduler: {type: fifo}\nparams:\n  lr: {choice: [0.05, 0.1]}\n")
    assert main(["sweep", "toy", "--samples", "2", "--space", str(space), "--out", str(tmp_path / "sweep")]) == 0
    best = json.loads((tmp_path / "sweep" / "best.json").read_text())
    assert best["trials"] == 2 and best["errors"] == 0 and best["metric"] == "loss"
