"""Shared pretraining stage: a tiny causal LM trained from a transformers config on Ray Train.

Each worker minimises the causal-LM loss on its shard of token rows x = (x_1..x_T):
    L(θ) = −(1/|M|) Σ_{t∈M} log p_θ(x_t | x_<t),   M = non-padding positions t ≥ 2,
with AdamW and gradient clipping; several workers average gradients with DDP. Every epoch
ends with a checkpoint (model, optimizer, shuffling RNG, losses), so an interrupted fit
resumes at the next epoch. The trained model and its tokenizer are cached in the run's out
dir, ``<out>/lm/<name>/``, keyed by a fingerprint of the rows and settings: later stages,
reruns and Ray Tune trials (which share the run's storage) load it instead of training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from methods.language_models.tiny_lm import Family, build_tiny_lm, train_epoch, with_causal_lm_loss
from methods.language_models.tokenizer import load_tokenizer, save_tokenizer
from pipelines import train
from pipelines.config import MethodConfig
from pipelines.results import atomic_dir, atomic_write

FINGERPRINT_FILE = "fingerprint.json"


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


def cache_dir(storage: str, name: str) -> Path:
    """``<out>/lm/<name>`` for a run whose Ray storage is ``<out>/ray``."""
    return Path(storage).parent / "lm" / name


def cached_tokenizer(storage: str, name: str, build: Callable[[], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    """Load ``<out>/lm/<name>/tokenizer`` or build it with ``build()`` and save it there."""
    path = cache_dir(storage, name) / "tokenizer"
    if (path / "tokenizer.json").exists():
        return load_tokenizer(path)
    tokenizer = build()
    atomic_dir(path, lambda tmp: save_tokenizer(tokenizer, tmp))
    return tokenizer


def fingerprint(rows: torch.Tensor, spec: LMSpec, vocab_size: int) -> str:
    digest = hashlib.sha256(rows.to(torch.int64).numpy().tobytes())
    digest.update(json.dumps({**asdict(spec), "vocab": vocab_size, "shape": list(rows.shape)}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def pretrained_lm(rows: torch.Tensor, tokenizer: PreTrainedTokenizerFast, spec: LMSpec, cfg: MethodConfig,
                  storage: str, name: str, log: Callable[[str], None] = print) -> PreTrainedModel:
    """The LM trained on ``rows`` (N, T; padded with the tokenizer's pad id), from cache if present."""
    target = cache_dir(storage, name) / "model"
    key = fingerprint(rows, spec, len(tokenizer))
    stamp = target / FINGERPRINT_FILE
    if stamp.exists() and json.loads(stamp.read_text())["fingerprint"] == key:
        log(f"loading cached LM {target}")
        return load_lm(target)
    log(f"pretraining LM '{name}' on {tuple(rows.shape)} tokens for {spec.epochs} epochs (Ray Train)")
    loop_config = {"rows": rows, "spec": asdict(spec), "vocab_size": len(tokenizer),
                   "special": _special_ids(tokenizer), "threads": max(1, int(cfg.cpus_per_worker)),
                   "checkpoint_every": cfg.checkpoint_every, "target": str(target), "fingerprint": key}
    train.fit(pretrain_loop, loop_config, cfg, name=f"pretrain-{name}-{key}", storage=storage)
    losses = json.loads(stamp.read_text())["losses"]
    log(f"LM '{name}': loss {losses[0]:.3f} → {losses[-1]:.3f}")
    return load_lm(target)


def load_lm(path: str | Path) -> PreTrainedModel:
    """A cached LM in eval mode (local files only, no progress bar)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return with_causal_lm_loss(AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval())


def pretrain_loop(config: dict) -> None:
    """Ray Train worker: epochs over this worker's equal share of the rows, a checkpoint each epoch."""
    torch.set_num_threads(config["threads"])
    spec = LMSpec(**config["spec"])
    session = train.WorkerSession(config["checkpoint_every"])
    model = _build(spec, config["vocab_size"], config["special"]).to(session.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    rows = config["rows"]
    rows = rows[: len(rows) - len(rows) % session.world_size][session.rank :: session.world_size]
    mask = (rows != config["special"]["pad_token_id"]).long()
    generator = torch.Generator().manual_seed(spec.seed + session.rank)
    state = session.state or {"epoch": -1, "losses": []}
    if session.resumed:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
    ddp = train.prepare(model)
    for epoch in range(state["epoch"] + 1, spec.epochs):
        loss = train_epoch(ddp, optimizer, rows, spec.batch_size, generator, spec.max_grad_norm, attention_mask=mask)
        state = {"epoch": epoch, "model": train.unwrap(ddp).state_dict(), "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state(), "losses": state["losses"] + [loss]}
        session.report({"epoch": epoch + 1, "loss": state["losses"][-1]}, state, force=epoch == spec.epochs - 1)
        if session.rank == 0:
            print(f"[pretrain {Path(config['target']).parent.name}] epoch {epoch + 1}/{spec.epochs}: "
                  f"loss {state['losses'][-1]:.3f}", flush=True)
    if session.rank == 0:  # the driver loads the model from the cache (Train local mode keeps no checkpoint)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = _build(spec, config["vocab_size"], config["special"])
        model.load_state_dict(state["model"])

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            (tmp / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": config["fingerprint"],
                                                            "losses": state["losses"]}))

        atomic_dir(Path(config["target"]), write)


def _build(spec: LMSpec, vocab_size: int, special: dict) -> PreTrainedModel:
    return build_tiny_lm(vocab_size, spec.family, n_layer=spec.n_layer, d_model=spec.d_model, n_head=spec.n_head,
                         max_positions=spec.max_positions, seed=spec.seed, **special)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def save_stage_result(path: str | Path, result: dict) -> None:
    """Cache a stage's result under the run's storage (atomic), for reruns to reuse."""
    atomic_write(Path(path), lambda tmp: torch.save(result, tmp))


def load_stage_result(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
