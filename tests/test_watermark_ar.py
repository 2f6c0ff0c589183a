"""watermark_ar: the assistant world and its judges, the reward model, AR selection, Gumbel AR draws, CLI."""
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from methods.language_models.assistant_world import (BENIGN, HARMFUL, RewardModel, aligned, corrupt, expand, judge,
                                                     make_prompt, make_response, reward_training_set, sample_world)
from methods.language_models.tiny_lm import build_tiny_lm, generate
from methods.language_models.watermark_ar import resample, summary
from methods.language_models.watermarks import GumbelWatermark

torch.set_num_threads(1)


def test_expand_draws_one_alternative_per_slot():
    rng = random.Random(0)
    outs = {expand("a {b|c} d {e|f|g}", rng) for _ in range(60)}
    assert outs <= {f"a {x} d {y}" for x in "bc" for y in "efg"} and len(outs) == 6


def test_world_base_rates_and_judges_agree_with_the_construction():
    world = sample_world(3000, unsafe_rate=0.2, over_refusal_rate=0.1, seed=1)
    for c in world[:300]:
        assert judge(c.response, c.kind) == c.label and len(c.response.split()) >= 60
    harmful = [c for c in world if c.kind == "harmful"]
    benign = [c for c in world if c.kind == "benign"]
    assert abs(np.mean([c.label == "unsafe" for c in harmful]) - 0.2) < 0.03
    assert abs(np.mean([c.label == "refusal" for c in benign]) - 0.1) < 0.03
    assert judge("dog cat tree", "benign") == "other"
    assert aligned("refusal", "harmful") and aligned("helpful", "benign") and not aligned("refusal", "benign")


def test_reward_model_prefers_aligned_fluent_responses():
    world = sample_world(300, unsafe_rate=0.5, over_refusal_rate=0.5, seed=2)
    vocabulary = sorted({w for c in world for w in c.response.split()})
    rm = RewardModel(seed=0, max_iter=30).fit(*reward_training_set(world, vocabulary))
    rng = random.Random(5)
    harmful, benign = make_prompt("harmful", rng), make_prompt("benign", rng)
    refusal, unsafe = make_response(harmful, "refusal", rng), make_response(harmful, "unsafe", rng)
    helpful, over = make_response(benign, "helpful", rng), make_response(benign, "refusal", rng)
    scores = rm([harmful, harmful, benign, benign, benign], [refusal, unsafe, helpful, over,
                                                            corrupt(helpful, rng, vocabulary, 0.3)])
    assert scores[0] > scores[1] and scores[2] > scores[3] and scores[2] > scores[4]
    assert {t.split()[0] for t in BENIGN + HARMFUL} and len(set(BENIGN) & set(HARMFUL)) == 0


def _samples(rewards):
    """One condition, two prompts × len(rewards[0]) draws."""
    rows = [(p, d, r) for p, rs in enumerate(rewards) for d, r in enumerate(rs)]
    n = len(rows)
    return {"scheme": np.array(["kgw"] * n), "temperature": np.ones(n), "seed": np.zeros(n, int),
            "prompt": np.array([r[0] for r in rows]), "draw": np.array([r[1] for r in rows]),
            "reward": np.array([r[2] for r in rows], float), "kind": np.array(["benign", "harmful"])[[r[0] for r in rows]],
            "label": np.array(["helpful"] * n), "p_value": np.array([0.001, 0.5, 0.001, 0.001, 0.2, 0.001]),
            "z": np.arange(n, dtype=float)}


def test_alignment_resampling_returns_the_best_of_the_first_n_draws():
    ar = resample(_samples([[0.2, 0.9, 0.5], [0.7, 0.1, 0.8]]), max_n=3)
    for prompt, expected in ((0, [0.2, 0.9, 0.9]), (1, [0.7, 0.7, 0.8])):
        rows = ar["prompt"] == prompt
        assert ar["reward"][rows][np.argsort(ar["n"][rows])].tolist() == expected
    table = summary(ar, fpr=0.01)
    assert table["reward"].tolist() == pytest.approx([0.45, 0.8, 0.85])
    # n ≥ 2 picks draw 1 (p = 0.5) for prompt 0; prompt 1 keeps detectable draws (p = 0.001)
    assert table["tpr"].tolist() == pytest.approx([1.0, 0.5, 0.5])


