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
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from methods.generative.evaluation import balanced_labels, load_evaluation, plot_sample_rows
from methods.generative.guidance import GradientFreeClassifierGuidance, guided_predictor
from methods.generative.pretrain import GenerativeConfig, generator_spec, judge_spec, load_generator, pretrained
from pipelines.claims import compare, per_seed
from pipelines.pipeline import Outputs, Pipeline, Stage
from pipelines.results import columns, group_means, subplots

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


def evaluate_seed(seed: int, chosen: list[dict], config: dict, root: str) -> list[dict]:
    """Sample every arm from the seed's noise and score it (one Ray task per seed)."""
    torch.set_num_threads(1)
    cfg = GFCGConfig(**config)
    model, weak = load_generator(root, generator_spec(cfg)), load_generator(root, weak_spec(cfg))
    kit, labels = load_evaluation(root, cfg), balanced_labels(cfg.samples_per_class)
    rows: list[int] = []
    for net in (model, weak):
        net.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    results = []
    for arm in chosen:
        rows.clear()
        trace: list = []
        predict = guided_predictor(model, labels, kit.scheduler, base=arm["base"], scale=arm["scale"], weak=weak,
                                   gfcg=make_guider(cfg) if arm["gfcg"] else None, classifier=kit.judges.proxy,
                                   trace=trace)
        start = time.thread_time()
        metrics, sample = kit.sample(predict, labels, cfg.eta, seed)
        results.append({"arm": arm["name"], "seed": seed, **metrics,
                        "nfe": sum(rows) / (len(labels) * cfg.num_inference_steps),
                        "cpu_seconds": time.thread_time() - start, "grid": sample[:20],
                        "gfcg_scale_mean": float(torch.cat([s for _, s in trace]).mean()) if trace else 0.0})
    return results


def execute(cfg: GFCGConfig, stage: Stage) -> list[dict]:
    """Pretrain (or load) the generator, the weak generator and the judges; then every arm (a Tune trial:
    the gfcg arm alone) per seed, all arms of a seed in one Ray task of ``cpus_per_worker`` CPUs, seeds in
    parallel ("DEFAULT" scheduling keeps the tasks out of a Tune trial's placement group)."""
    import ray

    root = pretrained(cfg, stage, [generator_spec(cfg), weak_spec(cfg), judge_spec(cfg)])
    chosen = [arm for arm in arms(cfg) if stage.purpose != "trial" or arm["name"] == "gfcg"]
    if stage.purpose != "trial":
        make_guider(cfg).save_pretrained(Path(stage.storage).parent / "gfcg_guider")  # <out>/gfcg_guider
        stage.log(f"sampling {len(chosen)} arms × {cfg.seeds} seed(s), {10 * cfg.samples_per_class} digits each")
    task = ray.remote(num_cpus=cfg.cpus_per_worker, scheduling_strategy="DEFAULT")(evaluate_seed)
    jobs = [task.remote(seed, chosen, cfg.model_dump(), str(root)) for seed in cfg.seed_range()]
    return [result for job in ray.get(jobs) for result in job]


def cfg_matched_recall(results: list[dict], cfg: GFCGConfig, arm: str, min_scale: float) -> dict[int, float]:
    """Per seed: the recall at which raising the CFG scale from ``min_scale`` (1 = cond) first
    reaches ``arm``'s class precision.

    Linear in class precision between consecutive scales; beyond the curve, the recall of its most
    precise point (the smallest such scale), which favours CFG.
    """
    table = columns(results, ["arm", "seed", "class_precision", "recall"])
    curve = [name for name, w in [("cond", 1.0), *((f"cfg@{w:g}", w) for w in sorted(cfg.cfg_scales))]
             if w >= min_scale]
    prec, rec = ({name: per_seed(table, metric, arm=name) for name in curve}
                 for metric in ("class_precision", "recall"))
    return {seed: first_crossing(target, [prec[name][seed] for name in curve], [rec[name][seed] for name in curve])
            for seed, target in per_seed(table, "class_precision", arm=arm).items()}


def first_crossing(target: float, prec: list[float], rec: list[float]) -> float:
    """Recall at the first point of the (prec, rec) path, in scale order, whose precision reaches ``target``."""
    if target <= prec[0]:
        return float(rec[0])
    for j in range(1, len(prec)):
        if prec[j] >= target:  # every earlier precision is below the target
            frac = (target - prec[j - 1]) / (prec[j] - prec[j - 1])
            return float(rec[j - 1] + frac * (rec[j] - rec[j - 1]))
    return float(rec[int(np.argmax(prec))])


