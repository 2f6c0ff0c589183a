"""FGSM, Carlini-Wagner and defensive distillation (Sarkar et al. 2024, after Papernot et al. 2016).

Per seed and architecture one Ray Train job trains three classifiers on digits in [0, 1]:
the undefended model (CE at T = 1), a teacher trained on softmax(z/T), and a student trained on the
teacher's soft labels P = softmax(z_teacher/T) with CE(P, softmax(z_student/T)), deployed at T = 1.
Each is attacked on a test subset with FGSM, x' = clip(x + ε·sign ∇ₓCE, 0, 1), for every ε, and with
CW-L2 (binary search on c) from the shared attack engine. Success rate = share of correctly
classified examples that the attack flips; the CW success within an L2 budget b counts successes
with ‖δ‖₂ ≤ b. The student is also attacked through z/T (Carlini & Wagner's counter to distillation).
"""
from __future__ import annotations

from functools import partial
from itertools import product
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from methods.adversarial.robust_training import TrainingConfig, fit_plan, worker
from methods.classifiers import predict_proba
from methods.engines.attacks import CWConfig, FGSMConfig, cw_l2, fgsm
from pipelines.claims import compare
from pipelines.pipeline import Outputs, Pipeline
from pipelines.results import columns, subplots
from pipelines.units import cpu_state, run_units

ARMS = {"undefended": "undefended", "distilled": "student", "distilled_logits_over_T": "student"}  # arm → its unit
GRID = 8  # adversarial examples kept per arm for the figure
SWEEP_METRIC = "distilled_fgsm_success"


class AdvDistillationConfig(TrainingConfig):
    archs: list[Literal["mlp", "cnn"]] = Field(["mlp", "cnn"], min_length=1)
    epochs: int = Field(30, ge=1, description="epochs of each classifier")
    temperature: float = Field(20.0, ge=1, le=1000, description="distillation temperature T")
    fgsm_eps: list[float] = Field([0.05, 0.1, 0.2, 0.3], min_length=1)
    cw_c: float = Field(0.1, gt=0, description="initial CW constant c")
    cw_search_steps: int = Field(6, ge=1)
    cw_steps: int = Field(100, ge=1, description="Adam steps per CW search round")
    cw_lr: float = Field(0.05, gt=0)
    cw_l2_budgets: list[float] = Field([0.25, 0.5, 1.0, 1.5, 2.0], min_length=1)
    attack_examples: int = Field(300, ge=GRID, description="test examples attacked")

    @field_validator("fgsm_eps", "cw_l2_budgets")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(v <= 0 for v in values):
            raise ValueError("budgets must be positive")
        return sorted(values)


DEVIATIONS = [
    "data: sklearn digits (8×8) in [0, 1] instead of Tiny-ImageNet / CIFAR-10",
    "models: a small MLP and CNN (the same architecture for teacher and student) instead of "
    "ResNeXt50 / DenseNet-201 / VGG-19 / ResNet-101; no pretrained weights",
    "teacher and student losses are scaled by T (applied as lr·T, weight decay/T) so that training "
    "at high T keeps its step size (spec's CPU plan; not from the report)",
    "CW-L2: the shared engine with a per-example binary search on c (cw_search_steps rounds of "
    "cw_steps Adam steps), far fewer iterations than Carlini & Wagner's 10,000",
    "attacks on a test subset (attack_examples); the report's ε, T and tables are unverified",
]


class Tempered(nn.Module):
    """z(x)/T: the model trained at temperature T, or the distilled model attacked through z/T."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) / self.temperature


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """P = softmax(z/T): the teacher's soft labels at temperature T."""
    return F.softmax(logits / temperature, dim=1)


def outcome(budget: float, fooled: Tensor, correct: Tensor, l2: Tensor) -> dict:
    """Success rate among the correctly classified, accuracy under attack, mean ‖δ‖₂ of the successes."""
    return {"budget": budget, "success": float(fooled.sum() / correct.sum().clamp_min(1)),
            "acc": float((correct & ~fooled).float().mean()),
            "mean_l2": float(l2[fooled].mean()) if fooled.any() else float("nan")}


