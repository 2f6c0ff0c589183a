"""Defensive distillation: softened targets, the student's loss, the config, and the CLI end to end."""
from __future__ import annotations

import json
import math
from itertools import product

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.adversarial.adv_distillation import AdvDistillationConfig, Tempered, claims, soft_targets
from methods.adversarial.robust_training import TrainingConfig, perturbation
from pipelines.cli import main
from pipelines.config import build_config
from pipelines.errors import UserError
from pipelines.pipeline import Outputs
from pipelines.results import columns

torch.set_num_threads(1)


def test_soft_targets_are_softmax_of_logits_over_T():
    logits = torch.tensor([[2.0, 0.0], [4.0, 4.0]])
    p = soft_targets(logits, 2.0)
    e = math.e
    assert torch.allclose(p[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    assert torch.allclose(p[1], torch.tensor([0.5, 0.5]))
    assert torch.allclose(soft_targets(logits, 1.0), F.softmax(logits, 1))


def test_higher_temperature_softens_but_keeps_the_ranking():
    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(0)) * 5
    entropies = []
    for t in (1.0, 5.0, 20.0, 1000.0):
        p = soft_targets(logits, t)
        assert torch.allclose(p.sum(1), torch.ones(32))
        assert torch.equal(p.argmax(1), logits.argmax(1))
        entropies.append(float(-(p * p.log()).sum(1).mean()))
    assert entropies == sorted(entropies)
    assert entropies[-1] == pytest.approx(math.log(10), abs=1e-3)


def test_student_loss_is_cross_entropy_between_soft_labels_at_T():
    torch.manual_seed(0)
    student = Tempered(nn.Linear(4, 3), 5.0)
    x, teacher_logits = torch.randn(6, 4), torch.randn(6, 3) * 10
    targets = soft_targets(teacher_logits, 5.0)
    loss = F.cross_entropy(student(x), targets)  # what train_epoch computes for probability targets
    expected = -(targets * F.log_softmax(student.model(x) / 5.0, 1)).sum(1).mean()
    assert torch.allclose(loss, expected)


def test_config_rejects_non_positive_budgets():
    with pytest.raises(UserError, match="fgsm_eps"):
        build_config(AdvDistillationConfig, {"fgsm_eps": [0.1, 0.0]})
    assert build_config(AdvDistillationConfig, {"fgsm_eps": [0.2, 0.1]}).fgsm_eps == [0.1, 0.2]


def test_pgd_training_mode_replaces_batches_by_eps_bounded_adversarial_inputs():
    """robust_training's modes, shared by the three pipelines: standard keeps the batch, pgd attacks it."""
    assert perturbation(TrainingConfig(), torch.Generator()) is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    cfg = TrainingConfig(training_mode="pgd", pgd_eps=0.05, pgd_alpha=0.02, pgd_steps=3)
    x_adv = perturbation(cfg, torch.Generator().manual_seed(1))(model, x, y)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    again = perturbation(cfg, torch.Generator().manual_seed(1))(model, x, y)
    assert torch.equal(x_adv, again)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_run_end_to_end_through_the_cli(ray_session, tmp_path):
    out = tmp_path / "run"
    code = main(["run", "adv_distillation", "--set", "epochs=2", "archs=[mlp]", "hidden=[32]", "attack_examples=16",
                 "cw_steps=5", "cw_search_steps=2", "fgsm_eps=[0.1, 0.3]", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for arm in ("undefended", "distilled", "distilled_logits_over_T"):
        assert 0 <= metrics[f"{arm}_fgsm_success"] <= 1
    assert metrics["deviations"]
    table = pq.read_table(out / "results.parquet").to_pydict()
    assert len(table["arm"]) == 3 * (2 + 6)  # arms × (FGSM ε + CW budgets incl. unbounded)
    assert (out / "success_vs_eps.png").stat().st_size > 0
    assert (out / "adversarial_examples.png").stat().st_size > 0


def test_claims_pair_models_by_seed_and_arch_with_the_attacked_examples_as_trials():
    cfg = AdvDistillationConfig(seeds=2, fgsm_eps=[0.1, 0.3], cw_l2_budgets=[0.5], attack_examples=100)
    success = {"undefended": 0.9, "distilled": 0.1, "distilled_logits_over_T": 0.8}
    rows = [{"seed": seed, "arch": arch, "arm": arm, "attack": attack, "budget": budget, "success": success[arm],
             "acc_under_attack": 0.9 * (1 - success[arm]), "mean_l2": 1.0, "clean_acc": 0.9 + 0.01 * seed}
            for seed, arch, arm in product((0, 1), ("mlp", "cnn"), success)
            for attack, budgets in (("fgsm", cfg.fgsm_eps), ("cw", [0.5, float("inf")])) for budget in budgets]
    found = claims(cfg, {}, Outputs(tables={"results": columns(rows)}))
    assert len(found) == 6 and found[0].pairs == [[0, "cnn"], [0, "mlp"], [1, "cnn"], [1, "mlp"]]
    assert found[0].verdict == "reproduced" and found[0].difference == pytest.approx(0.8)
    assert "binomial over 90 test items" in found[0].test  # the correctly classified attacked examples
    assert "binomial over 100 test items" in found[-1].test and found[-1].margin == -0.02
    assert all(c.verdict in ("reproduced", "inconclusive", "contradicted") and c.rule for c in found)
