"""Tracing the origin of an adversarial attack (Fang et al., ICCV 2023) — a labelled reconstruction.

The paper's losses and tracer are unpublished; this follows the spec's platform method. A base
classifier h (the undivided model) is trained and frozen; copy i is f_i(x) = h(x) + t_i(x) with its
own tracer head t_i and a secret key k_i ∈ {−1, 1}^{C×H×W}. Each tracer is trained with the
noise-sensitive loss, on x_k = clip(x + ε·u·k_i), x_r = clip(x + ε·u·r), u ~ U(0, 1), r random ±1:

    L_i = CE(f_i(x), y) + CE(f_i(x_r), y) + β·(mean t_i(x)² + mean t_i(x_r)²) − λ·min(CE(f_i(x_k), y), τ)

so the copy behaves as h on clean and randomly perturbed inputs while its tracer reacts to
perturbations along its own key: a white-box attack on copy i follows k_i and leaves a copy-i trace.
Tracing ranks candidate copies j by the anomaly score z_j = (‖t_j(x')‖₂ − μ_j)/σ_j, with μ_j, σ_j
over clean validation inputs; the source is argmax_j z_j. Baseline: the copy on which x' has the
lowest attack loss, argmax_j CE(f_j(x'), y).
"""
from __future__ import annotations

from itertools import product
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from methods.adversarial.robust_training import TrainingConfig, fit_plan, kept, worker
from methods.classifiers import accuracy, predict_proba
from methods.engines.attacks import FGSMConfig, PGDConfig, fgsm, pgd
from pipelines import train
from pipelines.claims import compare, per_seed
from pipelines.pipeline import Outputs, Pipeline
from pipelines.results import columns, subplots
from pipelines.units import cpu_state, run_units, unit_seed

ATTACKS = ("fgsm", "pgd")
SWEEP_METRIC = "pgd_tracing_acc"


class AttackTracingConfig(TrainingConfig):
    arch: Literal["mlp", "cnn"] = "cnn"
    epochs: int = Field(20, ge=1, description="epochs of the base classifier h")
    copies: int = Field(5, ge=2, description="N model copies")
    tracer_width: int = Field(64, ge=1)
    tracer_epochs: int = Field(20, ge=1)
    tracer_lr: float = Field(0.01, gt=0, description="Adam learning rate of each tracer")
    key_eps: float = Field(0.1, gt=0, le=1, description="ε of the key and random perturbations")
    ns_weight: float = Field(1.0, ge=0, description="λ of the noise-sensitive term")
    quiet_weight: float = Field(0.1, ge=0, description="β of the tracer-silence term")
    ce_cap: float = Field(5.0, gt=0, description="τ, cap of the key-perturbation CE")
    attack_eps: float = Field(0.1, gt=0, le=1, description="L∞ ε of FGSM and PGD (inputs in [0, 1])")
    attack_steps: int = Field(10, ge=1, description="PGD steps (step size ε/4)")
    attack_examples: int = Field(200, ge=1, description="test examples attacked on each copy")


DEVIATIONS = [
    "method: [reconstruction] — the noise-sensitive loss, the additive tracer head, the key "
    "perturbations and the z-score tracing rule are the platform's proposal, not the paper's (unpublished)",
    "follows arXiv v1 (noise-sensitive training), not the ICCV version's VAE-based training",
    "data: sklearn digits (8×8) in [0, 1]; model: one small classifier shared and frozen by all copies",
    "tracers trained with Adam (tracer_lr); attacks: white-box FGSM and PGD only (no SimBA/NES black-box "
    "attack, no ICML'23 random-mask watermark baseline)",
    "baseline 'lowest loss' read as the lowest attack loss −CE(f_j(x'), y), i.e. argmax_j CE",
]


class Copy(nn.Module):
    """f_i(x) = h(x) + t_i(x): the shared classifier plus copy i's tracer head."""

    def __init__(self, base: nn.Module, tracer: nn.Module):
        super().__init__()
        self.base, self.tracer = base, tracer

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.tracer(x)


