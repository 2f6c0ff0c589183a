"""The console of `gradworks` processes as a user sees them: Ctrl-C before and during training, and two
runs side by side on one machine (each with its own embedded Ray)."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.console import GRADWORKS_LINE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "seeds=1", "inits=1", "score_epochs=1", "keep_fractions=[0.5]", "arms=[random]",
        "full_reference=false", "hidden=[16]"]


def gradworks(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_console_keeps_gradworks_lines_only():
    assert GRADWORKS_LINE.match("[3/12] prune/0/el2n/0.5 epoch 2/6: loss 0.4")
    assert GRADWORKS_LINE.match("[12:00:01 data_diet] noisy-label run: 6 units")
    assert not GRADWORKS_LINE.match("Progress bars disabled. To enable, set ...")
    assert not GRADWORKS_LINE.match("Requesting resources: {'CPU': 1.0} * 1")


@pytest.mark.parametrize("when", ["before training", "during training"])
def test_ctrl_c_exits_130_with_one_resume_line(tmp_path, when):
    proc = gradworks("run", "data_diet", *TINY, "retrain_epochs=400", "--out", str(tmp_path / "out"))
    started = r"\[[\d:]+ data_diet\] writing run" if when == "before training" else r"\[\d+/\d+\] \S+ epoch"
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.match(started, line):
            break
    proc.send_signal(signal.SIGINT)
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert output.rstrip().splitlines()[-1] == "gradworks: interrupted; re-run with the same --out to resume"
    assert "Traceback" not in output and "Gracefully aborting" not in output


def test_two_runs_side_by_side_finish_without_tracebacks(tmp_path):
    procs = [gradworks("run", "data_diet", *TINY, "retrain_epochs=2", "--out", str(tmp_path / name))
             for name in ("a", "b")]
    outputs = [proc.communicate(timeout=500)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
        assert "Traceback" not in output and "\x1b[" not in output
        assert "results:" in output
    for name in ("a", "b"):
        assert (tmp_path / name / "metrics.json").exists() and (tmp_path / name / "ray.log").stat().st_size > 0
