"""Attack tracing: the tracing rule on planted tracers, the noise-sensitive loss on a toy task, the CLI."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.adversarial.attack_tracing import (
    AttackTracingConfig,
    Copy,
    build_tracer,
    claims,
    lowest_attack_loss,
    make_key,
    noise_sensitive_loss,
    trace,
    tracer_norms,
)
from pipelines.cli import main
from pipelines.pipeline import Outputs
from pipelines.results import columns

torch.set_num_threads(1)
SHAPE = (1, 4, 4)


def planted_tracer(key: torch.Tensor) -> nn.Module:
    """t(x) = (⟨k, x − 0.5⟩, 0): fires on perturbations along k only."""
    tracer = nn.Sequential(nn.Flatten(), nn.Linear(key.numel(), 2))
    with torch.no_grad():
        tracer[1].weight.zero_()
        tracer[1].bias.zero_()
        tracer[1].weight[0] = key.flatten()
        tracer[1].bias[0] = -0.5 * key.sum()
    return tracer


def test_trace_finds_the_planted_source():
    keys = [make_key(SHAPE, seed) for seed in range(4)]
    tracers = [planted_tracer(k) for k in keys]
    gen = torch.Generator().manual_seed(0)
    clean = (0.5 + 0.05 * torch.randn(200, *SHAPE, generator=gen)).clamp(0, 1)
    norms = tracer_norms(tracers, clean)
    for source, key in enumerate(keys):
        x_adv = (clean[:50] + 0.1 * key).clamp(0, 1)
        z, guess = trace(tracers, x_adv, norms.mean(0), norms.std(0))
        assert z.shape == (50, 4)
        assert (guess == source).all()


def test_baseline_picks_the_copy_with_the_lowest_attack_loss():
    y = torch.tensor([0, 1])

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, x):
            return self.logits

    copies = [Fixed([[3.0, 0.0], [0.0, 3.0]]), Fixed([[0.0, 3.0], [0.0, 3.0]]), Fixed([[1.0, 0.0], [3.0, 0.0]])]
    assert lowest_attack_loss(copies, torch.zeros(2, 1), y).tolist() == [1, 2]


def test_noise_sensitive_loss_plants_a_copy_specific_trace():
    """Toy task: class = bright left or right half; h fixed; the tracer learns to fire along its key only."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=gen)
    x = 0.3 * torch.rand(256, *SHAPE, generator=gen)
    x[y == 0, :, :, :2] += 0.6
    x[y == 1, :, :, 2:] += 0.6
    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    left = torch.zeros(SHAPE)
    left[..., :2] = 1
    with torch.no_grad():
        base[1].weight.copy_(torch.stack([(2 * left - 1).flatten(), (1 - 2 * left).flatten()]))
        base[1].bias.zero_()
    base.requires_grad_(False)
    torch.manual_seed(0)
    key = make_key(SHAPE, 1)
    copy = Copy(base, build_tracer(SHAPE, 2, 32))
    cfg = AttackTracingConfig(key_eps=0.2)
    opt = torch.optim.Adam(copy.tracer.parameters(), lr=0.01)
    for _ in range(300):
        loss = noise_sensitive_loss(copy, base, x, y, key, cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (copy(x).argmax(1) == base(x).argmax(1)).float().mean() > 0.97  # same function on clean inputs
        x_key, x_other = (x + 0.2 * key).clamp(0, 1), (x + 0.2 * make_key(SHAPE, 2)).clamp(0, 1)
        on_key, other = copy.tracer(x_key).norm(dim=1).mean(), copy.tracer(x_other).norm(dim=1).mean()
        assert on_key > 3 * other and on_key > 3 * copy.tracer(x).norm(dim=1).mean()
        assert F.cross_entropy(copy(x_key), y) > 2 * F.cross_entropy(copy(x_other), y)  # the key raises the loss


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_run_end_to_end_through_the_cli(ray_session, tmp_path):
    out = tmp_path / "run"
    code = main(["run", "attack_tracing", "--set", "arch=mlp", "hidden=[32]", "epochs=2", "tracer_epochs=2",
                 "copies=3", "attack_examples=24", "attack_steps=3", "training_mode=pgd", "pgd_steps=2",
                 "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chance"] == pytest.approx(1 / 3)
    for key in ("fgsm_tracing_acc", "pgd_tracing_acc", "fgsm_baseline_acc", "min_copy_acc"):
        assert 0 <= metrics[key] <= 1
    assert any("reconstruction" in d for d in metrics["deviations"])
    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert len(scores["source"]) == 2 * 3 * 3  # attacks × sources × candidates
    assert (out / "tracing.png").stat().st_size > 0


def test_claims_compare_per_seed_against_chance_and_the_baseline_with_the_traced_examples_as_trials():
    cfg = AttackTracingConfig(seeds=3, copies=4, attack_examples=100)
    rows = [{"seed": seed, "attack": a, "success": 0.9, "tracing_acc": 0.9 + 0.01 * seed, "baseline_acc": 0.5,
             "traced": 300 + seed, "base_acc": 0.95, "min_copy_acc": 0.95 - 0.001 * seed}
            for seed in (0, 1, 2) for a in ("fgsm", "pgd")]
    found = claims(cfg, {}, Outputs(tables={"results": columns(rows)}))
    assert [c.pairs for c in found] == [[0, 1, 2]] * 5 and found[0].baseline == pytest.approx(0.25)
    assert found[0].verdict == "reproduced" and "one-sample" in found[0].test
    assert "binomial over 300 test items" in found[0].test and "binomial over 100 test items" in found[2].test
    assert found[2].margin == -0.01 and found[3].margin == 0.01 and found[3].verdict == "reproduced"
