"""AlignProp and its DDPO baseline: truncation, reward backprop, PPO pieces, and the CLI end to end."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from methods.generative.alignprop import AlignPropConfig, reward_backprop, truncation_steps
from methods.generative.ddpo import PerPromptStatTracker, ddpo_iteration, ppo_clip_loss
from methods.generative.judges import ConvClassifier, class_log_prob
from methods.generative.models import ClassConditionalUNet, add_lora
from methods.generative.samplers import cfg_predictor, sample_ddim
from methods.generative.schedules import make_ddim_scheduler, make_ddpm_scheduler

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ddim():
    return make_ddim_scheduler(make_ddpm_scheduler(), num_inference_steps=3)


def tiny_lora(seed: int = 0):
    torch.manual_seed(seed)
    model = ClassConditionalUNet(block_out_channels=(16, 32)).eval().requires_grad_(False)
    return add_lora(model)


def tiny_proxy(seed: int = 1):
    torch.manual_seed(seed)
    return ConvClassifier().eval().requires_grad_(False)


def test_truncation_steps():
    gen = torch.Generator().manual_seed(0)
    assert truncation_steps("k1", 20, gen) == 1 and truncation_steps("full", 20, gen) == 20
    uniform = [truncation_steps("uniform", 20, gen) for _ in range(400)]
    assert min(uniform) == 1 and max(uniform) == 20
    gaussian = torch.tensor([truncation_steps("gaussian", 50, gen) for _ in range(400)], dtype=torch.float)
    assert gaussian.min() >= 1 and gaussian.max() <= 50 and abs(gaussian.mean() - 8) < 1.0  # 50 − N(42, 5)


def test_reward_backprop_loss_and_gradients_reach_only_lora(ddim):
    model, proxy = tiny_lora(), tiny_proxy()
    labels = torch.tensor([0, 3, 7, 9])
    loss, rewards = reward_backprop(model, proxy, ddim, labels, torch.Generator().manual_seed(0), 2, loss_coeff=0.5)
    with torch.no_grad():
        x = sample_ddim(cfg_predictor(model, labels), ddim, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rewards, class_log_prob(proxy, x.sample.clamp(-1, 1), labels), atol=1e-5)
    assert torch.allclose(loss, -0.5 * rewards.mean(), atol=1e-6)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for p in proxy.parameters())
    target, _ = reward_backprop(model, proxy, ddim, labels, torch.Generator().manual_seed(0), 1, loss_coeff=1.0,
                                reward_target=0.0)
    assert torch.allclose(target, rewards.abs().mean(), atol=1e-5)


def test_alignprop_updates_raise_the_reward_on_fixed_noise(ddim):
    model, proxy = tiny_lora(), tiny_proxy()
    proxy.head.weight.mul_(30)  # a random CNN is nearly flat; sharpen it so the reward moves
    labels = torch.tensor([1, 2, 3, 4])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)

    def step():
        loss, rewards = reward_backprop(model, proxy, ddim, labels, torch.Generator().manual_seed(5), 3, loss_coeff=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return rewards.mean().item()

    first = step()
    for _ in range(6):
        last = step()
    assert last > first + 0.2


def test_stat_tracker_batch_then_per_prompt():
    tracker = PerPromptStatTracker(buffer=4, min_count=4)
    labels, rewards = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 3.0, 5.0, 7.0])
    batch = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    assert torch.allclose(tracker.advantages(labels, rewards), batch)
    tracker.advantages(labels, rewards)  # each class now holds 4 rewards
    per_prompt = tracker.advantages(labels, torch.tensor([2.0, 2.0, 6.0, 6.0]))
    assert tracker.buffers["0"] == [1.0, 3.0, 2.0, 2.0]
    mean, std = torch.tensor([1.0, 3.0, 2.0, 2.0]).mean(), torch.tensor([1.0, 3.0, 2.0, 2.0]).std(unbiased=False)
    assert torch.allclose(per_prompt[0], (2.0 - mean) / (std + 1e-6))


def test_ppo_clip_loss_clips_the_ratio():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    at_one = torch.zeros(2, requires_grad=True)
    loss = ppo_clip_loss(at_one, old, adv, clip_range=0.1)
    loss.backward()
    assert torch.allclose(loss, -adv.mean()) and torch.allclose(at_one.grad, -adv / 2)
    far = torch.log(torch.tensor([1.5, 0.5])).requires_grad_(True)  # beyond 1 ± ε in the advantage's direction
    ppo_clip_loss(far, old, adv, clip_range=0.1).backward()
    assert torch.equal(far.grad, torch.zeros(2))


def test_ddpo_rescoring_reproduces_sampler_log_probs(ddim):
    model, proxy = tiny_lora(), tiny_proxy()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    stats = ddpo_iteration(model, proxy, ddim, labels, torch.Generator().manual_seed(0), PerPromptStatTracker(),
                           optimizer, minibatch=6, clip_range=1e-4, adv_clip=5.0, max_grad_norm=1.0)
    assert stats["clip_fraction"] == 0.0  # one minibatch: π_θ = π_old, every ratio is 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_pretrain_cache_is_keyed_by_spec_and_skips_training(tmp_path, monkeypatch):
    from methods.generative import pretrain

    spec = pretrain.GeneratorSpec(channels=(16, 32), epochs=1)
    entry = pretrain.cache_entry(tmp_path, spec)
    assert entry.path == pretrain.cache_entry(tmp_path, pretrain.GeneratorSpec(channels=(16, 32), epochs=1)).path
    assert entry.path != pretrain.cache_entry(tmp_path, pretrain.GeneratorSpec(channels=(16, 32), epochs=2)).path
    assert entry.path.name.startswith("ddpm-")
    model = pretrain.build_generator(spec)
    entry.write(lambda folder: torch.save(model.state_dict(), folder / pretrain.WEIGHTS), {"losses": [1.0]})
    monkeypatch.setattr(pretrain.train, "fit", lambda *a, **k: pytest.fail("cached specs must not be retrained"))
    pretrain.ensure_pretrained([spec], AlignPropConfig(), str(tmp_path / "ray"), tmp_path)
    loaded = pretrain.load_generator(tmp_path, spec)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_generator_epoch_lowers_the_pretraining_loss(kind):
    from methods.generative import pretrain
    from methods.generative.data import load_digit_images

    images, labels = load_digit_images()
    spec = pretrain.GeneratorSpec(kind=kind, channels=(16, 32), batch_size=32)
    model = pretrain.build_generator(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    generator = torch.Generator().manual_seed(0)
    losses = [pretrain.generator_epoch(model, optimizer, spec, images[:256], labels[:256], generator) for _ in range(3)]
    assert losses[-1] < losses[0]


def test_budget_validation():
    with pytest.raises(ValueError, match="multiple of ddpo_batch_size"):
        AlignPropConfig(samples=96, eval_every=48, batch_size=16, ddpo_batch_size=32)
    AlignPropConfig(samples=96, eval_every=48, batch_size=16, arms=["k1"])


TINY = ["gen_epochs=1", "judge_epochs=1", "gen_channels=[16,32]", "num_inference_steps=3", "samples=16",
        "eval_every=8", "batch_size=4", "ddpo_batch_size=8", "ddpo_minibatch=4", "eval_per_class=6",
        "soup_coefs=[0.0,1.0]", "seeds=1", "arms=[k1,full,ddpo]"]


@pytest.mark.integration
def test_alignprop_reproduce_end_to_end_through_cli(ray_session, tmp_path, tmp_path_factory):
    from pipelines.cli import main

    out, cache = tmp_path / "alignprop", tmp_path_factory.getbasetemp() / "generative-cache"
    assert main(["reproduce", "alignprop", "--quick", "--out", str(out), "--set", *TINY, f"cache_dir={cache}"]) == 0
    claim = json.loads((out / "claim.json").read_text())
    assert claim["metric"] == "proxy reward at the end of the budget" and len(claim["more"]) == 6
    curves = pq.read_table(out / "curves.parquet").to_pydict()
    assert set(curves["arm"]) == {"k1", "full", "ddpo"} and set(curves["samples"]) == {0, 8, 16}
    costs = json.loads((out / "costs.json").read_text())
    assert set(costs) == {"k1", "full", "full_no_checkpointing"}
    for name in ("rewards.png", "samples.png", "soup.png", "soup.parquet"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["claims"]["deviations"]
