"""Tests of methods.engines.attacks on a tiny MLP trained on sklearn digits (no Ray, no downloads)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from pydantic import ValidationError
from sklearn.datasets import load_digits
from torch import nn

from methods.engines.attacks import (
    CWConfig,
    FGSMConfig,
    PGDConfig,
    adversarial_batch,
    attack_mode,
    cw_l2,
    fgsm,
    pgd,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_mlp():
    """(model, x, y): an MLP trained on 1400 digits (~96 % held-out accuracy) and 100 held-out examples."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:1500]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    assert accuracy(model, x[test], y[test]) > 0.9
    return model, x[test], y[test]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def linf(d):
    return d.flatten(1).abs().amax(1)


def l2(d):
    return d.flatten(1).norm(dim=1)


def test_fgsm_is_eps_sign_of_input_gradient(digits_mlp):
    model, x, y = digits_mlp
    eps = 0.1
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    x_adv = fgsm(model, x, y, FGSMConfig(eps=eps))
    assert torch.equal(x_adv, (x + eps * g.sign()).clamp(0, 1))
    inside = ((x + eps * g.sign()) >= 0) & ((x + eps * g.sign()) <= 1)
    torch.testing.assert_close((x_adv - x)[inside], (eps * g.sign())[inside])
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2


def test_fgsm_targeted_descends_target_loss(digits_mlp):
    model, x, y = digits_mlp
    t = (y + 1) % 10
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), t), xg)
    x_adv = fgsm(model, x, t, FGSMConfig(eps=0.1, targeted=True))
    assert torch.equal(x_adv, (x - 0.1 * g.sign()).clamp(0, 1))


def test_fgsm_matches_torchattacks(digits_mlp):
    model, x, y = digits_mlp
    ours = fgsm(model, x, y, FGSMConfig(eps=0.1))
    theirs = torchattacks.FGSM(model, eps=0.1)(x, y)
    assert (ours - theirs).abs().max().item() == 0.0


def test_pgd_linf_matches_torchattacks_without_random_start(digits_mlp):
    model, x, y = digits_mlp
    ours = pgd(model, x, y, PGDConfig(eps=0.1, alpha=0.02, steps=10, random_start=False))
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=10, random_start=False)(x, y)
    assert (ours - theirs).abs().max().item() < 1e-6


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 0.1, 0.02), ("l2", 1.0, 0.25)])
def test_pgd_stays_in_eps_ball_and_range(digits_mlp, norm, eps, alpha):
    model, x, y = digits_mlp
    x_adv = pgd(model, x, y, PGDConfig(eps=eps, alpha=alpha, steps=10, norm=norm), rng=1)
    size = linf if norm == "linf" else l2
    assert size(x_adv - x).max().item() <= eps * (1 + 1e-5)
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.3


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_all_attacks_respect_custom_bounds(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.rand(32, 5) * 5 - 2, torch.randint(0, 3, (32,))
    bounds = (-2.0, 3.0)
    outs = [
        fgsm(model, x, y, FGSMConfig(eps=1.0), bounds=bounds),
        pgd(model, x, y, PGDConfig(eps=1.0, alpha=0.5, norm=norm), bounds=bounds),
        cw_l2(model, x, y, CWConfig(binary_search_steps=2, steps=20, lr=0.1), bounds=bounds).x_adv,
    ]
    for out in outs:
        assert out.min().item() >= -2 and out.max().item() <= 3
    with pytest.raises(ValueError):
        fgsm(model, x, y, FGSMConfig(), bounds=(1.0, 1.0))


def test_pgd_targeted_reaches_target(digits_mlp):
    model, x, y = digits_mlp
    t = (y + 3) % 10
    x_adv = pgd(model, x, t, PGDConfig(eps=0.3, alpha=0.05, steps=20, targeted=True))
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == t).float().mean().item() > 0.8


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_random_start_is_seeded(digits_mlp, norm):
    model, x, y = digits_mlp
    cfg = PGDConfig(eps=0.1 if norm == "linf" else 1.0, alpha=0.02, steps=3, norm=norm)
    assert torch.equal(pgd(model, x, y, cfg, rng=7), pgd(model, x, y, cfg, rng=7))
    assert not torch.equal(pgd(model, x, y, cfg, rng=7), pgd(model, x, y, cfg, rng=8))
    gen = torch.Generator().manual_seed(7)
    first, second = pgd(model, x, y, cfg, rng=gen), pgd(model, x, y, cfg, rng=gen)
    assert torch.equal(first, pgd(model, x, y, cfg, rng=7)) and not torch.equal(first, second)
    no_start = cfg.model_copy(update={"random_start": False})
    assert torch.equal(pgd(model, x, y, no_start, rng=1), pgd(model, x, y, no_start, rng=2))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_random_start_is_uniform_in_the_ball(norm):
    model = nn.Linear(64, 3)
    x, y = torch.full((2000, 64), 0.5), torch.zeros(2000, dtype=torch.long)
    negligible_step = PGDConfig(eps=0.2, alpha=1e-9, steps=1, norm=norm)
    start = pgd(model, x, y, negligible_step, rng=0) - x
    assert start.mean().abs().item() < 0.01
    if norm == "linf":
        torch.testing.assert_close(start.abs().mean().item(), 0.1, atol=0.003, rtol=0)  # U(-ε, ε): E|δ| = ε/2
        assert linf(start).max().item() <= 0.2 + 1e-6
    else:
        # r = ε·U^{1/d} in d = 64 dimensions: E r = ε·d/(d+1)
        torch.testing.assert_close(l2(start).mean().item(), 0.2 * 64 / 65, atol=0.003, rtol=0)
        assert l2(start).max().item() <= 0.2 + 1e-6


