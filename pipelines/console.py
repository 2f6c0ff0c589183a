"""What reaches the console: gradworks' progress lines, warnings that matter and errors. Everything Ray
prints (its workers' INFO lines, resource warnings, Tune's trial tables) goes to the run's ``ray.log``;
``-v`` brings it back to the console.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path

# a unit runner's progress line ("[3/12] prune/0/el2n/0.5 epoch 2/6: …"), a run's log line
# ("[12:00:01 data_diet] …") and Python warnings raised in a method's own code
GRADWORKS_LINE = re.compile(r"^(\[\d+/\d+\] |\[\d\d:\d\d:\d\d [\w.-]+\] "
                            r"|\S*(methods|pipelines|federated)/\S+\.py:\d+: \w*Warning)")


_route: "WorkerOutput | None" = None


def log_only() -> None:
    """From now on workers' lines go to the log file only (an interrupted run's last words are gradworks')."""
    if _route is not None:
        with _route.lock:  # a line being printed finishes first
            _route.echo = False


class WorkerOutput:
    """Routes the driver's copy of Ray workers' stdout and stderr: every line to ``log_file``, gradworks'
    own lines also to the console (with no colour codes), or every line when ``verbose``."""

    def __init__(self, log_file: Path, verbose: bool):
        self.log_file, self.verbose, self.echo = log_file, verbose, True
        self.lock = threading.Lock()

    def __call__(self, data: dict) -> None:
        source = data.get("actor_name") or data.get("task_name") or data.get("pid", "")
        with self.lock, open(self.log_file, "a") as log:
            for line in data.get("lines", []):
                log.write(f"({source} pid={data.get('pid')}) {line}\n")
                if self.echo and (self.verbose or GRADWORKS_LINE.match(line)):
                    print(line if not self.verbose else f"({source}) {line}",
                          file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)


def route_ray_output(log_file: Path, verbose: bool) -> None:
    """After ``ray.init``: worker output and the driver's ``ray`` loggers go to ``log_file``, the console
    keeps gradworks' lines (all of Ray's with ``verbose``)."""
    # Ray has no public hook for the driver's printing of worker output: its dispatcher is private
    from ray._private import worker

    global _route
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _route = WorkerOutput(log_file, verbose)
    worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    worker.global_worker_stdstream_dispatcher.add_handler("ray_print_logs", _route)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    if not verbose:
        for console in ray_logger.handlers:
            if type(console) is logging.StreamHandler:
                console.setLevel(logging.ERROR)
