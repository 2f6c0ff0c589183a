"""Gradient-Free Classifier Guidance (Shenoy et al., 2024) on a class-conditional digits DDPM.

The pretrained generator, a weak generator for autoguidance (smaller and trained for fewer epochs,
Karras-style) and the judges come from the cached Ray Train pretraining stage. Each arm samples
``samples_per_class`` digits of every class with DDIM from the same noise per seed, one Ray task
per (arm, seed):
    cond             D(x; c)
    cfg@w            D(x; ∅) + w·(D(x; c) − D(x; ∅))                for w in ``cfg_scales``
    atg              D_weak(x; c) + w·(D(x; c) − D_weak(x; c))
    gfcg, cfg@w₀+gfcg, atg+gfcg:   the base + s_t·(D(x; c) − D(x; c_ref,t))
with c_ref,t and s_t from the proxy CNN in inference mode on x̂₀ (``guidance.py``). The gold MLP,
trained on the other half of the data, is the evaluation classifier: class precision, Fréchet
distance and k-NN precision/recall in its feature space, per-class diversity (``evaluation.py``).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from methods.generative.data import load_digit_images
from methods.generative.evaluation import balanced_labels, sample_metrics
from methods.generative.guidance import GradientFreeClassifierGuidance, guided_predictor
from methods.generative.judges import extract_features
from methods.generative.pretrain import (GenerativeConfig, cache_root, ensure_pretrained, generator_spec, judge_spec,
                                         load_generator, load_judges)
from methods.generative.samplers import sample_ddim
from methods.generative.schedules import make_ddim_scheduler, make_ddpm_scheduler
from pipelines.claims import ClaimReport, compare
from pipelines.registry import Pipeline
from pipelines.results import RunDir

METRICS = ("class_precision", "proxy_reward", "gold_reward", "frechet_distance", "precision", "recall", "diversity")


class GFCGConfig(GenerativeConfig):
    weak_channels: list[int] = Field([16, 32], min_length=1, description="autoguidance weak model widths")
    weak_epochs: int = Field(15, ge=1, description="autoguidance weak model epochs")
    cfg_scales: list[float] = Field([1.5, 2.0, 3.0, 5.0], min_length=1, description="CFG arms (the CFG curve)")
    combo_cfg_scale: float = Field(1.5, description="CFG scale of the CFG+GFCG arm (one of cfg_scales)")
    atg_scale: float = Field(2.0, ge=1)
    gfcg_scale: float = Field(2.0, ge=0, description="s_max")
    scale_rule: Literal["ratio", "confusion"] = "ratio"
    gamma: float = Field(1.0, gt=0, description="exponent of the ratio rule")
    gfcg_start: float = Field(0.0, ge=0, lt=1, description="fraction of steps before GFCG starts")
    gfcg_stop: float = Field(1.0, gt=0, le=1, description="fraction of steps after which GFCG stops")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM noise weight (0 = deterministic)")
    samples_per_class: int = Field(50, ge=6)
    seeds: int = Field(1, ge=1, description="sampling seeds seed, seed+1, …")

    @model_validator(mode="after")
    def _combo(self):
        if self.combo_cfg_scale not in self.cfg_scales:
            raise ValueError(f"combo_cfg_scale {self.combo_cfg_scale} must be one of cfg_scales {self.cfg_scales}")
        if self.gfcg_start >= self.gfcg_stop:
            raise ValueError("gfcg_start must be below gfcg_stop")
        return self


DEVIATIONS = [
    "GFCG's reference-class rule and scale function are the platform's reconstruction (c_ref = most probable "
    "other class of the classifier on the conditional x̂₀; s_t = s_max·min(1, (p_ref/p_c)^γ) or s_max·(1 − p_c)); "
    "the paper's own equations could not be read offline (only its abstract and summary)",
    "data: sklearn digits 8×8 instead of ImageNet 512×512; a small UNet2DModel DDPM instead of EDM2; DDIM sampling",
    "GFCG classifier: the proxy CNN trained on clean digits (not noise-aware), applied to x̂₀",
    "autoguidance: a separately trained smaller, shorter-trained model (Karras et al.), not diffusers' "
    "layer-skip AutoGuidance",
    "FD_DINOv2/FID replaced by the Fréchet distance and k-NN precision/recall in the gold MLP's feature space",
    "class precision = share of samples the gold classifier assigns to the requested class",
]


def arms(cfg: GFCGConfig) -> list[dict]:
    w0 = cfg.combo_cfg_scale
    return [{"name": "cond", "base": "cond", "scale": 1.0, "gfcg": False},
            *({"name": f"cfg@{w:g}", "base": "cfg", "scale": w, "gfcg": False} for w in cfg.cfg_scales),
            {"name": "atg", "base": "atg", "scale": cfg.atg_scale, "gfcg": False},
            {"name": "gfcg", "base": "cond", "scale": 1.0, "gfcg": True},
            {"name": f"cfg@{w0:g}+gfcg", "base": "cfg", "scale": w0, "gfcg": True},
            {"name": "atg+gfcg", "base": "atg", "scale": cfg.atg_scale, "gfcg": True}]


def weak_spec(cfg: GFCGConfig):
    return generator_spec(cfg, channels=tuple(cfg.weak_channels), epochs=cfg.weak_epochs)


def make_guider(cfg: GFCGConfig) -> GradientFreeClassifierGuidance:
    return GradientFreeClassifierGuidance(guidance_scale=cfg.gfcg_scale, scale_rule=cfg.scale_rule, gamma=cfg.gamma,
                                          start=cfg.gfcg_start, stop=cfg.gfcg_stop)


def pretrain(cfg: GFCGConfig, storage: str, log=print, prefix: str = "pretrain"):
    """The cache folder holding the generator, the weak generator and the judges (trained if missing)."""
    root = cache_root(cfg, storage)
    ensure_pretrained([generator_spec(cfg), weak_spec(cfg), judge_spec(cfg)], cfg, storage, root, log, prefix)
    return root


def evaluate_seed(seed: int, chosen: list[dict], config: dict, root: str) -> list[dict]:
    """Sample every arm from the seed's noise and score it (one Ray task per seed)."""
    torch.set_num_threads(1)
    cfg = GFCGConfig(**config)
    model, weak = load_generator(root, generator_spec(cfg)), load_generator(root, weak_spec(cfg))
    judges = load_judges(root, judge_spec(cfg))
    real = extract_features(judges.gold, load_digit_images()[0])
    scheduler = make_ddim_scheduler(make_ddpm_scheduler(), cfg.num_inference_steps)
    labels = balanced_labels(cfg.samples_per_class)
    rows: list[int] = []
    for net in (model, weak):
        net.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    results = []
    for arm in chosen:
        rows.clear()
        trace: list = []
        predict = guided_predictor(model, labels, scheduler, base=arm["base"], scale=arm["scale"], weak=weak,
                                   gfcg=make_guider(cfg) if arm["gfcg"] else None, classifier=judges.proxy,
                                   trace=trace)
        start = time.thread_time()
        with torch.no_grad():
            sample = sample_ddim(predict, scheduler, (len(labels), 1, 8, 8), eta=cfg.eta,
                                 generator=torch.Generator().manual_seed(seed)).sample
        results.append({"arm": arm["name"], "seed": seed, **sample_metrics(sample, labels, judges, real),
                        "nfe": sum(rows) / (len(labels) * cfg.num_inference_steps),
                        "cpu_seconds": time.thread_time() - start, "grid": sample[:20].clamp(-1, 1),
                        "gfcg_scale_mean": float(torch.cat([s for _, s in trace]).mean()) if trace else 0.0})
    return results


