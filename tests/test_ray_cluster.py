"""Real Ray processes: `ray job submit` to a head started here, and resuming a killed run."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["inits=1", "score_epochs=1", "retrain_epochs=2", "hidden=[32]", "keep_fractions=[0.5]", "arms=[el2n]"]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def env_for_subprocesses():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def run_ok(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def kill_trees(roots):
    procs = []
    for root in roots:
        try:
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def processes_mentioning(text):
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in part for part in (proc.info["cmdline"] or [])):
            found.append(proc)
    return found


def test_ray_job_submit_to_a_local_head(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="gw", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dash, client, node, objects, agent, agent_grpc, runtime, metrics = free_ports(9)
    low = 20000 + (os.getpid() % 200) * 100
    env = env_for_subprocesses()
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--num-cpus", "4", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
             "--node-manager-port", str(node), "--object-manager-port", str(objects),
             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--runtime-env-agent-port", str(runtime), "--metrics-export-port", str(metrics),
             "--min-worker-port", str(low), "--max-worker-port", str(low + 99),
             "--temp-dir", str(temp), "--disable-usage-stats"]
    out = tmp_path / "job-run"
    try:
        run_ok(start, env)
        address = f"http://127.0.0.1:{dash}"
        submission = f"gradworks-test-{os.getpid()}"
        run_ok([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                "--submission-id", submission, "--no-wait", "--", "gradworks", "run", "data_diet",
                "--set", *TINY, "--out", str(out)], env)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)

        def finished(submission_id):
            deadline = time.time() + 600
            while (status := client.get_job_status(submission_id)) not in JobStatus.__members__.values() or \
                    not status.is_terminal():
                assert time.time() < deadline, "job did not finish in time"
                time.sleep(3)
            return status

        assert finished(submission) == JobStatus.SUCCEEDED, client.get_job_logs(submission)[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["examples"] > 0 and "el2n" in metrics["test_acc"]
        assert (out / "results.parquet").exists() and (out / "config.yaml").exists()
        # a relative --out would land in the job's unpacked working dir: refused in one line
        run_ok([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                "--submission-id", f"{submission}-relative", "--no-wait", "--", "gradworks", "run", "data_diet",
                "--out", "runs/relative"], env)
        assert finished(f"{submission}-relative") == JobStatus.FAILED
        assert "--out must be an absolute path" in client.get_job_logs(f"{submission}-relative")
    finally:
        kill_trees(processes_mentioning(str(temp)))
        shutil.rmtree(temp, ignore_errors=True)
    assert not processes_mentioning(str(temp))


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "resume"
    cmd = [str(BIN / "gradworks"), "run", "data_diet", "--set", "inits=2", "score_epochs=4", "retrain_epochs=4",
           "hidden=[32]", "keep_fractions=[0.5]", "arms=[el2n]", "--out", str(out)]
    env = env_for_subprocesses()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = out / "ray" / "data_diet" / "checkpoint_manager_snapshot.json"

    def checkpoint_registered() -> bool:  # Train's record of a persisted checkpoint, not just its folder
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    try:
        deadline = time.time() + 400
        while not checkpoint_registered():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint was written"
            time.sleep(0.5)
    finally:
        kill_trees([psutil.Process(first.pid)])
    assert not (out / "metrics.json").exists()

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] is True
    first_start, resumed = metrics["train_starts"][0], metrics["train_starts"][-1]
    assert first_start == {"units_done": 0, "unit": "", "step": 0}
    assert len(metrics["train_starts"]) >= 2
    assert resumed["units_done"] > 0 or resumed["step"] > 0, metrics["train_starts"]
