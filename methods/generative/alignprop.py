"""AlignProp (Prabhudesai et al., 2023): reward backpropagation through the sampling chain into LoRA weights.

On the cached digits DDPM (``pretrain.py``) with peft LoRA adapters, each update samples a batch
of class prompts c and DDIM chains (η = 1, the step noise a constant) and minimises
    L = loss_coeff · mean_b ℓ(r_b),   r = log p_proxy(c | clamp(x₀, −1, 1)),   ℓ(r) = −r  or |r − target|
with AdamW and gradient-norm clipping. Gradients reach the weights only through the last K steps
of the chain (earlier steps run without autograd, which equals AlignProp's detaching of their
predictions), every network call under gradient checkpointing. Truncation arms:
    k1: K = 1;  uniform: K = N − K₀, K₀ ~ U{0, …, N − 1};  gaussian: K₀ ~ round N(0.84N, 0.1N)
    (the official N(42, 5) of 50 steps, rescaled);  full: K = N.
The ``ddpo`` arm (``ddpo.py``) fine-tunes the same LoRA on the same sampler and reward with the
same number of generated samples. Curves (proxy and gold reward against samples) come from a
fixed evaluation batch; after training, LoRA soups θ = (1 − α)θ_pretrained + αθ_finetuned trade
reward against diversity. Every arm × seed runs in one Ray Train job, checkpointed at each evaluation.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from peft import set_peft_model_state_dict
from pydantic import Field, model_validator

from methods.generative.data import load_digit_images
from methods.generative.ddpo import PerPromptStatTracker, ddpo_iteration
from methods.generative.evaluation import balanced_labels, sample_metrics
from methods.generative.judges import ConvClassifier, class_log_prob, extract_features
from methods.generative.models import add_lora, load_lora_soup, lora_state
from methods.generative.pretrain import (GenerativeConfig, GeneratorSpec, build_generator, cache_root,
                                         ensure_pretrained, generator_spec, judge_spec, load_generator, load_judges)
from methods.generative.samplers import cfg_predictor, sample_ddim
from methods.generative.schedules import make_ddim_scheduler, make_ddpm_scheduler
from pipelines import train
from pipelines.claims import ClaimReport, compare
from pipelines.errors import UserError
from pipelines.registry import Pipeline
from pipelines.results import RunDir
from pipelines.sweep import trial_run
from pipelines.units import unit_key, unit_seed

Truncation = Literal["k1", "uniform", "gaussian", "full"]
Arm = Literal["k1", "uniform", "gaussian", "full", "ddpo"]
CURVE_METRICS = ("proxy_reward", "gold_reward", "class_precision", "frechet_distance", "diversity")


class AlignPropConfig(GenerativeConfig):
    arms: list[Arm] = Field(["k1", "full", "ddpo"], min_length=1, description="truncations of AlignProp, and ddpo")
    samples: int = Field(3200, ge=1, description="generated samples per arm (equal for every arm)")
    batch_size: int = Field(16, ge=1, description="AlignProp samples per update")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(5.0, gt=0)
    loss_coeff: float = Field(0.01, gt=0)
    reward_target: float | None = Field(None, description="ℓ = |r − target| instead of −r")
    guidance_scale: float = Field(1.0, description="CFG scale of the sampler (1 = conditional model)")
    eta: float = Field(1.0, gt=0, le=1, description="DDIM noise weight")
    checkpointing: bool = True
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(4.0, gt=0)
    ddpo_batch_size: int = Field(32, ge=2, description="DDPO samples per iteration")
    ddpo_minibatch: int = Field(16, ge=1)
    ddpo_lr: float = Field(3e-4, gt=0)
    ddpo_weight_decay: float = Field(1e-4, ge=0)
    ddpo_clip: float = Field(1e-4, gt=0)
    ddpo_adv_clip: float = Field(5.0, gt=0)
    ddpo_max_grad_norm: float = Field(1.0, gt=0)
    ddpo_buffer: int = Field(16, ge=2, description="per-prompt reward buffer (and min count)")
    eval_every: int = Field(160, ge=1, description="samples between evaluations (and checkpoints)")
    eval_per_class: int = Field(10, ge=6, description="evaluation samples per class")
    soup_coefs: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="LoRA mixing coefficients")
    seeds: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _budget(self):
        for name in ("batch_size", "ddpo_batch_size") if "ddpo" in self.arms else ("batch_size",):
            if self.eval_every % getattr(self, name):
                raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of {name}")
        if self.samples % self.eval_every:
            raise ValueError(f"samples ({self.samples}) must be a multiple of eval_every ({self.eval_every})")
        return self


DEVIATIONS = [
    "model: class-conditional UNet2DModel DDPM on 8×8 sklearn digits instead of Stable Diffusion; no VAE",
    "prompts are the 10 class labels; reward = log-probability of the prompt class under a small CNN (proxy) "
    "instead of the LAION aesthetic / HPSv2 scorers; a held-out MLP on the other half of the data is the gold reward",
    "sampler without CFG by default (guidance_scale 1; official 7.5) so the class reward is not saturated",
    "LoRA r=4, α=4 on the UNet's attention, ResNet convolution and time-embedding layers (official: attention only)",
    "fp32 on CPU (official fp16 autocast on GPUs); per-update cost is CPU thread time",
    "gaussian truncation rescales the official N(42, 5) of 50 steps to N(0.84N, 0.1N) of N steps",
]


def plan(cfg: AlignPropConfig) -> list[tuple[str, int]]:
    return [(arm, seed) for seed in range(cfg.seed, cfg.seed + cfg.seeds) for arm in cfg.arms]


def truncation_steps(kind: Truncation, n: int, generator: torch.Generator) -> int:
    """K, the number of final steps that backpropagate."""
    if kind == "k1":
        return 1
    if kind == "full":
        return n
    if kind == "uniform":
        return n - int(torch.randint(0, n, (1,), generator=generator))
    k0 = round(0.84 * n + 0.1 * n * float(torch.randn(1, generator=generator)))
    return n - min(max(k0, 0), n - 1)


def reward_backprop(model: torch.nn.Module, proxy: torch.nn.Module, scheduler, labels: torch.Tensor,
                    generator: torch.Generator, grad_steps: int, *, guidance_scale: float = 1.0, eta: float = 1.0,
                    checkpoint: bool = True, loss_coeff: float = 0.01,
                    reward_target: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample with autograd on the last ``grad_steps`` steps; return (loss, rewards); the caller calls backward."""
    chain = sample_ddim(cfg_predictor(model, labels, guidance_scale), scheduler, (len(labels), 1, 8, 8), eta=eta,
                        generator=generator, grad_steps=grad_steps, checkpoint=checkpoint)
    rewards = class_log_prob(proxy, chain.sample.clamp(-1, 1), labels)
    per_sample = -rewards if reward_target is None else (rewards - reward_target).abs()
    return loss_coeff * per_sample.mean(), rewards.detach()


