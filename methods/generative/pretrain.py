"""Pretraining stage of the generative base: digit generators and judges, trained on Ray Train and cached.

Generators (``ClassConditionalUNet``) minimise, per mini-batch of digits x₀ with labels c dropped to
the null label with probability p (for classifier-free guidance),
    DDPM: E‖ε_θ(√ᾱ_t x₀ + √(1 − ᾱ_t) ε, t, c̃) − ε‖²     flow: E‖v_θ((1 − σ)x₀ + σε, σT, c̃) − (ε − x₀)‖²
with Adam, a checkpoint every epoch (so an interrupted fit resumes at the next epoch) and, with
several Train workers, gradients averaged over the workers' shards. The judges (proxy CNN and
gold MLP, ``judges.train_judges``) are one more unit. Each finished unit is written to a cache
folder keyed by a fingerprint of its spec, ``<cache>/<kind>-<fingerprint>/``; the cache is the
run's ``<out>/generative`` unless ``cache_dir`` names a shared folder, so later stages, reruns,
Tune trials and other methods load the weights instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from methods.generative.data import load_digit_images
from methods.generative.judges import ConvClassifier, Judges, MLPClassifier, train_judges
from methods.generative.models import ClassConditionalUNet
from methods.generative.schedules import diffusion_loss, flow_matching_loss, make_ddpm_scheduler
from pipelines import train
from pipelines.config import MethodConfig
from pipelines.results import atomic_dir

VERSION = 1  # bump when training code changes what a spec produces
WEIGHTS, META = "weights.pt", "meta.json"


@dataclass(frozen=True)
class GeneratorSpec:
    """A class-conditional generator: architecture, objective and optimisation."""

    kind: Literal["ddpm", "flow"] = "ddpm"
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    label_dropout: float = 0.1
    seed: int = 0
    image_size: int = 8


@dataclass(frozen=True)
class JudgeSpec:
    """Proxy and gold digit classifiers (``judges.train_judges``)."""

    epochs: int = 30
    seed: int = 0
    image_size: int = 8


Spec = GeneratorSpec | JudgeSpec


class GenerativeConfig(MethodConfig):
    """Settings of the pretrained base shared by the generative methods."""

    cache_dir: str | None = Field(None, description="shared cache of pretrained models (default <out>/generative)")
    gen_channels: list[int] = Field([32, 64], min_length=1, description="UNet block widths")
    gen_epochs: int = Field(60, ge=1)
    gen_batch_size: int = Field(64, ge=2)
    gen_lr: float = Field(2e-3, gt=0)
    label_dropout: float = Field(0.1, ge=0, lt=1, description="p of the null label in pretraining (CFG)")
    judge_epochs: int = Field(30, ge=1)
    pretrain_seed: int = Field(0, ge=0, description="seed of the pretrained generator and judges")
    num_inference_steps: int = Field(20, ge=2, description="DDIM sampling steps")


def generator_spec(cfg: GenerativeConfig, **changes) -> GeneratorSpec:
    spec = GeneratorSpec(channels=tuple(cfg.gen_channels), epochs=cfg.gen_epochs, batch_size=cfg.gen_batch_size,
                         lr=cfg.gen_lr, label_dropout=cfg.label_dropout, seed=cfg.pretrain_seed)
    return GeneratorSpec(**{**asdict(spec), **changes})


def judge_spec(cfg: GenerativeConfig) -> JudgeSpec:
    return JudgeSpec(epochs=cfg.judge_epochs, seed=cfg.pretrain_seed)


def cache_root(cfg: GenerativeConfig, storage: str) -> Path:
    """``cfg.cache_dir`` or ``<out>/generative`` for a run whose Ray storage is ``<out>/ray``."""
    return Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else Path(storage).parent / "generative"


def fingerprint(spec: Spec) -> str:
    payload = {"unit": type(spec).__name__, "version": VERSION, **asdict(spec)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def unit_dir(root: Path, spec: Spec) -> Path:
    kind = spec.kind if isinstance(spec, GeneratorSpec) else "judges"
    return Path(root) / f"{kind}-{fingerprint(spec)}"


def is_cached(root: Path, spec: Spec) -> bool:
    return (unit_dir(root, spec) / META).exists()


def build_generator(spec: GeneratorSpec) -> ClassConditionalUNet:
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        return ClassConditionalUNet(sample_size=spec.image_size, block_out_channels=spec.channels,
                                    layers_per_block=spec.layers_per_block)


def load_generator(root: Path, spec: GeneratorSpec) -> ClassConditionalUNet:
    """The cached generator in eval mode, its weights frozen."""
    model = build_generator(spec)
    model.load_state_dict(torch.load(unit_dir(root, spec) / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def load_judges(root: Path, spec: JudgeSpec) -> Judges:
    state = torch.load(unit_dir(root, spec) / WEIGHTS, map_location="cpu", weights_only=True)
    proxy, gold = ConvClassifier(), MLPClassifier(spec.image_size)
    proxy.load_state_dict(state["proxy"])
    gold.load_state_dict(state["gold"])
    return Judges(proxy=proxy.eval().requires_grad_(False), gold=gold.eval().requires_grad_(False))


def read_meta(root: Path, spec: Spec) -> dict:
    return json.loads((unit_dir(root, spec) / META).read_text())


def ensure_pretrained(specs: list[Spec], cfg: MethodConfig, storage: str, root: Path,
                      log: Callable[[str], None] = print, prefix: str = "pretrain") -> None:
    """Train (one Ray Train fit) every spec that is not in the cache ``root`` yet.

    The fit is named ``<prefix>-<hash of the specs>``: a rerun in the same storage resumes it, and
    concurrent Tune trials (each with its own ``prefix``) do not share a Train run.
    """
    specs = list(dict.fromkeys(specs))
    missing = [s for s in specs if not is_cached(root, s)]
    if not missing:
        return
    log(f"pretraining {', '.join(unit_dir(root, s).name for s in missing)} on Ray Train (cache {root})")
    units = [{"kind": type(s).__name__, "spec": asdict(s), "path": str(unit_dir(root, s))} for s in specs]
    config = {"units": units, "threads": max(1, int(cfg.cpus_per_worker)), "checkpoint_every": cfg.checkpoint_every}
    key = hashlib.sha256(" ".join(u["path"] for u in units).encode()).hexdigest()[:8]
    train.fit(pretrain_loop, config, cfg, name=f"{prefix}-{key}", storage=storage)
    for spec in missing:
        if not is_cached(root, spec):
            raise RuntimeError(f"pretraining finished without writing {unit_dir(root, spec)}")
        if isinstance(spec, GeneratorSpec):
            losses = read_meta(root, spec)["losses"]
            log(f"{unit_dir(root, spec).name}: loss {losses[0]:.4f} → {losses[-1]:.4f} over {len(losses)} epochs")


def generator_epoch(model: ClassConditionalUNet, optimizer: torch.optim.Optimizer, spec: GeneratorSpec,
                    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                    rank: int = 0, world_size: int = 1) -> float:
    """One epoch over this rank's share of a seeded permutation; returns the mean loss."""
    scheduler = make_ddpm_scheduler() if spec.kind == "ddpm" else None
    order = torch.randperm(len(images), generator=generator)
    model.train()
    losses = []
    for start in range(0, len(order) - spec.batch_size + 1, spec.batch_size):
        batch = order[start : start + spec.batch_size][rank::world_size]
        x0, c = images[batch], labels[batch]
        if spec.kind == "ddpm":
            loss = diffusion_loss(model, scheduler, x0, c, spec.label_dropout, generator)
        else:
            loss = flow_matching_loss(model, x0, c, spec.label_dropout, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        train.average_gradients(model, world_size)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses) / len(losses)


