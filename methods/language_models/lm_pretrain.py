"""Shared pretraining stage: a tiny causal LM trained from a transformers config on Ray Train.

Each worker minimises the causal-LM loss on its shard of token rows x = (x_1..x_T):
    L(θ) = −(1/|M|) Σ_{t∈M} log p_θ(x_t | x_<t),   M = non-padding positions t ≥ 2,
with AdamW and gradient clipping; several workers average gradients with DDP. The fit is one
unit of the resumable runner (:mod:`pipelines.units`): an interrupted fit resumes at the epoch
after its last checkpoint. The tokenizer and the trained model are entries of the run's
fingerprint-keyed cache (:mod:`pipelines.cache`, ``<out>/cache``), keyed by the texts, rows and
settings: later stages, reruns and Ray Tune trials (which share the run's storage) load them
instead of training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from methods.language_models.tiny_lm import Family, build_tiny_lm, train_epoch, with_causal_lm_loss
from methods.language_models.tokenizer import save_tokenizer
from pipelines import train
from pipelines.cache import CacheEntry, fingerprint
from pipelines.config import TrainConfig
from pipelines.units import Unit, Work, cpu_state, run_units


@dataclass(frozen=True)
class LMSpec:
    """Architecture and optimisation of the pretraining stage."""

    family: Family = "gpt2"
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    max_positions: int = 256
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


class TinyLMConfig(TrainConfig):
    """The tiny causal LM a language-model method pretrains (``lm_spec``)."""

    lm_family: Family = "gpt2"
    lm_layers: int = Field(2, ge=1)
    lm_dim: int = Field(128, ge=16)
    lm_heads: int = Field(4, ge=1)
    pretrain_epochs: int = Field(6, ge=1)
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_batch: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _heads(self):
        if self.lm_dim % self.lm_heads:
            raise ValueError("lm_dim must be divisible by lm_heads")
        return self

    def lm_spec(self, max_positions: int) -> LMSpec:
        return LMSpec(family=self.lm_family, n_layer=self.lm_layers, d_model=self.lm_dim, n_head=self.lm_heads,
                      max_positions=max_positions, epochs=self.pretrain_epochs, lr=self.pretrain_lr,
                      batch_size=self.pretrain_batch, seed=self.seed)


def cache_root(storage: str) -> Path:
    """``<out>/cache`` for a run whose Ray storage is ``<out>/ray``."""
    return Path(storage).parent / "cache"


def cached_tokenizer(storage: str, build: Callable[..., PreTrainedTokenizerFast], texts: list[str], *args) -> Path:
    """The cache folder of the tokenizer ``build(texts, *args)``, built and saved on first use."""
    entry = CacheEntry(cache_root(storage), "tokenizer", {"build": build.__name__, "texts": fingerprint(texts),
                                                          "args": args})
    if not entry.ready:
        entry.write(lambda folder: save_tokenizer(build(texts, *args), folder))
    return entry.path


def pretrained_lm(rows: torch.Tensor, tokenizer: PreTrainedTokenizerFast, spec: LMSpec, cfg: TrainConfig,
                  storage: str, name: str, log: Callable[[str], None] = print) -> Path:
    """The cache folder of the LM trained on ``rows`` (N, T; padded with the tokenizer's pad id),
    trained on Ray Train unless the cache holds it."""
    entry = CacheEntry(cache_root(storage), name, {"lm": asdict(spec), "vocab": len(tokenizer),
                                                   "rows": fingerprint(rows)})
    if entry.ready:
        log(f"loading cached LM {entry.path}")
        return entry.path
    log(f"pretraining LM '{name}' on {tuple(rows.shape)} tokens for {spec.epochs} epochs (Ray Train)")
    loop_config = {"rows": rows, "spec": asdict(spec), "vocab_size": len(tokenizer),
                   "special": _special_ids(tokenizer), "entry": entry}
    train.fit(pretrain_loop, loop_config, cfg, name=f"pretrain-{entry.path.name}", storage=storage)
    losses = entry.meta()["losses"]
    log(f"LM '{name}': loss {losses[0]:.3f} → {losses[-1]:.3f}")
    return entry.path


def load_lm(path: str | Path) -> PreTrainedModel:
    """A cached LM in eval mode (local files only, no progress bar)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return with_causal_lm_loss(AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval())


def pretrain_loop(config: dict) -> None:
    """Ray Train worker: one unit of epochs over this worker's equal share of the rows; rank 0 then
    writes the cache entry from the finished unit (so a rerun refills a deleted entry from the checkpoint)."""
    spec, entry = LMSpec(**config["spec"]), config["entry"]
    session = train.WorkerSession(config)
    rows = config["rows"]
    rows = rows[: len(rows) - len(rows) % session.world_size][session.rank :: session.world_size]
    mask = (rows != config["special"]["pad_token_id"]).long()

    def start(done: dict) -> Work:
        model = _build(spec, config["vocab_size"], config["special"]).to(session.device)
        return Work(saved=("model", "optimizer", "generator", "losses"), model=model,
                    optimizer=torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay),
                    generator=torch.Generator().manual_seed(spec.seed + session.rank), ddp=train.prepare(model),
                    losses=[])

    def epoch(work: Work, index: int) -> dict:
        work.losses.append(train_epoch(work.ddp, work.optimizer, rows, spec.batch_size, work.generator,
                                       spec.max_grad_norm, attention_mask=mask))
        return {"loss": work.losses[-1]}

    name = f"pretrain {entry.kind}"
    done = run_units(session, [Unit(name, spec.epochs, start, epoch, lambda work, done: {
        "model": cpu_state(work.model), "losses": work.losses}, step_name="epoch")])["done"][name]
    if session.rank == 0:  # the driver loads the model from the cache (Train local mode keeps no checkpoint)
        model = _build(spec, config["vocab_size"], config["special"])
        model.load_state_dict(done["model"])
        entry.write(model.save_pretrained, {"losses": done["losses"]})


def _build(spec: LMSpec, vocab_size: int, special: dict) -> PreTrainedModel:
    return build_tiny_lm(vocab_size, spec.family, n_layer=spec.n_layer, d_model=spec.d_model, n_head=spec.n_head,
                         max_positions=spec.max_positions, seed=spec.seed, **special)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