def evaluate(cfg: GFCGConfig, root, chosen: list[dict] | None = None) -> list[dict]:
    """All arms of a seed in one Ray task (``cpus_per_worker`` CPUs); seeds in parallel.

    "DEFAULT" scheduling keeps the tasks out of a Tune trial's placement group.
    """
    import ray

    task = ray.remote(num_cpus=cfg.cpus_per_worker, scheduling_strategy="DEFAULT")(evaluate_seed)
    jobs = [task.remote(seed, chosen or arms(cfg), cfg.model_dump(), str(root))
            for seed in range(cfg.seed, cfg.seed + cfg.seeds)]
    return [result for job in ray.get(jobs) for result in job]


def table(results: list[dict]) -> dict[str, np.ndarray]:
    keys = ["arm", "seed", *METRICS, "nfe", "cpu_seconds", "gfcg_scale_mean"]
    return {k: np.array([r[k] for r in results]) for k in keys}


def per_seed(results: list[dict], arm: str, metric: str) -> np.ndarray:
    return np.array([r[metric] for r in sorted(results, key=lambda r: r["seed"]) if r["arm"] == arm])


def cfg_matched_recall(results: list[dict], cfg: GFCGConfig, arm: str, min_scale: float) -> np.ndarray:
    """Per seed: the recall at which raising the CFG scale from ``min_scale`` (1 = cond) first
    reaches ``arm``'s class precision.

    Linear in class precision between consecutive scales; beyond the curve, the recall of its most
    precise point (the smallest such scale), which favours CFG.
    """
    curve = [("cond", 1.0)] + [(f"cfg@{w:g}", w) for w in sorted(cfg.cfg_scales)]
    curve = [name for name, w in curve if w >= min_scale]
    out = []
    for i, target in enumerate(per_seed(results, arm, "class_precision")):
        prec = [per_seed(results, name, "class_precision")[i] for name in curve]
        rec = [per_seed(results, name, "recall")[i] for name in curve]
        out.append(first_crossing(target, prec, rec))
    return np.array(out)


