import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.data_centric.scores import el2n, el2n_scores, grand_scores, keep_indices


def test_el2n_hand_computed():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    y = torch.tensor([0, 0, 1])
    expected = [0.0, math.sqrt(0.25 + 0.25), math.sqrt(0.04 + 0.49 + 0.25)]
    assert torch.allclose(el2n(probs, y), torch.tensor(expected))


def test_el2n_of_a_model_uses_softmax():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x, y = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([1])
    # softmax([ln 3, 0]) = [3/4, 1/4]; onehot(1) = [0, 1] -> sqrt((3/4)^2 + (3/4)^2)
    assert torch.allclose(el2n_scores(model, x, y), torch.tensor([0.75 * math.sqrt(2)]))


def test_grand_hand_computed_linear_model():
    # logits z = W x + b; ∂CE/∂z = p − onehot(y); ∂CE/∂W = (p − onehot) xᵀ, ∂CE/∂b = p − onehot.
    # Hence ‖∇‖² = ‖p − onehot‖² (‖x‖² + 1) = EL2N² (‖x‖² + 1).
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    expected = el2n_scores(model, x, y) * torch.sqrt(x.pow(2).sum(1) + 1)
    assert torch.allclose(grand_scores(model, x, y), expected, atol=1e-6)


def test_keep_indices_modes():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert set(keep_indices(scores, 2).tolist()) == {1, 3}
    assert set(keep_indices(scores, 2, offset=1).tolist()) == {3, 2}
    assert set(keep_indices(scores, 2, mode="lowest").tolist()) == {0, 4}
    gen = torch.Generator().manual_seed(0)
    random = keep_indices(scores, 3, mode="random", generator=gen)
    assert len(set(random.tolist())) == 3


def test_cross_entropy_gradient_sign_convention():
    # GraNd is a norm: invariant to the loss' sign, zero for a perfectly fit, saturated example
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[100.0], [-100.0]]))
    assert grand_scores(model, torch.tensor([[1.0]]), torch.tensor([0]))[0] < 1e-6
    assert F.cross_entropy(model(torch.tensor([[1.0]])), torch.tensor([0])) < 1e-6


def test_claims_pair_the_arms_by_seed_with_margins_and_test_items():
    import numpy as np
    import pytest

    from methods.data_centric import data_diet
    from pipelines.pipeline import Outputs
    from pipelines.results import columns

    cfg = data_diet.DataDietConfig(seeds=3, keep_fractions=[0.7, 0.5], arms=["el2n", "grand", "random"])
    pruning = columns([{"seed": seed, "arm": arm, "fraction_pruned": 1 - fraction, "test_items": 600,
                        "test_acc": {"el2n": 0.9, "grand": 0.8, "random": 0.85}[arm] + 0.01 * seed}
                       for seed in range(3) for fraction in (0.7, 0.5) for arm in cfg.arms])
    rng = np.random.default_rng(0)
    flipped = np.tile(np.arange(100) < 10, 3)
    scores = {"seed": np.repeat(np.arange(3), 100), "flipped": flipped,
              "el2n": flipped + rng.uniform(0, 0.5, 300)}
    found = data_diet.claims(cfg, data_diet.Results(scores, pruning, []), Outputs())
    assert [c.margin for c in found] == [-0.01, -0.01, 0.1, 0.1, 0.01]
    assert all(c.pairs == [0, 1, 2] for c in found)
    assert [c.test.endswith("binomial over 600 test items") for c in found] == [True, True, False, False, True]
    assert "one-sample" in found[2].test and found[2].baseline == 0.5 and found[2].method == 1.0
    assert found[3].baseline == pytest.approx(0.1) and "binomial over 10 test items" in found[3].test
    assert found[0].difference == pytest.approx(0.05) and found[4].difference == pytest.approx(0.1)
