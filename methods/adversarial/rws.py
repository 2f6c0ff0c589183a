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
from methods.adversarial.robust_training import TrainingConfig, fit_plan, worker
from methods.classifiers import accuracy
from methods.engines.corruptions import CorruptionNames, corrupt
from pipelines.claims import compare
from pipelines.pipeline import Outputs, Pipeline
from pipelines.results import columns, subplots
from pipelines.units import cpu_state, run_units, unit_seed

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
        def build(done):
            model = net()
            model.load_state_dict(done[f"{seed}/pre"]["model"])
            return model
        return build

    def keep(model, done):
        return {"model": cpu_state(model)}

    units = []
    for seed in cfg.seed_range():
        units.append(w.training.unit(f"{seed}/pre", cfg.pretrain_epochs, lambda done: net(),
                                     lambda done: (x_pre, y_pre), keep))
        units.append(w.training.unit(f"{seed}/clean", cfg.finetune_epochs, from_pre(seed),
                                     lambda done: (x_ft, y_ft), keep, optimizer=finetune.sgd))
        units += [w.training.unit(f"{seed}/{c}", cfg.finetune_epochs, from_pre(seed),
                                  lambda done, c=c: (corrupted(x_ft, c, f"train/{c}"), y_ft), keep,
                                  optimizer=finetune.sgd) for c in cfg.corruptions]

    def summarize(done: dict) -> dict:
        test_sets = {"clean": (test["x"], test["y"])}
        test_sets |= {c: (corrupted(test["x"], c, f"test/{c}"), test["y"]) for c in cfg.corruptions}
        names = ["pre", "clean", *cfg.corruptions]
        per_seed = {str(s): evaluate_seed(cfg, {m: done[f"{s}/{m}"]["model"] for m in names}, net, test_sets)
                    for s in cfg.seed_range()}
        return {"per_seed": per_seed, SWEEP_METRIC: float(patch_gain(cfg, tables({"per_seed": per_seed})[0]).mean())}

    run_units(w.session, units, summarize=summarize, summary_keys=(SWEEP_METRIC,))


def tables(summary: dict) -> tuple[dict, dict]:
    """(accuracy rows with their seed, per-layer change rows)."""
    acc, lay = [], []
    for seed, res in summary["per_seed"].items():
        acc += [{"seed": int(seed), **r} for r in res["rows"]]
        lay += [{"seed": int(seed), "signature": c, "depth": d, **r}
                for c, rows in res["layers"].items() for d, r in enumerate(rows)]
    return columns(acc), columns(lay)


def pick(acc: dict, arm: str, test_set: str, signature: str = "", alpha: float | None = None) -> np.ndarray:
    """One accuracy per seed, in seed order."""
    rows = (acc["arm"] == arm) & (acc["test_set"] == test_set) & (acc["signature"] == signature)
    if alpha is not None:
        rows &= np.isclose(acc["alpha"], alpha)
    return acc["acc"][rows][np.argsort(acc["seed"][rows], kind="stable")]


def patch_gain(cfg: RWSConfig, acc: dict) -> np.ndarray:
    """(acc_patch − acc_clean)/(acc_robust − acc_clean) on corruption c at α = 1, per corruption × seed."""
    gains = []
    for c in cfg.corruptions:
        clean = pick(acc, "clean", c)
        gains.append((pick(acc, "patch", c, c, 1.0) - clean) / (pick(acc, "robust", c, c) - clean))
    return np.concatenate(gains)


def plot(cfg: RWSConfig, acc: dict, lay: dict):
    """Per-layer change, accuracy vs α per corruption, and every arm on every test set (seed means)."""
    fig, axes = subplots(1, 3, figsize=(17, 4.5), layout="constrained")
    depths = sorted(set(lay["depth"]))
    width = 0.8 / len(cfg.corruptions)
    for k, c in enumerate(cfg.corruptions):
        ratio = [lay["ratio"][(lay["signature"] == c) & (lay["depth"] == d)].mean() for d in depths]
        axes[0].bar(np.array(depths) + (k + 0.5) * width - 0.4, ratio, width, label=c)
    axes[0].set(xticks=depths, xlabel="layer (0 = input side)", ylabel="‖θ_c − θ_std‖ / ‖θ_std − θ_pre‖")
    axes[0].legend(fontsize=8)
    for c in cfg.corruptions:
        for test_set, ls in ((c, "-"), ("clean", ":")):
            values = [pick(acc, "clean", test_set).mean()]
            values += [pick(acc, "patch", test_set, c, a).mean() for a in cfg.alphas]
            axes[1].plot([0.0, *cfg.alphas], values, ls, marker="o", label=f"θ_std + α·RWS[{c}] on {test_set}")
        axes[1].axhline(pick(acc, "robust", c, c).mean(), ls="--", lw=0.8, color="gray")
    axes[1].set(xlabel="α (dashed: robust fine-tune)", ylabel="test accuracy")
    axes[1].legend(fontsize=7)
    arms = [("clean", ""), *[("robust", c) for c in cfg.corruptions], *[("patch", c) for c in cfg.corruptions],
            *[("patch_int8", c) for c in cfg.corruptions]]
    arms += [("compose", "+".join(cfg.corruptions))] if len(cfg.corruptions) > 1 else []
    sets = ["clean", *cfg.corruptions]
    for k, t in enumerate(sets):
        values = [pick(acc, a, t, c, 1.0 if a == "patch" else None).mean() for a, c in arms]
        axes[2].bar(np.arange(len(arms)) + k * 0.8 / len(sets), values, 0.8 / len(sets), label=f"test: {t}")
    axes[2].set_xticks(np.arange(len(arms)) + 0.4, [f"{a}\n{c}" for a, c in arms], fontsize=6, rotation=30)
    axes[2].set_ylabel("test accuracy (patch at α = 1)")
    axes[2].legend(fontsize=7)
    return fig