def attack_eval(model: nn.Module, x: Tensor, y: Tensor, cfg: AdvDistillationConfig) -> dict:
    """Clean accuracy; per ε FGSM success, accuracy and mean ‖δ‖₂ of successes; CW the same per L2 budget."""
    correct = predict_proba(model, x).argmax(1) == y
    out: dict = {"clean_acc": float(correct.float().mean()), "fgsm": [], "examples_clean": x[:GRID].cpu()}
    for eps in cfg.fgsm_eps:
        x_adv = fgsm(model, x, y, FGSMConfig(eps=eps))
        fooled = correct & (predict_proba(model, x_adv).argmax(1) != y)
        out["fgsm"].append(outcome(eps, fooled, correct, (x_adv - x).flatten(1).norm(dim=1)))
    cw = cw_l2(model, x, y, CWConfig(c_init=cfg.cw_c, binary_search_steps=cfg.cw_search_steps, steps=cfg.cw_steps,
                                     lr=cfg.cw_lr))
    out["cw"] = [outcome(budget, cw.success & correct & (cw.l2 <= budget), correct, cw.l2)
                 for budget in [*cfg.cw_l2_budgets, float("inf")]]
    out["examples_fgsm"], out["examples_cw"] = x_adv[:GRID].cpu(), cw.x_adv[:GRID].cpu()  # FGSM at the largest ε
    out["examples_pred"] = {k: predict_proba(model, v).argmax(1).cpu() for k, v in
                            (("fgsm", x_adv[:GRID]), ("cw", cw.x_adv[:GRID]))}
    return out


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: undefended, teacher and student per (seed, arch), each attacked when trained."""
    w = worker(loop_config, AdvDistillationConfig)
    cfg, tr, test, T = w.cfg, w.splits["train"], w.splits["test"], w.cfg.temperature
    xa, ya = test["x"][:cfg.attack_examples], test["y"][:cfg.attack_examples]

    def soft_labels(prefix: str, arch: str):
        def data(done):
            teacher = w.classifier(arch)
            teacher.load_state_dict(done[f"{prefix}/teacher"]["model"])
            with torch.no_grad():
                return tr["x"], soft_targets(teacher.eval()(tr["x"]), T)
        return data

    units = []
    for seed, arch in product(cfg.seed_range(), cfg.archs):
        prefix = f"{seed}/{arch}"
        units += [
            w.training.unit(f"{prefix}/undefended", cfg.epochs, lambda done, a=arch: w.classifier(a),
                            lambda done: (tr["x"], tr["y"]),
                            lambda m, done: {"model": cpu_state(m), "undefended": attack_eval(m, xa, ya, cfg)}),
            w.training.unit(f"{prefix}/teacher", cfg.epochs, lambda done, a=arch: Tempered(w.classifier(a), T),
                            lambda done: (tr["x"], tr["y"]), lambda m, done: {"model": cpu_state(m.model)},
                            loss_scale=T),
            w.training.unit(f"{prefix}/student", cfg.epochs, lambda done, a=arch: Tempered(w.classifier(a), T),
                            soft_labels(prefix, arch),
                            lambda m, done: {"model": cpu_state(m.model),
                                             "distilled": attack_eval(m.model, xa, ya, cfg),
                                             "distilled_logits_over_T": attack_eval(m, xa, ya, cfg)}, loss_scale=T),
        ]
    run_units(w.session, units, summarize=lambda done: summary(cfg, done), summary_keys=(SWEEP_METRIC,))


def results_table(cfg: AdvDistillationConfig, done: dict) -> dict[str, np.ndarray]:
    """One row per (seed, arch, arm, attack, budget): success rate, accuracy, mean L2 of successes."""
    rows = []
    for seed, arch, arm in product(cfg.seed_range(), cfg.archs, ARMS):
        ev = done[f"{seed}/{arch}/{ARMS[arm]}"][arm]
        rows += [{"seed": seed, "arch": arch, "arm": arm, "attack": attack, "budget": r["budget"],
                  "success": r["success"], "acc_under_attack": r["acc"], "mean_l2": r["mean_l2"],
                  "clean_acc": ev["clean_acc"]} for attack in ("fgsm", "cw") for r in ev[attack]]
    return columns(rows)


def _select(table: dict, arm: str, attack: str, budget: float | None = None) -> np.ndarray:
    rows = (table["arm"] == arm) & (table["attack"] == attack)
    return rows if budget is None else rows & np.isclose(table["budget"], budget)


def per_model(table: dict, arm: str, attack: str, column: str, budget: float | None = None) -> np.ndarray:
    """One value per (seed, arch): ``column`` averaged over the attack's budgets (or at ``budget``)."""
    rows = _select(table, arm, attack, budget)
    keys = sorted(set(zip(table["seed"][rows], table["arch"][rows])))
    return np.array([table[column][rows & (table["seed"] == s) & (table["arch"] == a)].mean() for s, a in keys])


def summary(cfg: AdvDistillationConfig, done: dict) -> dict[str, float]:
    """Per arm, the mean over models of clean accuracy, FGSM success (mean over ε), CW success and mean L2."""
    table = results_table(cfg, done)
    out = {}
    for arm in ARMS:
        out[f"{arm}_clean_acc"] = float(per_model(table, arm, "fgsm", "clean_acc").mean())
        out[f"{arm}_fgsm_success"] = float(per_model(table, arm, "fgsm", "success").mean())
        out[f"{arm}_cw_success"] = float(per_model(table, arm, "cw", "success", np.inf).mean())
        out[f"{arm}_cw_mean_l2"] = float(np.nanmean(per_model(table, arm, "cw", "mean_l2", np.inf)))
    return out


