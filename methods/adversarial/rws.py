"""Robust Weight Signatures (Cai, Zhang, Wang, ICML 2023): robustness as a patch of shallow weights.

From one pre-trained θ_pre (trained on ``pretrain_fraction`` of the training set), the rest of the
set fine-tunes a clean model θ_std and, per corruption c of the shared library (whole set corrupted at
``severity``), a robust model θ_c. RWS_c is the orthogonalised weight difference of the first
``keep_layers`` layers (methods.adversarial.signatures); θ_std + α·RWS_c is evaluated on clean and
corrupted test digits for every α, with the 8-bit RWS, and composed, θ_std + Σ_c (α/n_c)·RWS_c.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from methods.adversarial import signatures as rws
from methods.adversarial.robust_training import TrainingConfig, fit_plan, kept, worker
from methods.classifiers import accuracy
from methods.engines.corruptions import CorruptionNames, corrupt
from pipelines.claims import compare, per_seed
from pipelines.pipeline import Outputs, Pipeline
from pipelines.results import columns, subplots
from pipelines.units import run_units, unit_seed

SWEEP_METRIC = "patch_gain"


class RWSConfig(TrainingConfig):
    arch: Literal["mlp", "cnn"] = "mlp"
    pretrain_fraction: float = Field(0.4, gt=0, lt=1, description="share of the train set that trains θ_pre")
    pretrain_epochs: int = Field(20, ge=1)
    finetune_epochs: int = Field(20, ge=1)
    finetune_lr: float = Field(0.01, gt=0, description="SGD lr of the fine-tunes (official recipe: 0.01)")
    corruptions: CorruptionNames = Field(["gaussian_noise", "impulse_noise"], min_length=1)
    severity: int = Field(5, ge=1, le=5)
    keep_layers: int = Field(1, ge=1, description="layers patched, counted from the input")
    alphas: list[float] = Field([0.5, 1.0, 1.5], min_length=1, description="signature strengths α")
    compose_alpha: float = Field(1.0, gt=0, description="α of a composition, α/n_c per signature")


DEVIATIONS = [
    "data: sklearn digits (8×8) in [0, 1] with the shared corruption library instead of CIFAR-10/100-C "
    "and Tiny-ImageNet-C; model: a small MLP or CNN instead of VGG-16 / ResNet-50",
    "θ_pre is trained in-pipeline on part of the training set; fine-tunes use the rest, fixed "
    "corrupted copies at one severity, no augmentation, the last epoch (not the best corrupted-val one)",
    "composition weights α/n_c (the official code's intent; its (α/n_c)² double scaling is not reproduced)",
    "8-bit linear quantisation per tensor only (no log / tanh quantisers); no BN handling (models have no BN)",
    "no cross-dataset transfer or clean-backbone-update experiments",
]


def evaluate_seed(cfg: RWSConfig, models: dict[str, dict], net, test_sets: dict[str, tuple]) -> dict:
    """Accuracy rows (arm, α, test set), per-layer changes, signature cosines and storage for one seed."""
    pre, std = models["pre"], models["clean"]
    keys = rws.first_layers(std, cfg.keep_layers)
    sigs = {c: rws.signature(pre, std, models[c], keys) for c in cfg.corruptions}

    def accs(weights: dict) -> dict[str, float]:
        model = net()
        model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
        return {name: accuracy(model, x, y) for name, (x, y) in test_sets.items()}

    rows = [("clean", "", 0.0, accs(std))] + [("robust", c, 0.0, accs(models[c])) for c in cfg.corruptions]
    rows += [("patch", c, a, accs(rws.patch(std, sigs[c], a))) for c in cfg.corruptions for a in cfg.alphas]
    quantized = {c: rws.quantize(sigs[c]) for c in cfg.corruptions}
    rows += [("patch_int8", c, 1.0, accs(rws.patch(std, rws.dequantize(quantized[c]), 1.0))) for c in cfg.corruptions]
    composed, alpha = std, cfg.compose_alpha / len(cfg.corruptions)
    for c in cfg.corruptions:
        composed = rws.patch(composed, sigs[c], alpha)
    removed = composed
    for c in reversed(cfg.corruptions):
        removed = rws.unpatch(removed, sigs[c], alpha)
    if len(cfg.corruptions) > 1:
        rows.append(("compose", "+".join(cfg.corruptions), alpha, accs(composed)))
    return {
        "rows": [{"arm": a, "signature": c, "alpha": al, "test_set": t, "acc": v}
                 for a, c, al, res in rows for t, v in res.items()],
        "layers": {c: rws.layer_changes(pre, std, models[c]) for c in cfg.corruptions},
        "cosine": {f"{a}|{b}": rws.cosine(sigs[a], sigs[b]) for a in cfg.corruptions for b in cfg.corruptions if a < b},
        "removal_max_abs_error": max(float((removed[k].float() - std[k]).abs().max()) for k in std),
        "bytes": {"full_weights": rws.nbytes(std), "rws_float32": rws.nbytes(sigs[cfg.corruptions[0]]),
                  "rws_int8": rws.quantized_nbytes(quantized[cfg.corruptions[0]])},
    }


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: θ_pre, then the clean and one robust fine-tune per corruption, per seed."""
    w = worker(loop_config, RWSConfig)
    cfg, tr, test = w.cfg, w.splits["train"], w.splits["test"]
    order = torch.randperm(len(tr["x"]), generator=torch.Generator().manual_seed(cfg.seed)).to(w.session.device)
    cut = int(round(cfg.pretrain_fraction * len(order)))
    x_pre, y_pre = tr["x"][order[:cut]], tr["y"][order[:cut]]
    x_ft, y_ft = tr["x"][order[cut:]], tr["y"][order[cut:]]
    finetune = cfg.model_copy(update={"lr": cfg.finetune_lr})  # the fine-tunes' SGD
    net = partial(w.classifier, cfg.arch)

    def corrupted(x: torch.Tensor, name: str, key: str) -> torch.Tensor:
        return torch.from_numpy(corrupt(x.cpu().numpy(), name, cfg.severity, unit_seed(key))).to(x.device)

    def from_pre(seed: int):
        return lambda done: w.classifier(cfg.arch, done[f"{seed}/pre"]["model"])

    units = []
    for seed in cfg.seed_range():
        units.append(w.training.unit(f"{seed}/pre", cfg.pretrain_epochs, lambda done: net(),
                                     lambda done: (x_pre, y_pre), kept))
        units.append(w.training.unit(f"{seed}/clean", cfg.finetune_epochs, from_pre(seed),
                                     lambda done: (x_ft, y_ft), kept, optimizer=finetune.sgd))
        units += [w.training.unit(f"{seed}/{c}", cfg.finetune_epochs, from_pre(seed),
                                  lambda done, c=c: (corrupted(x_ft, c, f"train/{c}"), y_ft), kept,
                                  optimizer=finetune.sgd) for c in cfg.corruptions]

    def summarize(done: dict) -> dict:
        test_sets = {"clean": (test["x"], test["y"])}
        test_sets |= {c: (corrupted(test["x"], c, f"test/{c}"), test["y"]) for c in cfg.corruptions}
        names = ["pre", "clean", *cfg.corruptions]
        per_seed = {str(s): evaluate_seed(cfg, {m: done[f"{s}/{m}"]["model"] for m in names}, net, test_sets)
                    for s in cfg.seed_range()}
        gains = patch_gain(cfg, tables({"per_seed": per_seed})[0])
        return {"per_seed": per_seed, "test_items": len(test["y"]), SWEEP_METRIC: float(np.mean(list(gains.values())))}

    run_units(w.session, units, summarize=summarize, summary_keys=(SWEEP_METRIC,))


