"""Connecting to Ray: an embedded local instance by default, or a running cluster."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from pipelines.errors import UserError

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Train V2 workers block on each report until the controller polls (default every 2 s);
    # a checkpoint every epoch needs a faster poll, as Ray's own Train tests use.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # the future default (no override of CUDA_VISIBLE_DEVICES for num_gpus=0), without its FutureWarning
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray Data's per-dataset INFO lines go to its log file only
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
}


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``, as inside ``ray job submit``); else start local Ray.

    A local instance binds its dashboard (which also serves the State API that Train's placement-group
    cleaner polls) to 127.0.0.1 and never attaches to a stale cluster (``address="local"``). Does
    nothing when Ray is already initialised in this process.
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise UserError(f"--address takes a Ray cluster address (HOST:6379, ray://HOST:10001 or auto), "
                        f"not the jobs URL {address!r}; use that one with `ray job submit`")
    if address:
        ray.init(address=address)
    else:
        # Train's placement-group cleaner asks the State API for its controller; without an address it
        # looks for "the" local instance and fails when another gradworks run has one too
        port = _free_port()
        # logical CPUs are scheduling tokens: at least 4, so a Tune driver, Train workers and
        # Ray Data tasks can be placed together on a small machine
        local = dict(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 4),
                     dashboard_host="127.0.0.1", dashboard_port=port, object_store_memory=512 * 1024**2,
                     logging_level=logging.WARNING,  # Ray's start-up lines stay off the console
                     runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        try:
            ray.init(include_dashboard=True, **local)
        except Exception:  # the dashboard can fail to start on a loaded machine: run without it
            ray.shutdown()
            ray.init(include_dashboard=False, **local)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
