"""rl_watermark: GRPO advantages and losses, the straight-through split, gate and detector, attacks, rewards, CLI."""
import json
import math
import random

import pytest
import torch

from methods.language_models.gated_bias import entropies, gated_bias
from methods.engines.grpo import group_advantages, minmax_normalize, policy_loss, reward_gradient_loss
from methods.language_models.learned_split import (LearnedSplitWatermark, SplitEncoder, bias_logits, detection_mask,
                                                   detection_score, entropy, green_fraction, policy_logprobs,
                                                   sign_ste, vocabulary_mapping)
from methods.language_models.rl_watermark import rewards
from methods.language_models.text_attacks import ANTONYMS, HATE_PHRASES, hate_spoof, paraphrase, sentiment_spoof

torch.set_num_threads(1)


# --- GRPO ----------------------------------------------------------------------------------------


def test_group_advantages_are_normalised_within_each_group():
    rewards_ = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    adv = group_advantages(rewards_)
    assert torch.allclose(adv[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert adv[0].std().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # a constant group carries no signal
    assert torch.equal(adv[0].argsort(), torch.arange(4))
    assert torch.allclose(minmax_normalize(rewards_)[0], torch.tensor([0.0, 0.2, 0.4, 1.0]))


def test_policy_loss_unclipped_and_clipped():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.1]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = policy_loss(new, old, adv, mask, clip=0.0)
    ratio = new.detach().exp()
    assert loss.item() == pytest.approx((-(adv[:, None] * ratio) * mask).sum().item() / 5)
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0, 0] < 0 and grad[1, 0] > 0 and grad[0, 2] == 0  # raise logp of A > 0 tokens, masked token: 0
    (grad,) = torch.autograd.grad(policy_loss(new, old, adv, mask, clip=0.2), new)
    assert grad[0, 0] == 0  # ρ = e^0.5 > 1.2 with A > 0: clipped
    assert grad[1, 1] == 0  # ρ = e^−0.5 < 0.8 with A < 0: clipped
    assert grad[1, 2] != 0  # inside the trust region


def test_reward_gradient_loss_flows_to_rewards_only():
    rewards_ = torch.tensor([0.3, -0.1], requires_grad=True)
    ratio = torch.ones(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    loss = reward_gradient_loss(rewards_, ratio, mask)
    grad_r, grad_ratio = torch.autograd.grad(loss, [rewards_, ratio], allow_unused=True)
    assert torch.allclose(grad_r, torch.tensor([-3 / 4, -1 / 4])) and grad_ratio is None


# --- learned split, embedding and detection --------------------------------------------------------


def test_sign_ste_is_sign_forward_identity_backward():
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    y = sign_ste(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, 1.0, 1.0]))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.ones(3))


def test_green_bits_are_the_same_with_and_without_gradient():
    e = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    tracked = SplitEncoder.bits(e.clone().requires_grad_())
    assert tracked.requires_grad and torch.equal(tracked.detach(), torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0]))
    untracked = SplitEncoder.bits(e)
    assert not untracked.requires_grad and torch.equal(untracked, tracked.detach())


def test_vocabulary_mapping_is_the_dev_code_python_random_map():
    rng = random.Random(66)
    assert vocabulary_mapping(50, 384) == [rng.randint(0, 383) for _ in range(50)]
    encoder = SplitEncoder(50, dim=8, hidden=4)
    green = encoder(torch.randint(0, 50, (2, 5)))
    assert green.shape == (2, 5, 50) and set(green.unique().tolist()) <= {0.0, 1.0}
    same_dim = [v for v in range(50) if encoder.mapping[v] == encoder.mapping[0]]
    assert (green[..., same_dim] == green[..., :1]).all()  # tokens mapped to one dimension share its colour


def test_entropy_is_minus_sum_p_log_p():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 4
    logits[0] = 3.0  # uniform
    logits[1, 7] = 60.0  # nearly deterministic
    p = torch.softmax(logits.double(), -1)
    assert torch.allclose(entropy(logits).double(), -(p * p.log()).sum(-1), atol=1e-5)
    assert entropy(logits)[0].item() == pytest.approx(math.log(50), abs=1e-5)


def test_encoder_step_continues_the_full_pass():
    torch.manual_seed(0)
    encoder = SplitEncoder(40, dim=6, hidden=8)
    ids = torch.randint(0, 40, (3, 7))
    full = encoder.embedding(ids)
    e, hidden = encoder.last(ids[:, :4])
    assert torch.allclose(e, full[:, 3], atol=1e-6)
    for t in range(4, 7):
        e, hidden = encoder.step(ids[:, t], hidden)
        assert torch.allclose(e, full[:, t], atol=1e-6)