def lora_model(root: Path, cfg: AlignPropConfig, seed: int):
    """The pretrained generator with fresh LoRA adapters (B = 0, A Gaussian from ``seed``)."""
    base = load_generator(root, generator_spec(cfg))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return add_lora(base, rank=cfg.lora_rank, alpha=cfg.lora_alpha)


def train_step(cfg: AlignPropConfig, arm: str, model, proxy, scheduler, labels: torch.Tensor,
               generator: torch.Generator, tracker: PerPromptStatTracker, optimizer, world_size: int) -> dict:
    """One AlignProp update (reward backprop through the last K steps) or one DDPO iteration."""
    params = [p for p in model.parameters() if p.requires_grad]
    if arm == "ddpo":
        return ddpo_iteration(model, proxy, scheduler, labels, generator, tracker, optimizer,
                              minibatch=cfg.ddpo_minibatch, clip_range=cfg.ddpo_clip, adv_clip=cfg.ddpo_adv_clip,
                              max_grad_norm=cfg.ddpo_max_grad_norm, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                              reduce_grads=lambda: train.average_gradients(model, world_size))
    k = truncation_steps(arm, cfg.num_inference_steps, generator)
    loss, rewards = reward_backprop(model, proxy, scheduler, labels, generator, k, guidance_scale=cfg.guidance_scale,
                                    eta=cfg.eta, checkpoint=cfg.checkpointing, loss_coeff=cfg.loss_coeff,
                                    reward_target=cfg.reward_target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    train.average_gradients(model, world_size)
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    return {"train_reward": rewards.mean().item(), "grad_steps": k}


def finetune_loop(config: dict) -> None:
    """Ray Train worker: every (arm, seed) unit in turn, evaluating and checkpointing every ``eval_every`` samples."""
    cfg = AlignPropConfig(**config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    session = train.WorkerSession(cfg.checkpoint_every)
    root = Path(config["root"])
    judges = load_judges(root, judge_spec(cfg))
    real = extract_features(judges.gold, load_digit_images()[0])
    scheduler = make_ddim_scheduler(make_ddpm_scheduler(), cfg.num_inference_steps)
    eval_labels = balanced_labels(cfg.eval_per_class)
    state = session.state or {"done": {}, "current": None}

    def evaluate(model, seed: int, count: int | None = None) -> tuple[dict, torch.Tensor]:
        """Metrics of the fixed evaluation batch (same noise for every arm and checkpoint of a seed)."""
        labels = eval_labels[:count]
        with torch.no_grad():
            x = sample_ddim(cfg_predictor(model, labels, cfg.guidance_scale), scheduler, (len(labels), 1, 8, 8),
                            eta=cfg.eta, generator=torch.Generator().manual_seed(10_000 + seed)).sample
        return sample_metrics(x, labels, judges, real), x.clamp(-1, 1)

    units = plan(cfg)
    for number, (arm, seed) in enumerate(units, 1):
        key = unit_key((arm, seed))
        if key in state["done"]:
            continue
        seed_of_unit = unit_seed(key)
        model = lora_model(root, cfg, seed_of_unit)
        pretrained = lora_state(model)
        ddpo = arm == "ddpo"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.ddpo_lr if ddpo else cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=cfg.ddpo_weight_decay if ddpo else cfg.weight_decay)
        generator = torch.Generator().manual_seed(seed_of_unit + 7919 * session.rank)
        current = state["current"] if state["current"] and state["current"]["key"] == key else None
        if current is None:
            current = {"key": key, "samples": 0, "updates": 0, "cpu": 0.0, "tracker": {},
                       "curve": [{"samples": 0, "train_reward": float("nan"), **evaluate(model, seed)[0]}]}
        else:
            set_peft_model_state_dict(model, current["lora"])
            optimizer.load_state_dict(current["optimizer"])
            generator.set_state(current["generator"])
        tracker = PerPromptStatTracker(cfg.ddpo_buffer, cfg.ddpo_buffer, current["tracker"])
        per_update = cfg.ddpo_batch_size if ddpo else cfg.batch_size
        while current["samples"] < cfg.samples:
            labels = torch.randint(0, 10, (per_update // session.world_size,), generator=generator)
            start = time.thread_time()
            stats = train_step(cfg, arm, model, judges.proxy, scheduler, labels, generator, tracker, optimizer,
                               session.world_size)
            current.update(cpu=current["cpu"] + time.thread_time() - start, samples=current["samples"] + per_update,
                           updates=current["updates"] + 1)
            if current["samples"] % cfg.eval_every == 0:
                metrics = evaluate(model, seed)[0]
                current["curve"].append({"samples": current["samples"], "train_reward": stats["train_reward"],
                                         **metrics})
                current.update(lora=lora_state(model), optimizer=optimizer.state_dict(),
                               generator=generator.get_state(), tracker=tracker.buffers)
                state["current"] = current
                session.report({"unit": number, "units": len(units), "samples": current["samples"], **metrics},
                               state)
        result = {"curve": current["curve"], "cpu_per_update": current["cpu"] / current["updates"],
                  "updates": current["updates"]}
        finetuned = lora_state(model)
        if not ddpo:  # LoRA soups: reward against diversity
            result["soup"] = []
            for coef in cfg.soup_coefs:
                load_lora_soup(model, pretrained, finetuned, coef)
                result["soup"].append({"coef": coef, **evaluate(model, seed)[0]})
        if seed == cfg.seed:  # 2 samples per class after and before, for the figure
            for name, coef in (("grid", 1.0), ("grid_before", 0.0)):
                load_lora_soup(model, pretrained, finetuned, coef)
                result[name] = evaluate(model, seed, 20)[1]
        state = {"done": {**state["done"], key: result}, "current": None}
        if session.rank == 0:
            print(f"[alignprop] {number}/{len(units)} {key} done", flush=True)
    last = state["done"][unit_key(units[-1])]["curve"][-1]
    session.report({"unit": len(units), "units": len(units), **{k: last[k] for k in ("samples", *CURVE_METRICS)}},
                   state, force=True)


def execute(cfg: AlignPropConfig, storage: str, name: str, log=print, callbacks: list | None = None) -> dict:
    """Pretrain (or load) the generator and judges, fine-tune every unit; return the finished units."""
    root = cache_root(cfg, storage)
    ensure_pretrained([generator_spec(cfg), judge_spec(cfg)], cfg, storage, root, log, prefix=f"{name}-pretrain")
    log(f"fine-tuning {len(plan(cfg))} (arm, seed) units, {cfg.samples} samples each, on Ray Train")
    result = train.fit(finetune_loop, {"cfg": cfg.model_dump(), "root": str(root)}, cfg, name=name,
                       storage=storage, callbacks=callbacks)
    return train.read_state(result.checkpoint)["done"]


def backprop_costs(channels: list[int], batch: int, steps: int, variants: dict[str, tuple[int, bool]]) -> dict:
    """Peak resident-memory growth (MiB) and CPU seconds of one AlignProp update (sample + backward) per variant.

    ``variants`` maps a name to (grad_steps, checkpoint). After one unmeasured update (one-time
    allocations), each variant starts with free heap returned to the OS (``malloc_trim``) and the
    kernel's peak-RSS mark reset (``/proc/self/clear_refs``), so VmHWM − VmRSS is that update's own
    peak: the chain's working memory plus the graph kept for its last ``grad_steps`` steps. Linux only.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = add_lora(build_generator(GeneratorSpec(channels=tuple(channels))).requires_grad_(False))
    proxy = ConvClassifier().eval().requires_grad_(False)
    scheduler = make_ddim_scheduler(make_ddpm_scheduler(), steps)
    labels = torch.arange(batch) % 10

    def update(grad_steps: int, checkpoint: bool) -> float:
        start = time.thread_time()
        loss, _ = reward_backprop(model, proxy, scheduler, labels, torch.Generator().manual_seed(0), grad_steps,
                                  checkpoint=checkpoint)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.thread_time() - start

    update(1, True)
    out = {}
    for name, (grad_steps, checkpoint) in variants.items():
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _proc_status_kib("VmRSS")
        seconds = update(grad_steps, checkpoint)
        out[name] = {"peak_mb": (_proc_status_kib("VmHWM") - base) / 1024, "cpu_seconds": seconds}
    return out


def _proc_status_kib(field: str) -> int:
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field + ":"))
    return int(line.split()[1])


def measure_costs(cfg: AlignPropConfig) -> dict[str, dict]:
    """``backprop_costs`` of K = 1 and the full chain (with and without checkpointing), in one Ray task."""
    import ray

    n = cfg.num_inference_steps
    variants = {"k1": (1, True), "full": (n, True), "full_no_checkpointing": (n, False)}
    task = ray.remote(num_cpus=cfg.cpus_per_worker)(backprop_costs)
    return ray.get(task.remote(cfg.gen_channels, cfg.batch_size, n, variants))


def curve_table(cfg: AlignPropConfig, done: dict) -> dict[str, np.ndarray]:
    rows = [{"arm": arm, "seed": seed, **point} for arm, seed in plan(cfg)
            for point in done[unit_key((arm, seed))]["curve"]]
    return {k: np.array([r[k] for r in rows]) for k in ("arm", "seed", "samples", "train_reward", *CURVE_METRICS,
                                                         "precision", "recall")}


def soup_table(cfg: AlignPropConfig, done: dict) -> dict[str, np.ndarray]:
    rows = [{"arm": arm, "seed": seed, **point} for arm, seed in plan(cfg) if arm != "ddpo"
            for point in done[unit_key((arm, seed))]["soup"]]
    return {k: np.array([r[k] for r in rows]) for k in ("arm", "seed", "coef", *CURVE_METRICS)}


def final(cfg: AlignPropConfig, done: dict, arm: str, metric: str) -> np.ndarray:
    """Per seed, ``metric`` at the end of the sample budget."""
    return np.array([done[unit_key((arm, s))]["curve"][-1][metric] for s in range(cfg.seed, cfg.seed + cfg.seeds)])


def plot_curves(run_dir: RunDir, table: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("proxy_reward", "proxy reward log p(c|x)"), ("gold_reward", "gold reward log p(c|x)"),
               ("class_precision", "gold class precision"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(15, 4))
    for ax, (metric, label) in zip(axes, metrics):
        for arm in dict.fromkeys(table["arm"]):
            rows = table["arm"] == arm
            xs = np.unique(table["samples"][rows])
            ys = np.array([[v for v in table[metric][rows & (table["samples"] == x)]] for x in xs])
            ax.plot(xs, ys.mean(1), marker="o", ms=3, label=arm if arm == "ddpo" else f"alignprop {arm}")
            ax.fill_between(xs, ys.min(1), ys.max(1), alpha=0.2)
        ax.set_xlabel("generated samples")
        ax.set_ylabel(label)
    axes[0].legend()
    run_dir.save_figure(fig, "rewards.png")


def plot_samples(run_dir: RunDir, cfg: AlignPropConfig, done: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {arm: done[unit_key((arm, cfg.seed))] for arm in cfg.arms}
    rows = [("pretrained", next(iter(first.values()))["grid_before"])] + [(arm, r["grid"]) for arm, r in first.items()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 0.8 * len(rows) + 0.5))
    for ax, (name, grid) in zip(axes, rows):
        ax.imshow(torch.cat(list(grid[:, 0]), dim=1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_axis_off()
        ax.set_title(name if name in ("pretrained", "ddpo") else f"alignprop {name}", fontsize=8, loc="left")
    run_dir.save_figure(fig, "samples.png")


def plot_soup(run_dir: RunDir, table: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, metric in zip(axes, ("proxy_reward", "gold_reward", "diversity")):
        for arm in dict.fromkeys(table["arm"]):
            rows = table["arm"] == arm
            coefs = np.unique(table["coef"][rows])
            ax.plot(coefs, [table[metric][rows & (table["coef"] == c)].mean() for c in coefs], marker="o", label=arm)
        ax.set_xlabel("LoRA mixing coefficient α (0 = pretrained)")
        ax.set_ylabel(metric)
    axes[0].legend()
    run_dir.save_figure(fig, "soup.png")


def write_outputs(run_dir: RunDir, cfg: AlignPropConfig, done: dict) -> dict:
    curves = curve_table(cfg, done)
    run_dir.write_table("curves.parquet", curves)
    plot_curves(run_dir, curves)
    plot_samples(run_dir, cfg, done)
    summary = {arm: {m: float(final(cfg, done, arm, m).mean()) for m in CURVE_METRICS} for arm in cfg.arms}
    for arm in cfg.arms:
        summary[arm]["cpu_seconds_per_update"] = float(np.mean(
            [done[unit_key((arm, s))]["cpu_per_update"] for s in range(cfg.seed, cfg.seed + cfg.seeds)]))
    pretrained = {m: float(np.mean([done[unit_key((cfg.arms[0], s))]["curve"][0][m]
                                    for s in range(cfg.seed, cfg.seed + cfg.seeds)])) for m in CURVE_METRICS}
    out = {"pretrained": pretrained, "final": summary, "samples_per_arm": cfg.samples, "deviations": DEVIATIONS}
    if any(arm != "ddpo" for arm in cfg.arms):
        soup = soup_table(cfg, done)
        run_dir.write_table("soup.parquet", soup)
        plot_soup(run_dir, soup)
    return out


def run(cfg: AlignPropConfig, run_dir: RunDir) -> dict:
    return write_outputs(run_dir, cfg, execute(cfg, run_dir.storage, "alignprop", run_dir.log))


def reproduce(cfg: AlignPropConfig, run_dir: RunDir) -> ClaimReport:
    """AlignProp vs DDPO at equal samples (proxy, then gold reward); full-chain vs K = 1 memory and time."""
    methods = [arm for arm in cfg.arms if arm != "ddpo"]
    if "ddpo" not in cfg.arms or not methods:
        raise UserError("reproduce needs the ddpo arm and at least one AlignProp truncation in arms")
    done = execute(cfg, run_dir.storage, "alignprop", run_dir.log)
    metrics = write_outputs(run_dir, cfg, done)
    run_dir.log("measuring peak memory and CPU time of one update: K = 1 vs full chain")
    costs = measure_costs(cfg)
    run_dir.write_json("costs.json", costs)
    dev = DEVIATIONS + [f"{cfg.seeds} seed(s), {cfg.samples} samples per arm, {cfg.num_inference_steps} DDIM steps, "
                        f"generator {cfg.gen_epochs} epochs"]
    claims = [compare(f"AlignProp ({arm}) reaches a higher proxy reward than DDPO with the same {cfg.samples} samples",
                      "proxy reward at the end of the budget", final(cfg, done, arm, "proxy_reward"),
                      final(cfg, done, "ddpo", "proxy_reward"), deviations=dev) for arm in methods]
    claims += [compare(f"AlignProp ({arm}) also reaches a higher gold (held-out classifier) reward than DDPO",
                       "gold reward at the end of the budget", final(cfg, done, arm, "gold_reward"),
                       final(cfg, done, "ddpo", "gold_reward"), deviations=dev) for arm in methods]
    c = costs
    memory_ratio = c["full"]["peak_mb"] / max(c["k1"]["peak_mb"], 1e-9)
    claims.append(compare("full-chain reward backprop needs more peak memory than K = 1 (both checkpointed)",
                          f"peak memory growth of one update, MiB (ratio {memory_ratio:.2f})",
                          [c["full"]["peak_mb"]], [c["k1"]["peak_mb"]], deviations=dev))
    claims.append(compare("full-chain reward backprop takes more time per update than K = 1",
                          f"CPU seconds per update (ratio {c['full']['cpu_seconds'] / c['k1']['cpu_seconds']:.2f})",
                          [c["full"]["cpu_seconds"]], [c["k1"]["cpu_seconds"]], deviations=dev))
    claims.append(compare("gradient checkpointing lowers the peak memory of full-chain backprop",
                          "peak memory growth, MiB: full chain without (method) vs with checkpointing",
                          [c["full_no_checkpointing"]["peak_mb"]], [c["full"]["peak_mb"]], deviations=dev))
    run_dir.log(f"final rewards: {metrics['final']}")
    return ClaimReport(headline=claims[0], more=claims[1:])


def trial(config: dict, storage: str) -> None:
    """Ray Tune driver: one AlignProp arm, reporting the evaluation proxy reward at every checkpoint."""
    cfg = AlignPropConfig(**config)
    cfg = cfg.model_copy(update={"arms": [a for a in cfg.arms if a != "ddpo"][:1] or ["k1"], "seeds": 1})
    execute(cfg, storage, **trial_run())


PIPELINE = Pipeline(
    config=AlignPropConfig,
    run=run,
    reproduce=reproduce,
    trial=trial,
    sweep_metric="proxy_reward",
    sweep_mode="max",
    profiles={
        "quick": {"gen_epochs": 20, "judge_epochs": 20, "num_inference_steps": 10, "samples": 480, "eval_every": 96,
                  "arms": ["k1", "full", "ddpo"], "seeds": 2},
        "full": {"gen_epochs": 80, "judge_epochs": 30, "num_inference_steps": 20, "samples": 3200, "eval_every": 320,
                 "arms": ["k1", "uniform", "full", "ddpo"], "seeds": 3},
    },
)
