"""The fingerprint-keyed cache: stable keys, atomic entries."""
import numpy as np
import torch

from pipelines.cache import CacheEntry, fingerprint


def test_fingerprints_are_stable_and_follow_every_value():
    spec = {"epochs": 3, "channels": (32, 64), "rows": torch.arange(6).view(2, 3)}
    assert fingerprint(spec) == fingerprint({"rows": torch.arange(6).view(2, 3), "channels": [32, 64], "epochs": 3})
    assert fingerprint(spec) != fingerprint({**spec, "epochs": 4})
    assert fingerprint(spec) != fingerprint({**spec, "rows": torch.arange(6).view(3, 2)})
    assert fingerprint(spec) != fingerprint({**spec, "rows": torch.tensor([[0, 1, 2], [3, 4, 6]])})
    assert fingerprint({"x": np.zeros(3, np.float32)}) != fingerprint({"x": np.zeros(3, np.float64)})


def test_an_entry_is_ready_only_once_written_whole(tmp_path):
    entry = CacheEntry(tmp_path, "lm", {"epochs": 3})
    assert not entry.ready and entry.path.name.startswith("lm-")

    def fail(folder):
        (folder / "weights.pt").write_text("half")
        raise RuntimeError("interrupted")

    try:
        entry.write(fail)
    except RuntimeError:
        pass
    assert not entry.path.exists() and list(tmp_path.iterdir()) == []
    entry.write(lambda folder: (folder / "weights.pt").write_text("whole"), meta={"losses": [2.0, 1.0]})
    assert entry.ready and (entry.path / "weights.pt").read_text() == "whole"
    assert entry.meta() == {"spec": {"epochs": 3}, "losses": [2.0, 1.0]}
    assert not CacheEntry(tmp_path, "lm", {"epochs": 4}).ready