def first_crossing(target: float, prec: list[float], rec: list[float]) -> float:
    """Recall at the first point of the (prec, rec) path, in scale order, whose precision reaches ``target``."""
    if target <= prec[0]:
        return float(rec[0])
    for j in range(1, len(prec)):
        if prec[j] >= target:  # every earlier precision is below the target
            frac = (target - prec[j - 1]) / (prec[j] - prec[j - 1])
            return float(rec[j - 1] + frac * (rec[j] - rec[j - 1]))
    return float(rec[int(np.argmax(prec))])


def summarize(results: list[dict]) -> dict[str, dict[str, float]]:
    names = list(dict.fromkeys(r["arm"] for r in results))
    return {a: {m: float(per_seed(results, a, m).mean()) for m in (*METRICS, "nfe")} for a in names}


def plot_precision_recall(run_dir: RunDir, results: list[dict], cfg: GFCGConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, y, label in ((axes[0], "class_precision", "class precision (gold classifier)"),
                         (axes[1], "precision", "k-NN precision (gold features)")):
        curve = ["cond"] + [f"cfg@{w:g}" for w in cfg.cfg_scales]
        ax.plot([summary[a]["recall"] for a in curve], [summary[a][y] for a in curve], "k--", lw=1, label="CFG curve")
        for name, row in summary.items():
            ax.scatter(row["recall"], row[y], marker="*" if "gfcg" in name else "o", s=70)
            ax.annotate(name, (row["recall"], row[y]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("k-NN recall (gold features)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"GFCG on digits: every arm, mean over {cfg.seeds} seed(s)")
    run_dir.save_figure(fig, "precision_recall.png")


def plot_samples(run_dir: RunDir, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in results if r["seed"] == min(r["seed"] for r in results)]
    fig, axes = plt.subplots(len(first), 1, figsize=(10, 0.7 * len(first) + 0.5))
    for ax, r in zip(np.atleast_1d(axes), first):
        row = torch.cat(list(r["grid"][:, 0]), dim=1)
        ax.imshow(row.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_axis_off()
        ax.set_title(r["arm"], fontsize=8, loc="left")
    run_dir.save_figure(fig, "samples.png")


def write_outputs(run_dir: RunDir, cfg: GFCGConfig, results: list[dict]) -> dict:
    run_dir.write_table("results.parquet", table(results))
    plot_precision_recall(run_dir, results, cfg)
    plot_samples(run_dir, results)
    make_guider(cfg).save_pretrained(run_dir.path / "gfcg_guider")
    return {"arms": summarize(results), "deviations": DEVIATIONS}


def run(cfg: GFCGConfig, run_dir: RunDir) -> dict:
    root = pretrain(cfg, run_dir.storage, run_dir.log)
    run_dir.log(f"sampling {len(arms(cfg))} arms × {cfg.seeds} seed(s), {10 * cfg.samples_per_class} digits each")
    return write_outputs(run_dir, cfg, evaluate(cfg, root))


def reproduce(cfg: GFCGConfig, run_dir: RunDir) -> ClaimReport:
    """GFCG vs the same base without it (class precision), and recall vs CFG at matched class precision."""
    root = pretrain(cfg, run_dir.storage, run_dir.log)
    results = evaluate(cfg, root)
    write_outputs(run_dir, cfg, results)
    w0 = f"cfg@{cfg.combo_cfg_scale:g}"
    dev = DEVIATIONS + [f"{cfg.seeds} sampling seed(s) × {10 * cfg.samples_per_class} samples; generator "
                        f"{cfg.gen_epochs} epochs, weak {cfg.weak_epochs}; s_max {cfg.gfcg_scale}, "
                        f"rule {cfg.scale_rule}"]

    def gain(arm: str, base: str) -> object:
        return compare(f"GFCG raises class precision over the same base without it ({base} → {arm})",
                       "class precision (gold classifier)", per_seed(results, arm, "class_precision"),
                       per_seed(results, base, "class_precision"), deviations=dev)

    def recall(arm: str, min_scale: float) -> object:
        return compare(f"{arm} loses no more recall than raising the CFG scale (≥ {min_scale:g}) to the same "
                       "class precision", "k-NN recall: GFCG arm vs the CFG curve interpolated at its class precision",
                       per_seed(results, arm, "recall"), cfg_matched_recall(results, cfg, arm, min_scale),
                       deviations=dev)

    more = [gain(f"{w0}+gfcg", w0), gain("atg+gfcg", "atg"), recall("gfcg", 1.0),
            recall(f"{w0}+gfcg", cfg.combo_cfg_scale),
            compare("ATG+GFCG has a lower Fréchet distance than ATG alone (paper: better fidelity with ATG)",
                    "Fréchet distance (gold features)", per_seed(results, "atg+gfcg", "frechet_distance"),
                    per_seed(results, "atg", "frechet_distance"), higher_is_better=False, deviations=dev),
            compare("check of the ATG baseline: autoguidance lowers the Fréchet distance of the conditional model "
                    "(Karras et al.)", "Fréchet distance (gold features): atg vs cond",
                    per_seed(results, "atg", "frechet_distance"), per_seed(results, "cond", "frechet_distance"),
                    higher_is_better=False, deviations=dev)]
    return ClaimReport(headline=gain("gfcg", "cond"), more=more)


def trial(config: dict, storage: str) -> None:
    """Ray Tune driver: GFCG on the conditional model (pretraining cached in the sweep's storage); reports FD."""
    from ray import tune

    cfg = GFCGConfig(**config).model_copy(update={"seeds": 1})
    root = pretrain(cfg, storage, prefix=f"trial-{tune.get_context().get_trial_id()}-pretrain")
    result = evaluate(cfg, root, [arm for arm in arms(cfg) if arm["name"] == "gfcg"])[0]
    tune.report({m: result[m] for m in METRICS})


PIPELINE = Pipeline(
    config=GFCGConfig,
    run=run,
    reproduce=reproduce,
    trial=trial,
    sweep_metric="frechet_distance",
    sweep_mode="min",
    profiles={
        "quick": {"gen_epochs": 20, "weak_epochs": 5, "judge_epochs": 20, "samples_per_class": 30, "seeds": 2},
        "full": {"gen_epochs": 80, "weak_epochs": 15, "judge_epochs": 30, "samples_per_class": 100, "seeds": 3},
    },
)