def plot_success(cfg: AdvDistillationConfig, table: dict):
    fig, axes = subplots(len(cfg.archs), 2, figsize=(10, 3.8 * len(cfg.archs)), squeeze=False, layout="constrained")
    for row, arch in enumerate(cfg.archs):
        for col, (attack, xlabel) in enumerate((("fgsm", "FGSM ε (L∞)"), ("cw", "CW-L2 budget ‖δ‖₂"))):
            ax = axes[row, col]
            for arm in ARMS:
                rows = _select(table, arm, attack) & (table["arch"] == arch) & np.isfinite(table["budget"])
                budgets = sorted(set(table["budget"][rows]))
                ax.plot(budgets, [table["success"][rows & (table["budget"] == b)].mean() for b in budgets],
                        marker="o", label=arm.replace("_", " "))
            ax.set(xlabel=xlabel, ylabel="attack success rate", ylim=(-0.02, 1.02), title=f"{arch}: {attack.upper()}")
            ax.legend(fontsize=8)
    fig.suptitle(f"Attack success with and without defensive distillation (T = {cfg.temperature:g})")
    return fig


def plot_examples(cfg: AdvDistillationConfig, done: dict):
    """Rows: clean inputs, then FGSM (largest ε) and CW examples against each model of seed 0 / first arch."""
    prefix = f"{cfg.seed}/{cfg.archs[0]}"
    rows = [("clean", done[f"{prefix}/undefended"]["undefended"]["examples_clean"], None)]
    for arm in ("undefended", "distilled"):
        ev = done[f"{prefix}/{ARMS[arm]}"][arm]
        rows += [(f"{arm}\nFGSM ε={cfg.fgsm_eps[-1]:g}", ev["examples_fgsm"], ev["examples_pred"]["fgsm"]),
                 (f"{arm}\nCW-L2", ev["examples_cw"], ev["examples_pred"]["cw"])]
    fig, axes = subplots(len(rows), GRID, figsize=(1.3 * GRID, 1.5 * len(rows)))
    for (label, images, preds), axes_row in zip(rows, axes):
        for c, ax in enumerate(axes_row):
            ax.imshow(images[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
            ax.set_title("" if preds is None else f"pred {int(preds[c])}", fontsize=7)
        axes_row[0].set_ylabel(label, fontsize=7)
    return fig


def outputs(cfg: AdvDistillationConfig, done: dict) -> Outputs:
    table = results_table(cfg, done)
    return Outputs(tables={"results": table}, metrics=done["summary"],
                   figures={"success_vs_eps.png": plot_success(cfg, table),
                            "adversarial_examples.png": plot_examples(cfg, done)})


def claims(cfg: AdvDistillationConfig, done: dict, outputs: Outputs) -> list:
    """Distillation vs the undefended model over seeds × architectures (one value per trained pair)."""
    pm, eps = partial(per_model, outputs.tables["results"]), ", ".join(f"{e:g}" for e in cfg.fgsm_eps)
    return [
        compare("defensive distillation lowers FGSM success markedly",
                f"FGSM success rate, mean over ε ∈ {{{eps}}}: distilled (T=1) vs undefended; rule: ≥ 0.2 lower",
                pm("distilled", "fgsm", "success"), pm("undefended", "fgsm", "success"),
                higher_is_better=False, margin=0.2),
        compare("CW-L2 still succeeds against the distilled model",
                "CW-L2 success rate (no budget): distilled vs undefended; rule: within 0.1",
                pm("distilled", "cw", "success", np.inf), pm("undefended", "cw", "success", np.inf), margin=-0.1),
        compare("FGSM substantially reduces the undefended model's accuracy",
                "accuracy under FGSM (mean over ε) vs clean accuracy; rule: ≥ 0.3 lower",
                pm("undefended", "fgsm", "acc_under_attack"), pm("undefended", "fgsm", "clean_acc"),
                higher_is_better=False, margin=0.3),
        compare("CW-L2 substantially reduces the undefended model's accuracy",
                "accuracy under CW-L2 (no budget) vs clean accuracy; rule: ≥ 0.3 lower",
                pm("undefended", "cw", "acc_under_attack", np.inf), pm("undefended", "cw", "clean_acc", np.inf),
                higher_is_better=False, margin=0.3),
        compare("attacking the distilled model through z/T defeats distillation",
                "FGSM success rate (mean over ε): through z/T vs at T=1; rule: ≥ 0.2 higher",
                pm("distilled_logits_over_T", "fgsm", "success"), pm("distilled", "fgsm", "success"), margin=0.2),
        compare("distillation keeps clean accuracy", "clean test accuracy: distilled vs undefended; rule: within 0.02",
                pm("distilled", "fgsm", "clean_acc"), pm("undefended", "fgsm", "clean_acc"), margin=-0.02),
    ]


PIPELINE = Pipeline(
    config=AdvDistillationConfig,
    execute=lambda cfg, stage: fit_plan(train_loop, cfg, stage, f"{3 * cfg.seeds * len(cfg.archs)} classifiers"),
    outputs=outputs,
    deviations=DEVIATIONS,
    claims=claims,
    budget=lambda cfg: f"{cfg.seeds} seed(s) × archs {cfg.archs}, {cfg.epochs} epochs, T = {cfg.temperature:g}",
    trial=lambda cfg: cfg,
    sweep_metric=SWEEP_METRIC,
    sweep_mode="min",
    profiles={
        "quick": {"seeds": 2, "epochs": 15, "attack_examples": 150, "cw_search_steps": 5, "cw_steps": 60},
        "full": {"seeds": 3, "epochs": 40, "attack_examples": 500},
    },
)
