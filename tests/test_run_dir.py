"""The out dir: files follow the user's umask; a finished run is moved aside, never overwritten."""
import os
import stat

import pytest

from pipelines.results import RunDir


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        run_dir = RunDir(tmp_path / "out", "toy")
        run_dir.claim({"command": "run"})
        written = [run_dir.write_json("metrics.json", {"a": 1}), run_dir.write_table("t.parquet", {"x": [1, 2]}),
                   run_dir.path / "config.yaml"]
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE(run_dir.path.stat().st_mode) == dir_mode


def test_move_aside_keeps_the_earlier_run(tmp_path):
    run_dir = RunDir(tmp_path / "out", "toy")
    assert run_dir.move_aside() is None
    run_dir.claim({"command": "run"})
    run_dir.write_json("metrics.json", {"a": 1})
    moved = run_dir.move_aside()
    assert moved.name.startswith("out.previous-") and (moved / "metrics.json").exists()
    assert not run_dir.path.exists() and run_dir.claim({"command": "run"}) is False