def build_tracer(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def make_key(shape: tuple[int, ...], seed: int) -> Tensor:
    """Copy i's secret key k_i ∈ {−1, 1}^shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def noise_sensitive_loss(copy: nn.Module, base: nn.Module, x: Tensor, y: Tensor, key: Tensor,
                         cfg: AttackTracingConfig, gen: torch.Generator) -> Tensor:
    """L_i of the module docstring; ``copy`` may be DDP-wrapped, t_i is read as f_i − h."""
    u = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=gen).to(x.device)
    r = (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1).to(x.device)
    x_key = (x + cfg.key_eps * u * key).clamp(0, 1)
    x_rnd = (x + cfg.key_eps * u * r).clamp(0, 1)
    with torch.no_grad():
        h_x, h_rnd = base(x), base(x_rnd)
    f_x, f_rnd, f_key = copy(x), copy(x_rnd), copy(x_key)
    quiet = (f_x - h_x).square().mean() + (f_rnd - h_rnd).square().mean()
    return (F.cross_entropy(f_x, y) + F.cross_entropy(f_rnd, y) + cfg.quiet_weight * quiet
            - cfg.ns_weight * F.cross_entropy(f_key, y).clamp(max=cfg.ce_cap))


@torch.no_grad()
def tracer_norms(tracers: list[nn.Module], x: Tensor) -> Tensor:
    """(len(x), N): ‖t_j(x)‖₂ for every candidate copy j."""
    return torch.stack([t.eval()(x).norm(dim=1) for t in tracers], dim=1)


def trace(tracers: list[nn.Module], x_adv: Tensor, mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(z-scores (len(x_adv), N), predicted source copy per example): z_j = (‖t_j(x')‖ − μ_j)/σ_j."""
    z = (tracer_norms(tracers, x_adv) - mu) / sigma.clamp_min(1e-8)
    return z, z.argmax(1)


@torch.no_grad()
def lowest_attack_loss(copies: list[nn.Module], x_adv: Tensor, y: Tensor) -> Tensor:
    """Baseline source guess: argmax_j CE(f_j(x'), y) = argmin_j of the attack loss −CE."""
    return torch.stack([F.cross_entropy(c.eval()(x_adv), y, reduction="none") for c in copies], 1).argmax(1)


def evaluate(copies: list[Copy], base: nn.Module, val_x: Tensor, x: Tensor, y: Tensor,
             cfg: AttackTracingConfig) -> dict:
    """Clean accuracies, and per attack: success on the source, tracing / baseline accuracy on the
    successful examples, mean z-score matrix [source, candidate] and transfer matrix."""
    tracers = [c.tracer for c in copies]
    norms = tracer_norms(tracers, val_x)
    mu, sigma = norms.mean(0), norms.std(0)
    out: dict = {"base_acc": accuracy(base, x, y), "copy_acc": [accuracy(c, x, y) for c in copies]}
    attacks = {"fgsm": lambda m: fgsm(m, x, y, FGSMConfig(eps=cfg.attack_eps)),
               "pgd": lambda m: pgd(m, x, y, PGDConfig(eps=cfg.attack_eps, alpha=cfg.attack_eps / 4,
                                                       steps=cfg.attack_steps), rng=cfg.seed)}
    for name, attack in attacks.items():
        hits, base_hits, fooled, scores, transfer = [], [], [], [], []
        for i, copy in enumerate(copies):
            x_adv = attack(copy)
            wrong = torch.stack([predict_proba(c, x_adv).argmax(1) != y for c in copies], 1)
            z, guess = trace(tracers, x_adv, mu, sigma)
            ok = wrong[:, i]
            fooled.append(ok.float().mean())
            hits.append((guess == i)[ok])
            base_hits.append((lowest_attack_loss(copies, x_adv, y) == i)[ok])
            scores.append(z.mean(0))
            transfer.append(wrong.float().mean(0))
        hits, base_hits = torch.cat(hits), torch.cat(base_hits)
        out[name] = {"success": float(torch.stack(fooled).mean()), "traced": int(len(hits)),
                     "tracing_acc": float(hits.float().mean()) if len(hits) else float("nan"),
                     "baseline_acc": float(base_hits.float().mean()) if len(hits) else float("nan"),
                     "scores": torch.stack(scores), "transfer": torch.stack(transfer)}
    return out


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: per seed, h then N tracer copies; the summary attacks and traces every copy."""
    w = worker(loop_config, AttackTracingConfig)
    cfg, tr, test = w.cfg, w.splits["train"], w.splits["test"]

    def base_model(done: dict, seed: int) -> nn.Module:
        return w.classifier(cfg.arch, done[f"{seed}/base"]["model"]).eval().requires_grad_(False)

    def copy_model(done: dict, seed: int, tracer_state: dict | None = None) -> Copy:
        copy = Copy(base_model(done, seed), build_tracer(w.shape, w.num_classes, cfg.tracer_width)).to(w.session.device)
        if tracer_state is not None:
            copy.tracer.load_state_dict(tracer_state)
        return copy

    def tracer_epoch(key: Tensor):
        def epoch(model, opt, x, y, gen):
            model.train()
            base = train.unwrap(model).base
            order = torch.randperm(len(x), generator=gen).to(x.device)
            total = 0.0
            for start in range(0, len(x), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                loss = noise_sensitive_loss(model, base, x[batch], y[batch], key, cfg, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
            return total / max(1, len(x))
        return epoch

    units = []
    for seed in cfg.seed_range():
        units.append(w.training.unit(f"{seed}/base", cfg.epochs, lambda done: w.classifier(cfg.arch),
                                     lambda done: (tr["x"], tr["y"]), kept))
        for i in range(cfg.copies):
            key = make_key(w.shape, unit_seed(f"{seed}/key{i}")).to(w.session.device)
            units.append(w.training.unit(f"{seed}/copy{i}", cfg.tracer_epochs, lambda done, s=seed: copy_model(done, s),
                                         lambda done: (tr["x"], tr["y"]),
                                         lambda m, done, k=key: {"tracer": cpu_state(m.tracer), "key": k.cpu()},
                                         epoch=tracer_epoch(key),
                                         optimizer=lambda params: torch.optim.Adam(params, lr=cfg.tracer_lr)))

    def summarize(done: dict) -> dict:
        x, y = test["x"][:cfg.attack_examples], test["y"][:cfg.attack_examples]
        per_seed = {}
        for seed in cfg.seed_range():
            copies = [copy_model(done, seed, done[f"{seed}/copy{i}"]["tracer"]) for i in range(cfg.copies)]
            per_seed[str(seed)] = evaluate(copies, base_model(done, seed), w.splits["val"]["x"], x, y, cfg)
        means = {f"{a}_{m}": float(np.nanmean([r[a][m] for r in per_seed.values()]))
                 for a in ATTACKS for m in ("success", "tracing_acc", "baseline_acc")}
        return {**means, "per_seed": per_seed}

    run_units(w.session, units, summarize=summarize, summary_keys=(SWEEP_METRIC,))


def tables(cfg: AttackTracingConfig, summary: dict) -> tuple[dict, dict]:
    """(tracing: one row per (seed, attack); scores: one row per (seed, attack, source, candidate))."""
    tracing, scores = [], []
    for (seed, res), a in product(summary["per_seed"].items(), ATTACKS):
        r = res[a]
        tracing.append({"seed": int(seed), "attack": a, "success": r["success"], "tracing_acc": r["tracing_acc"],
                        "baseline_acc": r["baseline_acc"], "traced": r["traced"], "base_acc": res["base_acc"],
                        "min_copy_acc": min(res["copy_acc"])})
        scores += [{"seed": int(seed), "attack": a, "source": i, "candidate": j, "mean_z": float(r["scores"][i, j]),
                    "fooled": float(r["transfer"][i, j])} for i, j in product(range(cfg.copies), repeat=2)]
    return columns(tracing), columns(scores)


def plot(cfg: AttackTracingConfig, summary: dict):
    """Left: mean tracer z-score [source, candidate] of the first seed per attack; right: accuracies."""
    first = summary["per_seed"][str(cfg.seed)]
    fig, axes = subplots(1, 3, figsize=(14, 4), layout="constrained")
    for ax, a in zip(axes, ATTACKS):
        im = ax.imshow(first[a]["scores"].numpy(), cmap="viridis")
        ax.set(xticks=range(cfg.copies), yticks=range(cfg.copies), xlabel="candidate copy (tracer j)",
               ylabel="source copy i", title=f"{a.upper()}: mean z-score of t_j(x')")
        fig.colorbar(im, ax=ax)
    ax, width = axes[2], 0.35
    for k, (col, label) in enumerate((("tracing_acc", "tracer"), ("baseline_acc", "lowest attack loss"))):
        ax.bar(np.arange(len(ATTACKS)) + k * width, [summary[f"{a}_{col}"] for a in ATTACKS], width, label=label)
    ax.axhline(1 / cfg.copies, color="k", ls="--", label="chance 1/N")
    ax.set_xticks(np.arange(len(ATTACKS)) + width / 2, [a.upper() for a in ATTACKS])
    ax.set(ylabel="source identified", ylim=(0, 1))
    ax.legend(fontsize=8)
    return fig


def outputs(cfg: AttackTracingConfig, summary: dict) -> Outputs:
    tracing, scores = tables(cfg, summary)
    means = {k: v for k, v in summary.items() if k != "per_seed"}  # per attack: success, tracing and baseline acc
    return Outputs(tables={"results": tracing, "scores": scores}, figures={"tracing.png": plot(cfg, summary)},
                   metrics={**means, "chance": 1 / cfg.copies, "base_acc": float(tracing["base_acc"].mean()),
                            "min_copy_acc": float(tracing["min_copy_acc"].min())})


def claims(cfg: AttackTracingConfig, summary: dict, outputs: Outputs) -> list:
    """Tracing above chance per attack, the tracer vs the loss baseline, and preserved clean accuracy, paired
    by seed. Tracing accuracies are over the successful examples of all copies: ``trials`` is the fewest traced."""
    tracing = outputs.tables["results"]

    def col(a, name):
        return per_seed(tracing, name, attack=a)

    def traced(a):
        return int(tracing["traced"][tracing["attack"] == a].min())

    return [
        *[compare(f"{a.upper()} examples are traced to their source copy well above chance",
                  f"tracing accuracy on successful {a.upper()} examples vs chance 1/N; rule: ≥ 0.3 above",
                  col(a, "tracing_acc"), 1 / cfg.copies, margin=0.3, trials=traced(a),
                  why="'well above chance': 30 points above guessing among the N copies") for a in ATTACKS],
        compare("every copy keeps the undivided model's clean accuracy",
                "worst copy's clean test accuracy vs the undivided model h; rule: within 0.01",
                col("fgsm", "min_copy_acc"), col("fgsm", "base_acc"), margin=-0.01, trials=cfg.attack_examples,
                why="'keeps': the worst copy not more than one accuracy point below h"),
        *[compare(f"the tracer beats the lowest-attack-loss baseline ({a.upper()})",
                  "tracing accuracy: tracer (method) vs argmax_j CE(f_j(x'), y) (baseline); rule: ≥ 0.01 higher",
                  col(a, "tracing_acc"), col(a, "baseline_acc"), margin=0.01, trials=traced(a),
                  why="'beats': one point of tracing accuracy, the smallest gain worth a tracer head per copy")
          for a in ATTACKS],
    ]


PIPELINE = Pipeline(
    config=AttackTracingConfig,
    execute=lambda cfg, stage: fit_plan(train_loop, cfg, stage,
                                        f"{cfg.seeds} × (base + {cfg.copies} copies)")["summary"],
    outputs=outputs,
    deviations=DEVIATIONS,
    claims=claims,
    budget=lambda cfg: f"{cfg.seeds} seed(s), {cfg.copies} copies, {cfg.arch}, {cfg.tracer_epochs} tracer epochs",
    trial=lambda cfg: cfg,
    sweep_metric=SWEEP_METRIC,
    sweep_mode="max",
    profiles={
        "quick": {"seeds": 2, "epochs": 15, "attack_examples": 150},
        "full": {"seeds": 5, "attack_examples": 400},
    },
)
