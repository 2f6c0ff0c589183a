"""cluster/: the launcher YAML passes Ray's own schema check, the RayJob is complete, pins agree."""
import re
import tomllib
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
PYPROJECT = CLUSTER.parent / "pyproject.toml"


def pins():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    wanted = ("ray[", "flwr[", "torch==")
    return [d for d in deps if d.startswith(wanted)]


def test_pyproject_pins_the_stack():
    assert pins() == ["ray[default,train,tune,data]==2.55.1", "flwr[simulation]==1.42.0", "torch==2.13.0"]


def test_launcher_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_rayjob_manifest_is_complete():
    job = yaml.safe_load((CLUSTER / "rayjob-data-diet.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("gradworks ")
    assert spec["rayClusterSpec"]["rayVersion"] == "2.55.1"
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(g["template"]["spec"]["containers"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_every_cluster_file_pins_the_same_stack():
    for name in ("ray-cluster.yaml", "Dockerfile"):
        text = (CLUSTER / name).read_text()
        for pin in pins():
            assert pin in text, (name, pin)
    assert re.search(r"rayproject/ray:2\.55\.1", (CLUSTER / "Dockerfile").read_text())


def test_runtime_env_ships_code_only():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]
    assert not {"pip", "conda", "uv"} & set(env)