def plot_precision_recall(summary: dict[str, dict[str, float]], cfg: GFCGConfig):
    fig, axes = subplots(1, 2, figsize=(11, 4.5))
    curve = ["cond"] + [f"cfg@{w:g}" for w in cfg.cfg_scales]
    for ax, y, label in ((axes[0], "class_precision", "class precision (gold classifier)"),
                         (axes[1], "precision", "k-NN precision (gold features)")):
        ax.plot([summary[a]["recall"] for a in curve], [summary[a][y] for a in curve], "k--", lw=1, label="CFG curve")
        for name, row in summary.items():
            ax.scatter(row["recall"], row[y], marker="*" if "gfcg" in name else "o", s=70)
            ax.annotate(name, (row["recall"], row[y]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("k-NN recall (gold features)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"GFCG on digits: every arm, mean over {cfg.seeds} seed(s)")
    return fig


def outputs(cfg: GFCGConfig, results: list[dict]) -> Outputs:
    table = columns(results, ["arm", "seed", *METRICS, "nfe", "cpu_seconds", "gfcg_scale_mean"])
    summary = {arm: {m: means[m] for m in (*METRICS, "nfe")} for arm, means in group_means(table, "arm").items()}
    first_seed = {r["arm"]: r["grid"] for r in results if r["seed"] == cfg.seed}
    return Outputs(tables={"results": table}, metrics={"arms": summary},
                   figures={"precision_recall.png": plot_precision_recall(summary, cfg),
                            "samples.png": plot_sample_rows(first_seed, row_height=0.7)})


PRECISION_MARGIN = "one point of class precision; the paper's gains are several points"
FD_MARGIN = "1 unit of Fréchet distance, under a tenth of the conditional model's: a visible change in fidelity"


def claims(cfg: GFCGConfig, results: list[dict], outputs: Outputs) -> list:
    """GFCG vs the same base without it (class precision), and recall vs CFG at matched class precision."""
    table, w0 = outputs.tables["results"], f"cfg@{cfg.combo_cfg_scale:g}"

    def gain(arm: str, base: str):
        return compare(f"GFCG raises class precision over the same base without it ({base} → {arm})",
                       "class precision (gold classifier)", per_seed(table, "class_precision", arm=arm),
                       per_seed(table, "class_precision", arm=base), margin=0.01, why=PRECISION_MARGIN,
                       trials=10 * cfg.samples_per_class)

    def recall(arm: str, min_scale: float):
        return compare(f"{arm} loses no more recall than raising the CFG scale (≥ {min_scale:g}) to the same "
                       "class precision", "k-NN recall: GFCG arm vs the CFG curve interpolated at its class precision",
                       per_seed(table, "recall", arm=arm), cfg_matched_recall(results, cfg, arm, min_scale),
                       margin=-0.01, why="non-inferiority ('no more recall lost'): not worse by over one recall point")

    def lower_fd(text: str, metric: str, arm: str, base: str):
        return compare(text, metric, per_seed(table, "frechet_distance", arm=arm),
                       per_seed(table, "frechet_distance", arm=base), margin=1.0, why=FD_MARGIN,
                       higher_is_better=False)

    return [gain("gfcg", "cond"), gain(f"{w0}+gfcg", w0), gain("atg+gfcg", "atg"), recall("gfcg", 1.0),
            recall(f"{w0}+gfcg", cfg.combo_cfg_scale),
            lower_fd("ATG+GFCG has a lower Fréchet distance than ATG alone (paper: better fidelity with ATG)",
                     "Fréchet distance (gold features)", "atg+gfcg", "atg"),
            lower_fd("check of the ATG baseline: autoguidance lowers the Fréchet distance of the conditional model "
                     "(Karras et al.)", "Fréchet distance (gold features): atg vs cond", "atg", "cond")]


PIPELINE = Pipeline(
    config=GFCGConfig,
    execute=execute,
    outputs=outputs,
    deviations=DEVIATIONS,
    claims=claims,
    budget=lambda cfg: (f"{cfg.seeds} sampling seed(s) × {10 * cfg.samples_per_class} samples; generator "
                        f"{cfg.gen_epochs} epochs, weak {cfg.weak_epochs}; s_max {cfg.gfcg_scale}, "
                        f"rule {cfg.scale_rule}"),
    trial=lambda cfg: cfg.model_copy(update={"seeds": 1}),  # the gfcg arm alone; its metrics reported once
    tune_metrics=lambda cfg, results: {m: results[0][m] for m in METRICS},
    sweep_metric="frechet_distance",
    sweep_mode="min",
    profiles={
        "quick": {"gen_epochs": 20, "weak_epochs": 5, "judge_epochs": 20, "samples_per_class": 30, "seeds": 2},
        "full": {"gen_epochs": 80, "weak_epochs": 15, "judge_epochs": 30, "samples_per_class": 100, "seeds": 5},
    },
)
