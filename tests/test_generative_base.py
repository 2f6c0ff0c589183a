"""Tests of the shared generative base: schedules, samplers, LoRA helpers and judges."""

import math

import pytest
import torch

from methods.classifiers import accuracy
from methods.generative.data import load_digit_images
from methods.generative.judges import (
    extract_features,
    frechet_distance,
    precision_recall,
    train_judges,
)
from methods.generative.models import ClassConditionalUNet, add_lora, load_lora_soup, lora_state
from methods.generative.samplers import (
    cfg_predictor,
    ddim_step,
    flow_step,
    sample_ddim,
    sample_flow,
)
from methods.generative.schedules import (
    diffusion_loss,
    flow_matching_loss,
    make_ddim_scheduler,
    make_ddpm_scheduler,
    make_flow_scheduler,
)

torch.set_num_threads(1)
SHAPE = (6, 1, 8, 8)


def tiny_unet(seed: int = 0) -> ClassConditionalUNet:
    torch.manual_seed(seed)
    return ClassConditionalUNet(block_out_channels=(16, 32)).eval()


@pytest.fixture(scope="module")
def digits():
    return load_digit_images()


@pytest.fixture(scope="module")
def ddim():
    return make_ddim_scheduler(make_ddpm_scheduler(), num_inference_steps=5)


@pytest.fixture(scope="module")
def flow():
    return make_flow_scheduler(num_inference_steps=5)