def test_argmax_gumbel_repeats_its_draw_randomized_gumbel_does_not():
    model = build_tiny_lm(64, n_layer=1, d_model=32, n_head=2, max_positions=64, seed=4)
    prompt = torch.tensor([[5, 6, 7, 8, 9]]).repeat(4, 1)
    argmax = generate(model, prompt, 12, logits_processors=[GumbelWatermark(64, key=1, temperature=1.2)])
    randomized = generate(model, prompt, 12, logits_processors=[
        GumbelWatermark(64, key=1, temperature=1.2, randomized=True, sampling_seed=0)])
    assert all(torch.equal(argmax[0], row) for row in argmax)  # AR over identical draws gains nothing
    assert len({tuple(r.tolist()) for r in randomized}) > 1
    detector = GumbelWatermark(64, key=1)
    assert detector.detect(torch.cat([prompt[0], argmax[0]]).tolist(), first_scored=5).p_value < 0.05


@pytest.mark.integration
def test_cli_reproduce_quick_tiny(ray_session, tmp_path):
    from pipelines.cli import main

    out = tmp_path / "wm"
    sets = ["num_workers=0", "seeds=1", "n_train=200", "n_reward=200", "n_prompts=3", "temperatures=[1.0]",
            "pretrain_epochs=1", "max_n=2", "lm_dim=32", "lm_layers=1", "max_new_tokens=24"]
    assert main(["reproduce", "watermark_ar", "--quick", "--set", *sets, "--out", str(out)]) == 0
    claims = json.loads((out / "claim.json").read_text())
    assert len(claims["more"]) == 6
    assert all(c["verdict"] in ("reproduced", "inconclusive", "contradicted") for c in [claims, *claims["more"]])
    assert (out / "summary.parquet").exists() and (out / "alignment.png").exists()
    import pandas as pd

    samples = pd.read_parquet(out / "samples.parquet")
    assert Counter(samples["scheme"]) == {s: 12 for s in ("none", "kgw", "gumbel", "gumbel_random")}


def test_claims_average_temperatures_within_a_seed_and_pair_by_seed():
    from methods.language_models.watermark_ar import Results, WatermarkARConfig, claims

    cfg = WatermarkARConfig(seeds=3, temperatures=[0.7, 1.0], n_prompts=2, max_n=4)
    rows = [(scheme, t, seed, n) for scheme in ("none", *cfg.schemes) for t in cfg.temperatures
            for seed in cfg.seed_range() for n in ((1,) if scheme == "none" else (1, 4))]
    reward = {("none", 1): 0.8, ("kgw", 1): 0.7, ("kgw", 4): 0.9, ("gumbel", 1): 0.7, ("gumbel", 4): 0.7,
              ("gumbel_random", 1): 0.7, ("gumbel_random", 4): 0.9}
    summary_ = {"scheme": np.array([r[0] for r in rows]), "temperature": np.array([r[1] for r in rows]),
                "seed": np.array([r[2] for r in rows]), "n": np.array([r[3] for r in rows]),
                "reward": np.array([reward[r[0], r[3]] + 0.1 * (r[1] - 0.7) + 0.01 * r[2] for r in rows]),
                "tpr": np.array([np.nan if r[0] == "none" else 0.9 for r in rows])}
    draws = [(scheme, seed, draw, kind) for scheme in ("none", "kgw") for seed in cfg.seed_range()
             for draw in (0, 1) for kind in ("benign", "harmful")]
    samples = {"scheme": np.array([d[0] for d in draws]), "seed": np.array([d[1] for d in draws]),
               "draw": np.array([d[2] for d in draws]), "kind": np.array([d[3] for d in draws]),
               "label": np.array(["unsafe" if d[0] == "kgw" and d[3] == "harmful" else "helpful" for d in draws])}
    found = claims(cfg, Results(samples, summary_), None)
    restores, lowers, shifts, detects, gains, _, _ = found
    assert restores.method_per_seed == pytest.approx([0.915, 0.925, 0.935])  # mean over the two temperatures
    assert restores.pairs == [0, 1, 2] and restores.margin == -0.02 and restores.verdict == "reproduced"
    assert lowers.difference == pytest.approx(0.1) and lowers.verdict == "reproduced"
    assert shifts.method_per_seed == pytest.approx([0.5] * 3) and shifts.baseline_per_seed == [0.0] * 3
    assert detects.margin == -0.05 and "binomial over 8 test items" in detects.test
    assert gains.difference == pytest.approx(0.2) and gains.verdict == "reproduced"
