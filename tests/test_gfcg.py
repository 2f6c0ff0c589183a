"""GFCG: reference-class selection and scales on a planted classifier, composition with CFG/ATG, the CLI."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from methods.generative.gfcg import GFCGConfig, cfg_matched_recall, first_crossing
from methods.generative.guidance import GradientFreeClassifierGuidance, denoised, guided_predictor
from methods.generative.schedules import make_ddim_scheduler, make_ddpm_scheduler

torch.set_num_threads(1)


class LabelModel(nn.Module):
    """D(x; c) = x + c/10: a planted denoiser whose output identifies the label it was given."""

    null_label = 10

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset
        self.labels_seen: list[torch.Tensor] = []

    def forward(self, x, t, labels):
        self.labels_seen.append(labels.clone())
        return x + labels.float().view(-1, 1, 1, 1) / 10 + self.offset


class PlantedClassifier(nn.Module):
    """Ignores the image: returns fixed logits per batch row and records whether autograd was on."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.grad_enabled: list[bool] = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.logits[: x.shape[0]]


@pytest.fixture(scope="module")
def ddim():
    return make_ddim_scheduler(make_ddpm_scheduler(), num_inference_steps=4)


PROBS = torch.tensor([[0.70, 0.20, 0.10, 0.00],   # target 0 → ref 1, p_ref/p_c = 2/7
                      [0.10, 0.30, 0.60, 0.00],   # target 1 → ref 2 (more probable than the target): ratio capped at 1
                      [0.25, 0.25, 0.25, 0.25]])  # target 3 → tie among 0,1,2: first index
LABELS = torch.tensor([0, 1, 3])


@pytest.mark.parametrize("rule, expected", [("ratio", [2 / 7, 1.0, 1.0]), ("confusion", [0.3, 0.7, 0.75])])
def test_reference_is_most_confusable_other_class(rule, expected):
    guider = GradientFreeClassifierGuidance(guidance_scale=2.0, scale_rule=rule)
    ref, scale = guider.reference(PROBS, LABELS)
    assert ref.tolist() == [1, 2, 0]
    assert torch.allclose(scale, 2.0 * torch.tensor(expected))
    sharp = GradientFreeClassifierGuidance(guidance_scale=1.0, gamma=2.0).reference(PROBS, LABELS)[1]
    assert torch.allclose(sharp[0], torch.tensor((2 / 7) ** 2))


def test_gfcg_pushes_away_from_planted_reference(ddim):
    logits = PROBS.log().clamp_min(-30)
    classifier, model = PlantedClassifier(logits), LabelModel()
    trace = []
    guider = GradientFreeClassifierGuidance(guidance_scale=2.0)
    predict = guided_predictor(model, LABELS, ddim, gfcg=guider, classifier=classifier, trace=trace)
    x, t = torch.randn(3, 1, 8, 8), ddim.timesteps[1].expand(3)
    out = predict(x, t)
    ref, scale = trace[-1]
    assert ref.tolist() == [1, 2, 0] and classifier.grad_enabled == [False]
    cond = model(x, t, LABELS)
    expected = cond + scale.view(-1, 1, 1, 1) * (cond - model(x, t, ref))
    assert torch.allclose(out, expected)
    # target 0, ref 1: output moves by −s·0.1 (away from the reference label's output)
    assert torch.allclose(out[0] - cond[0], torch.full_like(cond[0], -0.1 * scale[0].item()))


def test_denoised_estimate_inverts_forward_noising(ddim):
    x0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = ddim.timesteps[:2]
    x_t = make_ddpm_scheduler().add_noise(x0, eps, t)
    assert torch.allclose(denoised(ddim, x_t, t, eps), x0, atol=1e-4)


