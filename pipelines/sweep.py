"""Ray Tune sweeps: a search space from ``tune_spaces/<id>.yaml`` driving a method's Train trials.

Space file format::

    metric: val_acc            # optional; defaults to the pipeline's sweep_metric / sweep_mode
    mode: max
    scheduler: {type: asha, time_attr: training_iteration, max_t: 20, grace_period: 2}
    params:
      lr: {loguniform: [0.01, 0.3]}
      keep_fractions: {choice: [[0.5], [0.7]]}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import MethodConfig, build_config, read_yaml
from pipelines.errors import UserError

SAMPLERS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "lograndint": 2,
            "choice": 1, "grid_search": 1, "randn": 2}


def default_space_path(method_id: str) -> Path:
    return Path(__file__).resolve().parent.parent / "tune_spaces" / f"{method_id}.yaml"


def parse_space(spec: dict[str, Any], config_model: type[MethodConfig], source: str) -> dict[str, Any]:
    """``{name: {sampler: args}}`` -> ``{name: ray.tune sampler}``; names must be config keys."""
    from ray import tune

    params = spec.get("params")
    if not isinstance(params, dict) or not params:
        raise UserError(f"{source}: 'params' must map config keys to samplers")
    space = {}
    for name, sampler in params.items():
        if name not in config_model.model_fields:
            raise UserError(f"{source}: {name!r} is not a setting of {config_model.__name__}")
        if not (isinstance(sampler, dict) and len(sampler) == 1 and next(iter(sampler)) in SAMPLERS):
            raise UserError(f"{source}: {name}: expected one of {sorted(SAMPLERS)} with its arguments")
        kind, args = next(iter(sampler.items()))
        if kind in ("choice", "grid_search"):
            if not isinstance(args, list) or not args:
                raise UserError(f"{source}: {name}: {kind} takes a non-empty list")
            space[name] = getattr(tune, kind)(args)
        else:
            if not isinstance(args, list) or len(args) != SAMPLERS[kind]:
                raise UserError(f"{source}: {name}: {kind} takes {SAMPLERS[kind]} numbers")
            space[name] = getattr(tune, kind)(*args)
    return space


def sample_configs(space: dict[str, Any], base: dict[str, Any], config_model: type[MethodConfig],
                   n: int, seed: int = 0) -> list[MethodConfig]:
    """Draw ``n`` points of the space onto ``base`` and validate each (used to check space files)."""
    rng = np.random.default_rng(seed)
    configs = []
    for _ in range(n):
        point = dict(base)
        for name, domain in space.items():
            if isinstance(domain, dict) and "grid_search" in domain:
                values = domain["grid_search"]
                point[name] = values[int(rng.integers(len(values)))]
            else:
                point[name] = domain.sample(random_state=rng)
        configs.append(build_config(config_model, point, what="sampled config"))
    return configs


def _scheduler(spec: dict[str, Any], source: str):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = dict(spec or {"type": "asha"})
    kind = spec.pop("type", "asha")
    if kind == "fifo":
        return FIFOScheduler()
    if kind != "asha":
        raise UserError(f"{source}: scheduler type must be asha or fifo, got {kind!r}")
    try:
        return ASHAScheduler(**spec)
    except TypeError as exc:
        raise UserError(f"{source}: scheduler: {exc}") from None


def run_sweep(pipeline, cfg: MethodConfig, run_dir, *, space_path: Path, samples: int,
              verbose: bool = False) -> dict[str, Any]:
    """Tune the pipeline's trial over the space; write ``sweep.parquet`` and ``best.json``. Tune's trial
    tables are shown only when ``verbose`` (the trials' progress lines always are)."""
    from ray import tune

    if pipeline.trial is None:
        raise UserError(f"{run_dir.method_id} has no sweep trial")
    source = str(space_path)
    spec = read_yaml(space_path)
    space = parse_space(spec, type(cfg), source)
    metric = spec.get("metric", pipeline.sweep_metric)
    mode = spec.get("mode", pipeline.sweep_mode)
    if mode not in ("min", "max"):
        raise UserError(f"{source}: mode must be min or max")
    sample_configs(space, cfg.model_dump(), type(cfg), 2)  # fail fast on values the config rejects

    from pipelines import pipeline as spine

    trainable = tune.with_parameters(spine.trial, pipeline=pipeline, storage=run_dir.storage)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.1}),
        param_space={**cfg.model_dump(), **space},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=samples,
                                    max_concurrent_trials=pipeline.max_concurrent_trials,
                                    scheduler=_scheduler(spec.get("scheduler"), source)),
        run_config=tune.RunConfig(name="sweep", storage_path=run_dir.storage, verbose=1 if verbose else 0),
    )
    grid = tuner.fit()
    frame = grid.get_dataframe()
    columns = {}
    for name in frame.columns:
        values = frame[name].to_list()
        if all(isinstance(v, (int, float, str, bool, np.integer, np.floating)) for v in values):
            columns[name] = values
        else:
            columns[name] = [repr(v) for v in values]
    run_dir.write_table("sweep.parquet", columns)
    best = grid.get_best_result(metric=metric, mode=mode)
    summary = {"metric": metric, "mode": mode, "value": best.metrics.get(metric),
               "config": {k: best.config[k] for k in space}, "trials": len(frame),
               "errors": grid.num_errors, "path": best.path}
    run_dir.write_json("best.json", summary)
    return summary