def tables(summary: dict) -> tuple[dict, dict]:
    """(accuracy rows with their seed, per-layer change rows)."""
    acc, lay = [], []
    for seed, res in summary["per_seed"].items():
        acc += [{"seed": int(seed), **r} for r in res["rows"]]
        lay += [{"seed": int(seed), "signature": c, "depth": d, **r}
                for c, rows in res["layers"].items() for d, r in enumerate(rows)]
    return columns(acc), columns(lay)


def pick(acc: dict, arm: str, test_set: str, signature: str = "", alpha: float | None = None) -> dict:
    """seed → the accuracy of ``arm`` (with ``signature``, at ``alpha`` if given) on ``test_set``."""
    where = {} if alpha is None else {"alpha": alpha}
    return per_seed(acc, "acc", arm=arm, test_set=test_set, signature=signature, **where)


def seed_mean(values: dict) -> float:
    return float(np.mean(list(values.values())))


def per_corruption(cfg: RWSConfig, value) -> dict:
    """(corruption, seed) → ``value(c)[seed]`` for every corruption c: one pair per seed × corruption."""
    return {(c, seed): v for c in cfg.corruptions for seed, v in value(c).items()}


def patch_gain(cfg: RWSConfig, acc: dict) -> dict:
    """(acc_patch − acc_clean)/(acc_robust − acc_clean) on corruption c at α = 1, per (corruption, seed)."""
    def gain(c):
        clean, patched, robust = pick(acc, "clean", c), pick(acc, "patch", c, c, 1.0), pick(acc, "robust", c, c)
        return {s: (patched[s] - clean[s]) / (robust[s] - clean[s]) for s in clean}
    return per_corruption(cfg, gain)