def test_gfcg_window_and_composition_with_cfg_and_atg(ddim):
    x = torch.randn(3, 1, 8, 8)
    classifier = PlantedClassifier(PROBS.log().clamp_min(-30))
    model, weak = LabelModel(), LabelModel(offset=0.5)
    for step, t in enumerate(ddim.timesteps):
        tb = t.expand(3)
        cond, uncond = model(x, tb, LABELS), model(x, tb, torch.full_like(LABELS, 10))
        cfg = guided_predictor(model, LABELS, ddim, base="cfg", scale=3.0)(x, tb)
        assert torch.allclose(cfg, uncond + 3.0 * (cond - uncond))
        atg = guided_predictor(model, LABELS, ddim, base="atg", scale=2.0, weak=weak)(x, tb)
        assert torch.allclose(atg, weak(x, tb, LABELS) + 2.0 * (cond - weak(x, tb, LABELS)))
        trace = []
        late = GradientFreeClassifierGuidance(guidance_scale=1.0, start=0.5)
        both = guided_predictor(model, LABELS, ddim, base="atg", scale=2.0, weak=weak, gfcg=late,
                                classifier=classifier, trace=trace)(x, tb)
        if step < 2:
            assert not trace and torch.allclose(both, atg)
        else:
            ref, s = trace[0]
            assert torch.allclose(both, atg + s.view(-1, 1, 1, 1) * (cond - model(x, tb, ref)))
    off = GradientFreeClassifierGuidance(guidance_scale=0.0)
    plain = guided_predictor(model, LABELS, ddim, gfcg=off, classifier=classifier)(x, ddim.timesteps[0].expand(3))
    assert torch.allclose(plain, model(x, ddim.timesteps[0].expand(3), LABELS))


def test_cfg_matched_recall_interpolates_on_class_precision():
    cfg = GFCGConfig(cfg_scales=[2.0, 4.0, 8.0], combo_cfg_scale=2.0)
    points = {"cond": (0.80, 0.90), "cfg@2": (0.90, 0.70), "cfg@4": (1.00, 0.30), "cfg@8": (1.00, 0.10),
              "gfcg": (0.95, 0.65), "top": (1.00, 0.5), "low": (0.7, 0.9)}
    results = [{"arm": a, "seed": 0, "class_precision": p, "recall": r} for a, (p, r) in points.items()]
    assert np.allclose(cfg_matched_recall(results, cfg, "gfcg", 1.0)[0], 0.5)  # per seed
    assert np.allclose(cfg_matched_recall(results, cfg, "top", 1.0)[0], 0.3)  # smallest scale reaching 1.0
    assert np.allclose(cfg_matched_recall(results, cfg, "gfcg", 2.0)[0], 0.5)
    assert np.allclose(cfg_matched_recall(results, cfg, "low", 2.0)[0], 0.7)  # below the curve's start
    assert first_crossing(1.2, [0.8, 0.9, 0.85], [0.9, 0.6, 0.7]) == 0.6  # never reached: most precise point


def test_combo_scale_must_be_a_cfg_arm():
    with pytest.raises(ValueError, match="combo_cfg_scale"):
        GFCGConfig(cfg_scales=[2.0], combo_cfg_scale=1.5)


TINY = ["gen_epochs=1", "weak_epochs=1", "judge_epochs=1", "gen_channels=[16,32]", "weak_channels=[8,16]",
        "num_inference_steps=3", "samples_per_class=6", "cfg_scales=[1.5,3.0]", "seeds=1"]


@pytest.mark.integration
def test_gfcg_reproduce_end_to_end_through_cli(ray_session, tmp_path, tmp_path_factory):
    from pipelines.cli import main

    out, cache = tmp_path / "gfcg", tmp_path_factory.getbasetemp() / "generative-cache"  # shared with alignprop
    assert main(["reproduce", "gfcg", "--quick", "--out", str(out), "--set", *TINY, f"cache_dir={cache}"]) == 0
    claim = json.loads((out / "claim.json").read_text())
    assert "class precision" in claim["metric"] and len(claim["more"]) == 6
    table = pq.read_table(out / "results.parquet").to_pydict()
    assert set(table["arm"]) == {"cond", "cfg@1.5", "cfg@3", "atg", "gfcg", "cfg@1.5+gfcg", "atg+gfcg"}
    nfe = dict(zip(table["arm"], table["nfe"]))
    assert nfe["cond"] == 1 and nfe["cfg@3"] == 2 and nfe["gfcg"] == 2 and nfe["atg+gfcg"] == 3
    assert all(0 <= v <= 1 for v in table["class_precision"])
    assert (out / "precision_recall.png").exists() and (out / "gfcg_guider" / "guider_config.json").exists()
    assert len(list(cache.glob("ddpm-*/weights.pt"))) >= 2 and list(cache.glob("judges-*/weights.pt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["claims"]["deviations"]