def labels_for(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def test_samplers_are_deterministic_per_seed(ddim, flow):
    model = tiny_unet()
    predict = cfg_predictor(model, labels_for(SHAPE[0]), guidance_scale=3.0)
    runs = {
        "ddim": lambda seed: sample_ddim(predict, ddim, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(seed)),
        "flow_sde": lambda seed: sample_flow(
            predict, flow, SHAPE, noise_level=0.7, generator=torch.Generator().manual_seed(seed)
        ),
    }
    for run in runs.values():
        a, b, c = run(0), run(0), run(1)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
        assert not torch.allclose(a.sample, c.sample)
        assert a.latents.shape == (SHAPE[0], 6, *SHAPE[1:]) and a.log_probs.shape == (SHAPE[0], 5)


def test_cfg_predictor_endpoints():
    model = tiny_unet()
    labels = labels_for(SHAPE[0])
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 500)
    with torch.no_grad():
        conditional = model(x, t, labels)
        unconditional = model(x, t, torch.full_like(labels, model.null_label))
        assert torch.allclose(cfg_predictor(model, labels, 1.0)(x, t), conditional, atol=1e-5)
        assert torch.allclose(cfg_predictor(model, labels, 0.0)(x, t), unconditional, atol=1e-5)
        guided = cfg_predictor(model, labels, 4.0)(x, t)
        assert torch.allclose(guided, unconditional + 4.0 * (conditional - unconditional), atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_reproduces_scheduler_step(ddim, eta):
    x, output = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in ddim.timesteps:
        ours = ddim_step(ddim, output, t, x, eta, generator=torch.Generator().manual_seed(3))
        theirs = ddim.step(output, t, x, eta=eta, generator=torch.Generator().manual_seed(3)).prev_sample
        assert torch.allclose(ours.sample, theirs, atol=1e-5)
        assert (ours.log_prob is None) == (eta == 0.0)


def test_flow_ode_step_reproduces_scheduler_step():
    scheduler = make_flow_scheduler(num_inference_steps=5)
    x, output = torch.randn(SHAPE), torch.randn(SHAPE)
    for i, t in enumerate(scheduler.timesteps):
        ours = flow_step(scheduler, output, i, x, noise_level=0.0)
        assert torch.allclose(ours.sample, scheduler.step(output, t, x).prev_sample, atol=1e-6)
        assert ours.log_prob is None


def test_step_log_probs_match_gaussian_density(ddim, flow):
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    a = 0.7
    for i in range(len(flow.timesteps)):
        step = flow_step(flow, v, i, x, noise_level=a, generator=torch.Generator().manual_seed(i))
        sigma, sigma_next = flow.sigmas[i].item(), flow.sigmas[i + 1].item()
        dt = sigma_next - sigma
        std_dev = a * math.sqrt(sigma / (1 - (flow.sigmas[1].item() if sigma == 1 else sigma)))
        mean = x * (1 + std_dev**2 / (2 * sigma) * dt) + v * (1 + std_dev**2 * (1 - sigma) / (2 * sigma)) * dt
        density = torch.distributions.Normal(mean, std_dev * math.sqrt(-dt))
        assert torch.allclose(step.mean, mean, atol=1e-5)
        assert torch.allclose(step.log_prob, density.log_prob(step.sample).mean(dim=(1, 2, 3)), atol=1e-4)
        rescored = flow_step(flow, v, i, x, noise_level=a, prev_sample=step.sample)
        assert torch.allclose(rescored.log_prob, step.log_prob)
    per_sample_steps = torch.arange(SHAPE[0]) % len(flow.timesteps)
    batched = flow_step(flow, v, per_sample_steps, x, noise_level=a, prev_sample=x)
    for b, i in enumerate(per_sample_steps.tolist()):
        single = flow_step(flow, v[b : b + 1], i, x[b : b + 1], noise_level=a, prev_sample=x[b : b + 1])
        assert torch.allclose(batched.log_prob[b], single.log_prob[0], atol=1e-5)
    t = ddim.timesteps[2]
    step = ddim_step(ddim, v, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    density = torch.distributions.Normal(step.mean, step.std)
    assert torch.allclose(step.log_prob, density.log_prob(step.sample).mean(dim=(1, 2, 3)), atol=1e-4)


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_truncated_backprop_reaches_only_last_k_steps(ddim):
    model, labels = tiny_unet(), labels_for(SHAPE[0])
    predict = cfg_predictor(model, labels, guidance_scale=2.0)
    grad_enabled_calls = []
    model.register_forward_hook(lambda *_: grad_enabled_calls.append(torch.is_grad_enabled()))

    def backprop(grad_steps: int, checkpoint: bool = True):
        model.zero_grad()
        grad_enabled_calls.clear()
        trajectory = sample_ddim(
            predict, ddim, SHAPE, generator=torch.Generator().manual_seed(0), grad_steps=grad_steps, checkpoint=checkpoint
        )
        forward_calls = list(grad_enabled_calls)
        trajectory.sample.square().sum().backward()
        return trajectory, forward_calls, grads(model)

    trajectory, calls, last_step_grads = backprop(grad_steps=1)
    assert calls == [False] * 4 + [True]
    # Manual last step from the stored state: the final sample is μ_θ(x) + constant noise.
    model.zero_grad()
    x, t = trajectory.latents[:, -2], ddim.timesteps[-1]
    step = ddim_step(ddim, predict(x, t.expand(SHAPE[0])), t, x, prev_sample=trajectory.latents[:, -1])
    noise_term = trajectory.latents[:, -1] - trajectory.means[:, -1]
    (step.mean + noise_term).square().sum().backward()
    assert torch.allclose(last_step_grads, grads(model), atol=1e-5)

    _, calls, two_step_grads = backprop(grad_steps=2)
    assert calls == [False] * 3 + [True] * 2
    _, _, two_step_grads_plain = backprop(grad_steps=2, checkpoint=False)
    assert torch.allclose(two_step_grads, two_step_grads_plain, atol=1e-5)
    assert not torch.allclose(two_step_grads, last_step_grads)
    assert torch.equal(backprop(grad_steps=5)[0].latents, trajectory.latents)


def test_training_losses_decrease_on_digits(digits):
    images, labels = digits
    ddpm = make_ddpm_scheduler()
    losses = {
        "diffusion": lambda m, g: diffusion_loss(m, ddpm, images[:256], labels[:256], generator=g),
        "flow": lambda m, g: flow_matching_loss(m, images[:256], labels[:256], generator=g),
    }
    for loss_fn in losses.values():
        model = tiny_unet().train()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

        def held_loss():
            with torch.no_grad():
                return loss_fn(model, torch.Generator().manual_seed(123)).item()

        before = held_loss()
        generator = torch.Generator().manual_seed(0)
        for _ in range(15):
            optimizer.zero_grad()
            loss_fn(model, generator).backward()
            optimizer.step()
        assert held_loss() < 0.7 * before


def test_lora_trains_only_adapters_and_soup_interpolates():
    base = tiny_unet()
    x, t, labels = torch.randn(SHAPE), torch.full((SHAPE[0],), 300), labels_for(SHAPE[0])
    with torch.no_grad():
        base_out = base(x, t, labels)
    model = add_lora(base)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert any("to_q" in name for name in trainable) and any("conv1" in name for name in trainable)
    pretrained = lora_state(model)
    with torch.no_grad():
        assert torch.allclose(model(x, t, labels), base_out, atol=1e-6)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        finetuned_out = model(x, t, labels)
        finetuned = lora_state(model)
        assert not torch.allclose(finetuned_out, base_out, atol=1e-3)
        for coef, expected in [(0.0, base_out), (1.0, finetuned_out)]:
            load_lora_soup(model, pretrained, finetuned, coef)
            assert torch.allclose(model(x, t, labels), expected, atol=1e-5)
        load_lora_soup(model, pretrained, finetuned, 0.5)
        middle = model(x, t, labels)
        assert not torch.allclose(middle, base_out, atol=1e-3) and not torch.allclose(middle, finetuned_out, atol=1e-3)


def test_judges_and_feature_metrics(digits):
    images, labels = digits
    judges = train_judges(images, labels, seed=0, epochs=15)
    assert accuracy(judges.proxy, images, labels) > 0.9 and accuracy(judges.gold, images, labels) > 0.9
    features = extract_features(judges.gold, images)
    assert abs(frechet_distance(features, features)) < 1e-6
    assert precision_recall(features, features) == (1.0, 1.0)
    noisy = extract_features(judges.gold, images + 0.5 * torch.randn_like(images))
    assert frechet_distance(features, noisy) > 0.1