def test_fgsm_and_cw_are_deterministic(digits_mlp):
    model, x, y = digits_mlp
    assert torch.equal(fgsm(model, x, y, FGSMConfig()), fgsm(model, x, y, FGSMConfig()))
    cfg = CWConfig(binary_search_steps=2, steps=10, lr=0.1)
    assert torch.equal(cw_l2(model, x, y, cfg).x_adv, cw_l2(model, x, y, cfg).x_adv)


def test_cw_l2_shrinks_as_c_falls_while_still_succeeding(digits_mlp):
    model, x, y = digits_mlp
    results = [cw_l2(model, x, y, CWConfig(c_init=c, binary_search_steps=1, steps=100, lr=0.1))
               for c in (10.0, 1.0, 0.1)]
    everywhere = torch.stack([r.success for r in results]).all(0)
    assert everywhere.float().mean().item() > 0.95
    mean_l2 = [r.l2[everywhere].mean().item() for r in results]
    assert mean_l2[0] > mean_l2[1] > mean_l2[2] > 0


def test_cw_result_is_consistent(digits_mlp):
    model, x, y = digits_mlp
    res = cw_l2(model, x, y, CWConfig(c_init=0.05, binary_search_steps=1, steps=30, lr=0.05, kappa=1.0))
    assert 0 < res.success.float().mean().item() < 1  # some fail, so both branches are checked
    with torch.no_grad():
        logits = model(res.x_adv[res.success])
    own = logits.gather(1, y[res.success, None]).squeeze(1)
    other = logits.scatter(1, y[res.success, None], -float("inf")).amax(1)
    assert (other - own > 1.0).all()  # successes clear the κ margin
    assert torch.equal(res.x_adv[~res.success], x[~res.success])
    torch.testing.assert_close(res.l2, l2(res.x_adv - x))
    assert res.x_adv.min().item() >= 0 and res.x_adv.max().item() <= 1


def test_cw_binary_search_raises_small_c_and_tightens_large_c(digits_mlp):
    model, x, y = digits_mlp
    tiny = CWConfig(c_init=1e-3, binary_search_steps=1, steps=50, lr=0.1)
    assert cw_l2(model, x, y, tiny).success.float().mean().item() < 0.2
    searched = cw_l2(model, x, y, tiny.model_copy(update={"binary_search_steps": 5}))
    assert searched.success.float().mean().item() > 0.95
    big = CWConfig(c_init=10.0, binary_search_steps=1, steps=50, lr=0.1)
    one, five = cw_l2(model, x, y, big), cw_l2(model, x, y, big.model_copy(update={"binary_search_steps": 5}))
    assert (five.l2 <= one.l2 + 1e-6)[one.success].all()  # round 1 is identical; later rounds only improve
    assert five.l2[one.success].mean() < 0.9 * one.l2[one.success].mean()


def test_cw_targeted_reaches_target(digits_mlp):
    model, x, y = digits_mlp
    t = (y + 3) % 10
    res = cw_l2(model, x, t, CWConfig(c_init=10.0, binary_search_steps=1, steps=100, lr=0.1, targeted=True))
    assert res.success.float().mean().item() > 0.9
    with torch.no_grad():
        assert (model(res.x_adv[res.success]).argmax(1) == t[res.success]).all()


def test_modes_restored_bn_untouched_and_no_param_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    model.train()
    model[3].eval()  # mixed modes must come back exactly as they were
    modes = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(16, 8), torch.randint(0, 4, (16,))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # attacks must still get input gradients inside an evaluation loop
        fgsm(model, x, y, FGSMConfig(eps=0.1))
        pgd(model, x, y, PGDConfig(eps=0.1, norm="l2"))
        adversarial_batch(model, x, y, PGDConfig(eps=0.1), generator=gen)
        cw_l2(model, x, y, CWConfig(binary_search_steps=2, steps=5))
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_attack_mode_restores_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    with pytest.raises(RuntimeError), attack_mode(model):
        assert not model.training and torch.is_grad_enabled()
        raise RuntimeError
    assert all(m.training for m in model.modules())


def test_adversarial_batch_advances_generator_and_is_reproducible(digits_mlp):
    model, x, y = digits_mlp
    cfg = PGDConfig(eps=0.1, alpha=0.02, steps=5)
    gen = torch.Generator().manual_seed(3)
    a = adversarial_batch(model, x, y, cfg, generator=gen)
    b = adversarial_batch(model, x, y, cfg, generator=gen)
    assert not torch.equal(a, b)
    assert torch.equal(a, adversarial_batch(model, x, y, cfg, generator=torch.Generator().manual_seed(3)))
    assert linf(a - x).max().item() <= 0.1 + 1e-6


@pytest.mark.parametrize("cls,kwargs", [
    (FGSMConfig, {"eps": -0.1}),
    (PGDConfig, {"steps": 0}),
    (PGDConfig, {"alpha": 0.0}),
    (PGDConfig, {"norm": "l1"}),
    (CWConfig, {"kappa": -1.0}),
    (CWConfig, {"binary_search_steps": 0}),
    (CWConfig, {"c_init": 0.0}),
    (CWConfig, {"max_iterations": 10}),
])
def test_configs_reject_invalid_values(cls, kwargs):
    with pytest.raises(ValidationError):
        cls(**kwargs)