def storage(summary: dict) -> dict:
    """Bytes of the full weights and of one float32 / 8-bit signature, and their ratios."""
    b = next(iter(summary["per_seed"].values()))["bytes"]
    return {**b, "full_over_int8": b["full_weights"] / b["rws_int8"],
            "float32_over_int8": b["rws_float32"] / b["rws_int8"]}


def layer_ratio(lay: dict, c: str, depth: int) -> float:
    return float(lay["ratio"][(lay["signature"] == c) & (lay["depth"] == depth)].mean())


def outputs(cfg: RWSConfig, summary: dict) -> Outputs:
    acc, lay = tables(summary)
    per_seed = list(summary["per_seed"].values())
    arms = sorted(set(zip(acc["arm"], acc["signature"], acc["alpha"], acc["test_set"])))
    metrics = {"accuracy": {f"{a}{':' + c if c else ''}{f' α={al:g}' if al else ''} on {t}":
                            float(pick(acc, a, t, c, al).mean()) for a, c, al, t in arms},
               SWEEP_METRIC: summary[SWEEP_METRIC],
               "layer_ratio": {c: [layer_ratio(lay, c, d) for d in sorted(set(lay["depth"]))] for c in cfg.corruptions},
               "cosine": {k: float(np.mean([r["cosine"][k] for r in per_seed])) for k in per_seed[0]["cosine"]},
               "removal_max_abs_error": max(r["removal_max_abs_error"] for r in per_seed), "storage": storage(summary)}
    return Outputs(tables={"results": acc, "layers": lay}, figures={"rws.png": plot(cfg, acc, lay)}, metrics=metrics)


def claims(cfg: RWSConfig, summary: dict, outputs: Outputs) -> list:
    """Patch gain, clean cost, shallow concentration, composition and 8-bit storage, over seeds × corruptions."""
    acc, lay, cs = outputs.tables["results"], outputs.tables["layers"], cfg.corruptions
    first = [lay["ratio"][(lay["signature"] == c) & (lay["depth"] == 0)] for c in cs]
    deeper = [np.array([lay["ratio"][(lay["signature"] == c) & (lay["depth"] > 0) & (lay["seed"] == s)].mean()
                        for s in sorted(set(lay["seed"]))]) for c in cs]
    found = [
        compare("patching θ_std with RWS_c recovers most of the robust model's accuracy on corruption c",
                "(acc_patch − acc_clean)/(acc_robust − acc_clean) on the corrupted test set at α = 1, per seed × "
                "corruption (baseline: half the gain)", patch_gain(cfg, acc), [0.5], margin=0.0),
        compare("the patched model keeps the clean model's clean accuracy",
                "clean test accuracy: θ_std + RWS_c vs θ_std; rule: within 0.02",
                np.concatenate([pick(acc, "patch", "clean", c, 1.0) for c in cs]),
                np.concatenate([pick(acc, "clean", "clean") for _ in cs]), margin=-0.02),
        compare("the robust and clean models differ mostly in the first layer",
                "‖θ_c − θ_std‖/‖θ_std − θ_pre‖: first layer (method) vs mean of the deeper layers (baseline)",
                np.concatenate(first), np.concatenate(deeper), margin=0.0),
    ]
    if len(cs) > 1:
        gains = [pick(acc, "compose", c, "+".join(cs)) - pick(acc, "clean", c) for c in cs]
        found.append(compare("composing the signatures helps on every corruption",
                             "min over corruptions of acc(θ_std + Σ α/n_c·RWS_c) − acc(θ_std) on that corruption",
                             np.min(gains, axis=0), [0.0], margin=0.0))
    sizes = storage(summary)
    return found + [
        compare("the 8-bit RWS patches as well as the float32 RWS",
                "corrupted-test accuracy at α = 1: 8-bit (method) vs float32 (baseline) signature; rule: within 0.01",
                np.concatenate([pick(acc, "patch_int8", c, c, 1.0) for c in cs]),
                np.concatenate([pick(acc, "patch", c, c, 1.0) for c in cs]), margin=-0.01),
        compare("the 8-bit RWS is much smaller than a full weight copy (paper: up to 13×)",
                f"storage ratio full float32 weights / 8-bit RWS ({sizes['full_weights']} B / {sizes['rws_int8']} B)",
                [sizes["full_over_int8"]], [1.0], margin=0.0),
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
        "full": {"seeds": 3, "arch": "cnn", "keep_layers": 1, "pretrain_epochs": 30, "finetune_epochs": 30,
                 "corruptions": ["gaussian_noise", "impulse_noise", "defocus_blur", "contrast", "fog",
                                 "shot_noise"]},
    },
)
