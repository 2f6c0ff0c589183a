"""Pretraining stage of the generative base: digit generators and judges, trained on Ray Train and cached.

Generators (``ClassConditionalUNet``) minimise, per mini-batch of digits x₀ with labels c dropped to
the null label with probability p (for classifier-free guidance),
    DDPM: E‖ε_θ(√ᾱ_t x₀ + √(1 − ᾱ_t) ε, t, c̃) − ε‖²
    flow: E‖v_θ((1 − σ)x₀ + σε, σT, c̃) − (ε − x₀)‖²
with Adam, a checkpoint every epoch (so an interrupted fit resumes at the next epoch) and, with
several Train workers, gradients averaged over the workers' shards. The judges (proxy CNN and
gold MLP, ``judges.train_judges``) are one more unit. Each finished unit is a fingerprint-keyed
cache entry (``pipelines.cache.CacheEntry``), ``<cache>/<kind>-<fingerprint of spec and VERSION>/``;
the cache is the run's ``<out>/generative`` unless ``cache_dir`` names a shared folder, so later
stages, reruns, Tune trials and other methods load the weights instead of training again.
"""

from __future__ import annotations

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
from pipelines.cache import CacheEntry, fingerprint
from pipelines.config import TrainConfig
from pipelines.pipeline import Stage
from pipelines.units import Unit, Work, no_steps, run_units

VERSION = 1  # bump when training code changes what a spec produces
WEIGHTS = "weights.pt"


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


class GenerativeConfig(TrainConfig):
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


def cache_entry(root: Path, spec: Spec) -> CacheEntry:
    """The cache entry of ``spec``: ``<root>/<ddpm|flow|judges>-<fingerprint of its fields and VERSION>``."""
    kind = spec.kind if isinstance(spec, GeneratorSpec) else "judges"
    return CacheEntry(Path(root), kind, {**asdict(spec), "version": VERSION})


def build_generator(spec: GeneratorSpec) -> ClassConditionalUNet:
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        return ClassConditionalUNet(sample_size=spec.image_size, block_out_channels=spec.channels,
                                    layers_per_block=spec.layers_per_block)


def load_generator(root: Path, spec: GeneratorSpec) -> ClassConditionalUNet:
    """The cached generator in eval mode, its weights frozen."""
    model = build_generator(spec)
    model.load_state_dict(torch.load(cache_entry(root, spec).path / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def load_judges(root: Path, spec: JudgeSpec) -> Judges:
    state = torch.load(cache_entry(root, spec).path / WEIGHTS, map_location="cpu", weights_only=True)
    proxy, gold = ConvClassifier(), MLPClassifier(spec.image_size)
    proxy.load_state_dict(state["proxy"])
    gold.load_state_dict(state["gold"])
    return Judges(proxy=proxy.eval().requires_grad_(False), gold=gold.eval().requires_grad_(False))


def ensure_pretrained(specs: list[Spec], cfg: TrainConfig, storage: str, root: Path,
                      log: Callable[[str], None] = print, prefix: str = "pretrain") -> None:
    """Train (one Ray Train fit) every spec that is not in the cache ``root`` yet.

    The fit is named ``<prefix>-<fingerprint of the entries>``: a rerun in the same storage resumes
    it, and concurrent Tune trials (each with its own ``prefix``) do not share a Train run.
    """
    entries = {spec: cache_entry(root, spec) for spec in specs}
    missing = [spec for spec, entry in entries.items() if not entry.ready]
    if not missing:
        return
    log(f"pretraining {', '.join(entries[s].path.name for s in missing)} on Ray Train (cache {root})")
    units = [{"kind": type(spec).__name__, "spec": asdict(spec)} for spec in entries]
    name = f"{prefix}-{fingerprint([entry.path.name for entry in entries.values()])}"
    train.fit(pretrain_loop, {"root": str(root), "units": units}, cfg, name=name, storage=storage)
    for spec in missing:
        if not entries[spec].ready:
            raise RuntimeError(f"pretraining finished without writing {entries[spec].path}")
        if isinstance(spec, GeneratorSpec):
            losses = entries[spec].meta()["losses"]
            log(f"{entries[spec].path.name}: loss {losses[0]:.4f} → {losses[-1]:.4f} over {len(losses)} epochs")


def pretrained(cfg: GenerativeConfig, stage: Stage, specs: list[Spec]) -> Path:
    """The cache folder holding ``specs``, pretraining the missing ones in a Train run named after ``stage``."""
    root = cache_root(cfg, stage.storage)
    ensure_pretrained(specs, cfg, stage.storage, root, stage.log, prefix=f"{stage.name}-pretrain")
    return root


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
    """Ray Train worker: each spec not cached yet as a unit (generators: one step per epoch; judges:
    trained whole in ``finish``); rank 0 writes each finished unit to its cache entry."""
    session = train.WorkerSession(config)

    def generator_unit(spec: GeneratorSpec, entry: CacheEntry) -> Unit:
        def start(done: dict) -> Work:
            model = build_generator(spec)
            return Work(saved=("model", "optimizer", "generator", "losses"), model=model,
                        optimizer=torch.optim.Adam(model.parameters(), lr=spec.lr),
                        generator=torch.Generator().manual_seed(spec.seed + 7919 * session.rank),
                        data=load_digit_images(spec.image_size), losses=[])

        def epoch(work: Work, index: int) -> dict:
            work.losses.append(generator_epoch(work.model, work.optimizer, spec, *work.data, work.generator,
                                               session.rank, session.world_size))
            return {"loss": work.losses[-1]}

        def cached(work: Work, done: dict) -> dict:
            if session.rank == 0:
                entry.write(lambda folder: torch.save(work.model.state_dict(), folder / WEIGHTS),
                            {"losses": work.losses})
            return {"loss": work.losses[-1]}

        return Unit(entry.path.name, spec.epochs, start, epoch, cached, step_name="epoch")

    def judges_unit(spec: JudgeSpec, entry: CacheEntry) -> Unit:
        def cached(work: Work, done: dict) -> dict:
            judges = train_judges(*load_digit_images(spec.image_size), seed=spec.seed, epochs=spec.epochs)
            if session.rank == 0:
                weights = {"proxy": judges.proxy.state_dict(), "gold": judges.gold.state_dict()}
                entry.write(lambda folder: torch.save(weights, folder / WEIGHTS))
            return {}

        return Unit(entry.path.name, 0, lambda done: Work(), no_steps, cached)

    units = []
    for unit in config["units"]:
        if unit["kind"] == "JudgeSpec":
            spec = JudgeSpec(**unit["spec"])
        else:
            spec = GeneratorSpec(**{**unit["spec"], "channels": tuple(unit["spec"]["channels"])})
        entry = cache_entry(Path(config["root"]), spec)
        if not entry.ready:
            units.append(judges_unit(spec, entry) if isinstance(spec, JudgeSpec) else generator_unit(spec, entry))
    run_units(session, units)
