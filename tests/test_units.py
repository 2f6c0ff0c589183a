"""The unit runner without Ray: resume, early stop, sparse reporting, the final state."""
import io

import pytest
import torch

from pipelines import units
from pipelines.units import Unit, Work, no_steps, run_units


def _copy(state):
    """What a checkpoint holds: the state as saved at report time, loaded as Train's reader does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class FakeSession:
    """What run_units needs of a WorkerSession: one rank, recorded reports, a restored state."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, state=None, checkpoint_every=1, checkpoint_seconds=0.0):
        self.state, self.checkpoint_every, self.checkpoint_seconds = state, checkpoint_every, checkpoint_seconds
        self.reports, self.checkpoint = [], None

    def report(self, metrics, state=None):
        self.reports.append((metrics, state is not None))
        if state is not None:
            self.checkpoint = _copy(state)

    def agree(self, value):
        return value


class Crash(Exception):
    pass


def plan(crash_at_step=None, budget=6, stop_after=None, crash_in_finish=False):
    """A regression fitted by SGD on batches from a seeded generator, then a unit reading its result."""
    calls = {"steps": 0}

    def start(done):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return Work(saved=("model", "optimizer", "generator", "losses"), model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    generator=torch.Generator().manual_seed(1), losses=[])

    def step(work, index):
        calls["steps"] += 1
        if calls["steps"] == crash_at_step:
            raise Crash
        x = torch.randn(8, 3, generator=work.generator)
        loss = ((work.model(x).squeeze(1) - x.sum(1)) ** 2).mean()
        work.optimizer.zero_grad()
        loss.backward()
        work.optimizer.step()
        work.losses.append(loss.item())
        return {"epoch": index + 1, "loss": loss.item()}

    def finish(work, done):
        if crash_in_finish:
            raise Crash
        return {"weight": work.model.weight.detach().clone(), "losses": list(work.losses)}

    stop = None if stop_after is None else (lambda work: len(work.losses) >= stop_after)
    fit = Unit("fit", budget, start, step, finish, stop=stop, step_name="epoch")
    total = Unit("total", 0, lambda done: Work(), no_steps,
                 lambda work, done: {"sum": float(done["fit"]["weight"].sum())})
    return [fit, total], calls


def test_an_interrupted_plan_resumes_to_the_same_result_as_an_uninterrupted_one():
    whole = run_units(FakeSession(), plan()[0])["done"]
    first = FakeSession()
    with pytest.raises(Crash):
        run_units(first, plan(crash_at_step=4)[0])
    assert first.checkpoint["current"]["step"] == 2  # steps 0..2 ran, each checkpointed
    again, calls = plan()
    resumed = run_units(FakeSession(state=first.checkpoint), again)
    assert calls["steps"] == 3  # only steps 3..5 run again
    assert torch.equal(resumed["done"]["fit"]["weight"], whole["fit"]["weight"])
    assert resumed["done"]["fit"]["losses"] == whole["fit"]["losses"]
    assert resumed["done"]["total"] == whole["total"]
    assert resumed["starts"] == [{"units_done": 0, "unit": "", "step": 0}, {"units_done": 0, "unit": "fit", "step": 3}]


def test_a_finished_plan_runs_nothing_and_reports_nothing():
    session = FakeSession()
    sums = run_units(session, plan()[0])["done"]["total"]
    rerun = FakeSession(state=session.checkpoint)
    again, calls = plan()
    assert run_units(rerun, again)["done"]["total"] == sums
    assert calls["steps"] == 0 and rerun.reports == []


def test_stop_ends_a_unit_early_and_a_resume_does_not_step_past_it():
    session = FakeSession()
    with pytest.raises(Crash):  # the checkpoint of the stopping step is the last one
        run_units(session, plan(stop_after=2, crash_in_finish=True)[0])
    assert session.checkpoint["current"]["step"] == 1
    again, calls = plan(stop_after=2)
    done = run_units(FakeSession(state=session.checkpoint), again)["done"]
    assert calls["steps"] == 0 and len(done["fit"]["losses"]) == 2


def test_reports_are_sparse_but_every_unit_end_is_checkpointed(monkeypatch):
    monkeypatch.setattr(units, "REPORT_SECONDS", 3600.0)
    session = FakeSession(checkpoint_seconds=3600.0)
    run_units(session, plan(budget=20)[0], summarize=lambda done: {"score": 1.5}, summary_keys=("score",))
    assert [checkpointed for _, checkpointed in session.reports] == [True, True, True]  # 2 unit ends, the summary
    assert all("score" in metrics for metrics, _ in session.reports)  # Tune's metric in every report (NaN first)
    assert session.reports[-1][0]["score"] == 1.5 and session.reports[-1][0]["epoch"] == 20


def test_checkpoints_every_n_steps_when_the_time_allows():
    session = FakeSession(checkpoint_every=5)
    run_units(session, plan(budget=20)[0])
    assert [checkpointed for _, checkpointed in session.reports] == [True] * 6  # steps 5, 10, 15, 20 + 2 unit ends


def test_work_checkpoints_modules_optimizers_generators_and_plain_values():
    model = torch.nn.Linear(2, 2)
    work = Work(saved=("model", "generator", "count"), model=model, generator=torch.Generator().manual_seed(3),
                count=5, data=torch.ones(3))
    state = _copy(work.state_dict())
    assert set(state) == {"model", "generator", "count"}
    expected = torch.rand(2, generator=work.generator)
    other = Work(saved=("model", "generator", "count"), model=torch.nn.Linear(2, 2), generator=torch.Generator(),
                 count=0)
    other.load_state_dict(state)
    assert other.count == 5 and torch.equal(other.model.weight, model.weight)
    assert torch.equal(torch.rand(2, generator=other.generator), expected)
