"""Method configs: pydantic models, loaded from YAML with ``--set key=value`` overrides.

Every method module defines a subclass of :class:`MethodConfig`; unknown keys, wrong types and
out-of-range values raise :class:`UserError` with a one-line message.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.errors import UserError


class MethodConfig(BaseModel):
    """Settings every pipeline shares: seeding, replicates and the accelerator."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(0, ge=0, description="base seed of the run")
    seeds: int = Field(1, ge=1, description="replicates: seeds seed, seed+1, …")
    use_gpu: bool = Field(False, description="run on GPUs (one per Ray Train worker)")

    def seed_range(self) -> range:
        """The replicate seeds: seed, seed+1, …, seed+seeds−1."""
        return range(self.seed, self.seed + self.seeds)


class TrainConfig(MethodConfig):
    """Settings of the methods that run on Ray Train: scaling and checkpoints."""

    num_workers: int = Field(1, ge=0, description="Ray Train workers (0 = Train local mode)")
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0, description="worker-group restarts before the run fails")
    checkpoint_every: int = Field(1, ge=1, description="steps (epochs, iterations, …) between mid-unit checkpoints")
    checkpoint_seconds: float = Field(10.0, ge=0, description="least wall seconds between mid-unit checkpoints "
                                      "(every finished unit is checkpointed)")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a=1", "b.c=[1, 2]"]`` -> ``{"a": 1, "b": {"c": [1, 2]}}``; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: cannot parse {raw!r} ({exc.problem})") from None
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part!r} is set to a value and used as a section")
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping safely; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def suggestion(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to ``name``, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_validation_error(exc: ValidationError, fields=()) -> str:
    """One line naming each bad field, e.g. ``keep_fractions.0: Input should be less than 1 (got 1.5)``;
    an unknown key gets the closest of ``fields`` as a suggestion."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = ("unknown key" + suggestion(str(err["loc"][-1]), fields) if err["type"] == "extra_forbidden"
               else err["msg"])
        # a cross-field check's input is the whole config: its message says what is wrong
        got = "" if err["type"] == "extra_forbidden" or not err["loc"] else f" (got {err.get('input')!r})"
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


def build_config(model: type[MethodConfig], raw: dict[str, Any], what: str = "config") -> MethodConfig:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"invalid {what}: {describe_validation_error(exc, model.model_fields)}") from None


def load_config(model: type[MethodConfig], path: str | Path | None = None,
                sets: list[str] | None = None, base: dict[str, Any] | None = None) -> MethodConfig:
    """Defaults < ``base`` (e.g. a reproduce profile) < YAML file < ``--set`` overrides."""
    raw = dict(base or {})
    if path is not None:
        raw = _merge(raw, read_yaml(path))
    raw = _merge(raw, parse_overrides(sets or []))
    return build_config(model, raw)