def pretrain_loop(config: dict) -> None:
    """Ray Train worker: each unit in turn; generators checkpoint every epoch, rank 0 fills the cache."""
    torch.set_num_threads(config["threads"])
    session = train.WorkerSession(config["checkpoint_every"])
    state = session.state or {"done": [], "current": None}
    for number, unit in enumerate(config["units"]):
        path = Path(unit["path"])
        if path.name in state["done"] or (path / META).exists():
            continue
        if unit["kind"] == "JudgeSpec":
            spec = JudgeSpec(**unit["spec"])
            images, labels = load_digit_images(spec.image_size)
            judges = train_judges(images, labels, seed=spec.seed, epochs=spec.epochs)
            weights, meta = {"proxy": judges.proxy.state_dict(), "gold": judges.gold.state_dict()}, {}
        else:
            spec = GeneratorSpec(**{**unit["spec"], "channels": tuple(unit["spec"]["channels"])})
            weights, meta = _train_generator(spec, session, state, number, path.name)
        if session.rank == 0:
            save_unit(path, weights, {"spec": unit["spec"], "fingerprint": path.name, **meta})
        state = {"done": state["done"] + [path.name], "current": None}
        session.report({"unit": number + 1, "epoch": 0, "loss": meta.get("losses", [0.0])[-1]}, state)
    session.report({"unit": len(config["units"]), "epoch": 0, "loss": 0.0}, state, force=True)


def _train_generator(spec: GeneratorSpec, session: train.WorkerSession, state: dict, number: int,
                     key: str) -> tuple[dict, dict]:
    images, labels = load_digit_images(spec.image_size)
    model = build_generator(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    generator = torch.Generator().manual_seed(spec.seed + 7919 * session.rank)
    resumed = state["current"] is not None and state["current"]["key"] == key
    current = state["current"] if resumed else {"key": key, "epoch": -1, "losses": []}
    if resumed:
        model.load_state_dict(current["model"])
        optimizer.load_state_dict(current["optimizer"])
        generator.set_state(current["generator"])
    for epoch in range(current["epoch"] + 1, spec.epochs):
        loss = generator_epoch(model, optimizer, spec, images, labels, generator, session.rank, session.world_size)
        current = {"key": key, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "generator": generator.get_state(), "losses": current["losses"] + [loss]}
        state["current"] = current
        session.report({"unit": number + 1, "epoch": epoch + 1, "loss": loss}, state)
        if session.rank == 0 and ((epoch + 1) % 10 == 0 or epoch + 1 == spec.epochs):
            print(f"[pretrain {key}] epoch {epoch + 1}/{spec.epochs}: loss {loss:.4f}", flush=True)
    return model.state_dict(), {"losses": current["losses"]}


def save_unit(path: Path, weights: dict, meta: dict) -> None:
    """Write ``weights.pt`` and ``meta.json`` into ``path`` atomically."""

    def write(tmp: Path) -> None:
        torch.save(weights, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta))

    atomic_dir(path, write)