def test_bias_is_multiplicative_and_gated_by_entropy():
    torch.manual_seed(0)
    encoder = SplitEncoder(20, dim=6, hidden=4)
    prompt = torch.randint(0, 20, (2, 4))
    processor = LearnedSplitWatermark(encoder, prompt_len=4, delta=0.5, alpha=1.0, measure_threshold=2)
    peaked = torch.full((2, 20), -10.0)
    peaked[:, 3] = 10.0  # entropy ≈ 0
    flat = torch.randn(2, 20)
    green = encoder(prompt)[:, -1]
    assert torch.allclose(processor(prompt, flat), flat * (1 + 0.5 * green))  # 0 generated: always on
    late = torch.cat([prompt, torch.randint(0, 20, (2, 3))], dim=1)  # 3 generated > measure_threshold
    assert torch.equal(processor(late, peaked), peaked)  # H ≤ α: no bias
    green_late = encoder(late)[:, -1]
    assert torch.allclose(processor(late, flat), flat * (1 + 0.5 * green_late))  # H > α
    gate = torch.tensor([True, False])
    assert torch.equal(bias_logits(flat, green, 0.5, gate)[1], flat[1])


def test_fused_entropy_matches_the_softmax_entropy():
    torch.manual_seed(0)
    for vocab in (37, 2048):  # a vocabulary that is not a multiple of the kernel's 16 lanes, and a large one
        logits = torch.randn(8, vocab) * torch.tensor([0.0, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0])[:, None]
        assert torch.allclose(entropies(logits), entropy(logits), atol=2e-5, rtol=1e-5)
    masked = torch.randn(2, 300) * 2
    masked[:, ::3] = -math.inf  # tokens removed by an earlier processor: probability 0
    unmasked = entropy(masked[:, torch.arange(300) % 3 != 0])
    assert torch.allclose(entropies(masked), unmasked, atol=2e-5) and torch.allclose(entropy(masked), unmasked)


def test_fused_gated_bias_equals_the_reference_formula():
    torch.manual_seed(0)
    encoder = SplitEncoder(37, dim=6, hidden=4)
    scores = torch.randn(6, 37) * torch.tensor([0.1, 0.0, 0.0, 0.5, 5.0, 20.0])[:, None]
    scores[1, 4] = 50.0  # peaked: H ≈ 0, gate off
    scores[2] = -2.0
    scores[2, :3] = 0.0  # only 3 logits near the maximum, yet H ≈ 3.2 > α: the gate needs H itself
    e = torch.randn(6, 6)
    e[0, 0], e[1, 1] = 0.0, -0.0  # sign 0: bit ½
    green = encoder.to_vocabulary(encoder.bits(e))
    gate = entropy(scores) > 1.5
    assert gate[[0, 2]].all() and not gate[1] and ((entropy(scores) - 1.5).abs() > 1e-3).all()
    before = scores.clone()
    fused = gated_bias(scores, e, encoder.mapping, 0.13, 1.5, always=False)
    assert torch.equal(fused, bias_logits(scores, green, 0.13, gate)) and torch.equal(scores, before)
    always = gated_bias(scores, e, encoder.mapping, 0.13, 1.5, always=True)
    assert torch.equal(always, bias_logits(scores, green, 0.13, torch.ones(6, dtype=torch.bool)))


def test_processor_outside_the_fused_kernel_gives_the_same_scores():
    torch.manual_seed(0)
    encoder = SplitEncoder(20, dim=6, hidden=4)
    processor = LearnedSplitWatermark(encoder, prompt_len=4, delta=0.5, alpha=1.0, measure_threshold=2)
    ids = torch.randint(0, 20, (3, 8))
    scores = torch.randn(3, 20) * torch.tensor([0.1, 5.0, 50.0])[:, None]
    assert (entropy(scores) > 1.0).tolist() == [True, True, False]
    fused = processor(ids, scores)
    unfused = processor(ids, scores.double())  # float64 scores take the torch path
    assert unfused.dtype == torch.float64 and torch.allclose(fused.double(), unfused)
    assert not torch.equal(fused[0], scores[0]) and torch.equal(fused[2], scores[2])


def test_detection_scores_the_first_tokens_and_high_entropy_ones():
    continuation = torch.tensor([[False, False, True, True, True, True]])
    logits = torch.zeros(1, 6, 5)  # uniform: entropy log 5 ≈ 1.6
    logits[0, 3, 0] = 50.0  # the position before token 4 has entropy ≈ 0
    scored = detection_mask(logits, continuation, alpha=1.0, measure_threshold=1)
    assert scored.tolist() == [[False, False, True, True, False, True]]
    ids = torch.tensor([[0, 1, 2, 3, 4, 0]])
    green = torch.zeros(1, 6, 5)
    green[0, 1, 2] = green[0, 2, 3] = 1.0  # tokens 2 and 3 green, token 5 red
    assert detection_score(green, ids, scored).item() == pytest.approx(2 / 3)
    green.zero_()[:, :, :3] = 1.0
    assert green_fraction(green, scored).item() == pytest.approx(3 / 5)