def plot(cfg: RWSConfig, acc: dict, lay: dict):
    """Per-layer change, accuracy vs α per corruption, and every arm on every test set (seed means)."""
    fig, axes = subplots(1, 3, figsize=(17, 4.5), layout="constrained")
    width = 0.8 / len(cfg.corruptions)
    for k, c in enumerate(cfg.corruptions):
        ratio = per_seed(lay, "ratio", by="depth", signature=c)
        axes[0].bar(np.array(list(ratio)) + (k + 0.5) * width - 0.4, list(ratio.values()), width, label=c)
    axes[0].set(xticks=sorted(set(lay["depth"])), xlabel="layer (0 = input side)",
                ylabel="‖θ_c − θ_std‖ / ‖θ_std − θ_pre‖")
    axes[0].legend(fontsize=8)
    for c in cfg.corruptions:
        for test_set, ls in ((c, "-"), ("clean", ":")):
            values = [seed_mean(pick(acc, "clean", test_set))]
            values += [seed_mean(pick(acc, "patch", test_set, c, a)) for a in cfg.alphas]
            axes[1].plot([0.0, *cfg.alphas], values, ls, marker="o", label=f"θ_std + α·RWS[{c}] on {test_set}")
        axes[1].axhline(seed_mean(pick(acc, "robust", c, c)), ls="--", lw=0.8, color="gray")
    axes[1].set(xlabel="α (dashed: robust fine-tune)", ylabel="test accuracy")
    axes[1].legend(fontsize=7)
    arms = [("clean", ""), *[(arm, c) for arm in ("robust", "patch", "patch_int8") for c in cfg.corruptions]]
    arms += [("compose", "+".join(cfg.corruptions))] if len(cfg.corruptions) > 1 else []
    sets = ["clean", *cfg.corruptions]
    for k, t in enumerate(sets):
        values = [seed_mean(pick(acc, a, t, c, 1.0 if a == "patch" else None)) for a, c in arms]
        axes[2].bar(np.arange(len(arms)) + k * 0.8 / len(sets), values, 0.8 / len(sets), label=f"test: {t}")
    axes[2].set_xticks(np.arange(len(arms)) + 0.4, [f"{a}\n{c}" for a, c in arms], fontsize=6, rotation=30)
    axes[2].set_ylabel("test accuracy (patch at α = 1)")
    axes[2].legend(fontsize=7)
    return fig


def storage(bytes_: dict) -> dict:
    """Bytes of the full weights and of one float32 / 8-bit signature, and their ratios."""
    return {**bytes_, "full_over_int8": bytes_["full_weights"] / bytes_["rws_int8"],
            "float32_over_int8": bytes_["rws_float32"] / bytes_["rws_int8"]}


def outputs(cfg: RWSConfig, summary: dict) -> Outputs:
    acc, lay = tables(summary)
    per_seed_results = list(summary["per_seed"].values())
    arms = sorted(set(zip(acc["arm"], acc["signature"], acc["alpha"], acc["test_set"])))
    cosines = per_seed_results[0]["cosine"]
    metrics = {"accuracy": {f"{a}{':' + c if c else ''}{f' α={al:g}' if al else ''} on {t}":
                            seed_mean(pick(acc, a, t, c, al)) for a, c, al, t in arms},
               SWEEP_METRIC: summary[SWEEP_METRIC],
               "layer_ratio": {c: list(per_seed(lay, "ratio", by="depth", signature=c).values())
                               for c in cfg.corruptions},
               "cosine": {k: float(np.mean([r["cosine"][k] for r in per_seed_results])) for k in cosines},
               "removal_max_abs_error": max(r["removal_max_abs_error"] for r in per_seed_results),
               "storage": storage(per_seed_results[0]["bytes"])}
    return Outputs(tables={"results": acc, "layers": lay}, figures={"rws.png": plot(cfg, acc, lay)}, metrics=metrics)


