import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.classifiers import build_classifier
from methods.engines.per_example_grads import flatten, per_example_grad_norms, per_example_grads


def loop_grads(model, x, y):
    """Reference: one backward pass per example."""
    rows = []
    for xi, yi in zip(x, y):
        model.zero_grad()
        F.cross_entropy(model(xi[None]), yi[None]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_engine_matches_per_example_backward_loop(arch, batch_norm):
    torch.manual_seed(0)
    model = build_classifier(arch, (1, 8, 8), 10, hidden=(32, 16), batch_norm=batch_norm)
    if batch_norm:  # give the running statistics non-trivial values, then freeze them
        model.train()
        model(torch.randn(64, 1, 8, 8) * 2 + 0.5)
    model.eval()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    engine = flatten(per_example_grads(model, F.cross_entropy, x, y))
    reference = loop_grads(model, x, y)
    assert engine.shape == reference.shape
    assert (engine - reference).abs().max() <= 1e-5
    norms = per_example_grad_norms(model, F.cross_entropy, x, y, batch_size=5)
    assert torch.allclose(norms, reference.norm(dim=1), atol=1e-5)


def test_batch_norm_in_train_mode_is_refused():
    model = build_classifier("mlp", (1, 8, 8), 10, hidden=(8,), batch_norm=True).train()
    with pytest.raises(ValueError, match="eval mode"):
        per_example_grads(model, F.cross_entropy, torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Linear(4, 3))
    model[1].weight.requires_grad_(False)
    grads = per_example_grads(model, F.cross_entropy, torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert set(grads) == {"1.bias", "2.weight", "2.bias"}
    assert grads["2.weight"].shape == (3, 3, 4)