def test_policy_logprobs_match_the_processor_used_in_generation():
    torch.manual_seed(1)
    encoder = SplitEncoder(30, dim=5, hidden=4)
    ids = torch.randint(0, 30, (3, 9))
    lm_logits = torch.randn(3, 9, 30) * 3
    continuation = torch.arange(9)[None].expand(3, 9) >= 4
    processor = LearnedSplitWatermark(encoder, prompt_len=4, delta=0.13, alpha=1.5, measure_threshold=2)
    logp = policy_logprobs(lm_logits, encoder(ids), ids, continuation, 0.13, 1.5, 2)
    for t in range(4, 9):
        expected = torch.log_softmax(processor(ids[:, :t], lm_logits[:, t - 1]), -1).gather(-1, ids[:, t : t + 1])
        assert torch.allclose(logp[:, t - 1], expected.squeeze(-1), atol=1e-5)


def test_rewards_are_anchored_and_regularised():
    s = {"wm": torch.tensor([0.8]), "orig": torch.tensor([0.5]), "para": torch.tensor([0.7]),
         "senti": torch.tensor([0.4]), "latter": torch.tensor([0.5]), "hate": torch.tensor([0.6])}
    r = rewards(s, torch.tensor([0.9]), reg_weight=2.0)
    assert r["d1"].item() == pytest.approx(0.3) and r["d2"].item() == pytest.approx(0.2)
    assert r["total"].item() == pytest.approx(0.3 + 0.2 - 2.0 * 0.4)


# --- attacks -------------------------------------------------------------------------------------


def test_spoofing_attacks_edit_the_meaning():
    rng = random.Random(0)
    text = "Return true if the file is valid. The buffer is empty."
    flipped = sentiment_spoof(text, rng)
    assert "false" in flipped and "invalid." not in text and flipped != text
    latter = sentiment_spoof(text, rng, latter_only=True)
    assert latter.split(" ")[:5] == text.split(" ")[:5] and latter != text
    assert any(p in hate_spoof(text, rng) for p in HATE_PHRASES)
    assert sentiment_spoof("no listed words here", rng).count("not") == 1
    assert all(isinstance(v, str) for v in ANTONYMS.values())


def test_paraphrase_replaces_and_deletes_tokens():
    tokens = list(range(10))
    probs = torch.full((10, 12), 1 / 12)
    gen = torch.Generator().manual_seed(0)
    assert paraphrase(tokens, probs, gen, replace=0.0, delete=0.0) == tokens
    replaced = paraphrase(tokens, probs, gen, replace=1.0, delete=0.0)
    assert len(replaced) == 10 and all(a != b for a, b in zip(replaced, tokens))
    assert paraphrase(tokens, probs, gen, replace=0.0, delete=1.0) == []


# --- CLI -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_reproduce_quick_tiny(ray_session, tmp_path):
    from pipelines.cli import main

    out = tmp_path / "rl"
    sets = ["num_workers=0", "seeds=1", "iterations=2", "batch_prompts=2", "group=2", "n_eval=6", "n_train_prompts=4",
            "pretrain_epochs=1", "lm_dim=32", "lm_layers=1", "continuation_tokens=16", "embed_dim=16", "vocab_size=400"]
    assert main(["reproduce", "rl_watermark", "--quick", "--set", *sets, "--out", str(out)]) == 0
    claims = json.loads((out / "claim.json").read_text())
    assert len(claims["more"]) == 3
    assert all(c["verdict"] in ("reproduced", "inconclusive", "contradicted") for c in [claims, *claims["more"]])
    assert (out / "results.parquet").exists() and (out / "history.parquet").exists()
    assert (out / "rl_watermark.png").exists()


def test_claims_pair_the_arms_by_seed():
    import numpy as np

    from methods.language_models.rl_watermark import Results, RLWatermarkConfig, claims, plan

    cfg = RLWatermarkConfig(seeds=3)
    runs = plan(cfg, [1.0, 0.0])
    assert [(r.key, r.arm) for r in runs[:3]] == [("kgw/0", "kgw"), ("rl/0/1.0", "rl_reg1"), ("rl/0/0.0", "rl_reg0")]
    rows = [{"arm": r.arm, "seed": r.seed, "auc_spoof": 0.6 if r.reg_weight is not None else 0.95 + 0.01 * r.seed,
             "auc_wm": 0.97, "auc_para": 0.9, "green_fraction_wm": 0.5 + (0.1 + 0.01 * r.seed) * (r.reg_weight == 0)}
            for r in runs]
    table = {k: np.array([row[k] for row in rows]) for k in rows[0]}
    spoof, detectable, paraphrase, drift = claims(cfg, Results(table, {}), None)
    assert spoof.pairs == [0, 1, 2] and spoof.difference == pytest.approx(0.36) and spoof.verdict == "reproduced"
    assert spoof.margin == 0.05 and detectable.margin == paraphrase.margin == -0.1
    assert drift.method_per_seed == pytest.approx([0.1, 0.11, 0.12]) and drift.baseline_per_seed == [0.0] * 3
    assert drift.verdict == "reproduced" and detectable.verdict == "reproduced"  # equal AUCs: within the 0.1 bound