def claims(cfg: RWSConfig, summary: dict, outputs: Outputs) -> list:
    """Patch gain, clean cost, shallow concentration, composition and 8-bit storage, paired by corruption × seed
    (by seed where a value spans the corruptions); accuracies are on the whole test set (``trials``)."""
    acc, lay, cs, n = outputs.tables["results"], outputs.tables["layers"], cfg.corruptions, summary["test_items"]
    deeper = {k: v[lay["depth"] > 0] for k, v in lay.items()}
    check = partial(compare, paired_by="corruption × seed")
    found = [
        check("patching θ_std with RWS_c recovers most of the robust model's accuracy on corruption c",
              "(acc_patch − acc_clean)/(acc_robust − acc_clean) on the corrupted test set at α = 1, per seed × "
              "corruption (baseline: half the gain)", patch_gain(cfg, acc), 0.5, margin=0.0,
              why="'most' is more than half the robust model's gain: the fixed value 0.5 is that bound"),
        check("the patched model keeps the clean model's clean accuracy",
              "clean test accuracy: θ_std + RWS_c vs θ_std; rule: within 0.02",
              per_corruption(cfg, lambda c: pick(acc, "patch", "clean", c, 1.0)),
              per_corruption(cfg, lambda c: pick(acc, "clean", "clean")), margin=-0.02, trials=n,
              why="'keeps': not worse by more than two accuracy points"),
        check("the robust and clean models differ mostly in the first layer",
              "‖θ_c − θ_std‖/‖θ_std − θ_pre‖: first layer (method) vs mean of the deeper layers (baseline); "
              "rule: ≥ 0.1 higher", per_seed(lay, "ratio", by=("signature", "seed"), depth=0),
              per_seed(deeper, "ratio", by=("signature", "seed")), margin=0.1,
              why="a tenth of the clean update's norm: smaller gaps do not single out a layer"),
    ]
    if len(cs) > 1:
        gains = [{s: v - pick(acc, "clean", c)[s] for s, v in pick(acc, "compose", c, "+".join(cs)).items()}
                 for c in cs]
        found.append(compare("composing the signatures helps on every corruption",
                             "min over corruptions of acc(θ_std + Σ α/n_c·RWS_c) − acc(θ_std) on that corruption; "
                             "rule: ≥ 0.01", {s: min(g[s] for g in gains) for s in gains[0]}, 0.0, margin=0.01,
                             why="'helps': at least one accuracy point on the corruption it helps least"))
    sizes = {int(s): storage(r["bytes"]) for s, r in summary["per_seed"].items()}
    return found + [
        check("the 8-bit RWS patches as well as the float32 RWS",
              "corrupted-test accuracy at α = 1: 8-bit (method) vs float32 (baseline) signature; rule: within 0.01",
              per_corruption(cfg, lambda c: pick(acc, "patch_int8", c, c, 1.0)),
              per_corruption(cfg, lambda c: pick(acc, "patch", c, c, 1.0)), margin=-0.01, trials=n,
              why="'as well as': not worse by more than one accuracy point"),
        compare("the 8-bit RWS is much smaller than a full weight copy (paper: up to 13×)",
                f"storage ratio full float32 weights / 8-bit RWS ({sizes[cfg.seed]['full_weights']} B / "
                f"{sizes[cfg.seed]['rws_int8']} B); rule: ≥ 3 above 1",
                {s: b["full_over_int8"] for s, b in sizes.items()}, 1.0, margin=3.0,
                why="more than the 4× that 8-bit codes of a full copy would give: the saving of patching few layers"),
    ]


PIPELINE = Pipeline(
    config=RWSConfig,
    execute=lambda cfg, stage: fit_plan(train_loop, cfg, stage,
                                        f"{cfg.seeds} × ({2 + len(cfg.corruptions)} models)")["summary"],
    outputs=outputs,
    deviations=DEVIATIONS,
    claims=claims,
    budget=lambda cfg: (f"{cfg.seeds} seed(s), {cfg.arch}, corruptions {cfg.corruptions} at severity {cfg.severity}, "
                        f"{cfg.keep_layers} patched layer(s), {cfg.finetune_epochs} fine-tune epochs"),
    trial=lambda cfg: cfg,
    sweep_metric=SWEEP_METRIC,
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 3, "pretrain_epochs": 15, "finetune_epochs": 15},
        "full": {"seeds": 5, "arch": "cnn", "keep_layers": 1, "pretrain_epochs": 30, "finetune_epochs": 30,
                 "corruptions": ["gaussian_noise", "impulse_noise", "defocus_blur", "contrast", "fog",
                                 "shot_noise"]},
    },
)
