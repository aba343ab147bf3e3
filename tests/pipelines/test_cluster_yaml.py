"""cluster.yaml (and cluster-gcp.yaml) validated offline, as `ray up` would, without a cloud account.

Two checks, both from the installed ray wheel: the JSON schema ``ray/autoscaler/ray-schema.json``,
then Ray's own ``prepare_config`` (merges the provider's defaults.yaml) and ``validate_config``
(head type exists, worker counts add up, ...). Then the project's own requirements on the file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]


def _schema() -> dict:
    return json.loads(Path(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json").read_text())


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def validate_cluster_config(config: dict) -> None:
    """Raise if ``config`` fails the schema or Ray's config checks."""
    jsonschema.Draft7Validator(_schema()).validate(config)
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # private API: fall back to the two cross-field checks it adds
        types = config["available_node_types"]
        assert config["head_node_type"] in types
        assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
        return
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_schema_and_ray_checks(name):
    validate_cluster_config(_load(name))


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(max_worker=3), jsonschema.ValidationError),                           # typo
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="missing"), ValueError),
])
def test_validation_rejects_broken_variants(mutate, error):
    config = _load("cluster.yaml")
    mutate(config)
    with pytest.raises(error):
        validate_cluster_config(config)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_node_types(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1, "GPU type autoscales from 0"
    cpu_workers = [t for n, t in types.items() if n != config["head_node_type"] and "GPU" not in t["resources"]]
    assert cpu_workers and all(t["min_workers"] == 0 for t in cpu_workers)
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]) <= config["max_workers"]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_same_ray_as_client_and_project_installed(name):
    config = _load(name)
    setup = "\n".join(config["setup_commands"])
    pins = re.findall(r"ray\[[^\]]*\]==([0-9.]+)", setup)
    assert pins == [ray.__version__], f"setup_commands must pin ray=={ray.__version__}, found {pins}"
    project_pin = re.search(r"ray\[[^\]]*\]==([0-9.]+)", tomllib.loads((ROOT / "pyproject.toml").read_text())
                            ["project"]["dependencies"][0])
    assert project_pin and project_pin.group(1) == ray.__version__
    assert "pip install" in setup and "~/hardbatch" in setup
    assert config["file_mounts"]["~/hardbatch"] == "."


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_token_auth_mlflow_server_and_shared_storage(name):
    config = _load(name)
    head_start = "\n".join(config["head_start_ray_commands"])
    worker_start = "\n".join(config["worker_start_ray_commands"])
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands and "MLFLOW_TRACKING_URI=" in commands
    assert "~/.ray/auth_token" in config["file_mounts"], "every node gets the client's token"
    assert re.search(r"mlflow server .*--backend-store-uri sqlite:////\S+", head_start)
    # no open door: MLflow's basic auth, one account distributed like the token and exported for jobs
    # (tests/e2e/test_cluster.py runs these commands and logs a job through them)
    assert re.search(r"MLFLOW_AUTH_CONFIG_PATH=\S+ .*MLFLOW_AUTH_ADMIN_PASSWORD=.*MLFLOW_FLASK_SERVER_SECRET_KEY=.*"
                     r"mlflow server --app-name basic-auth --host 0.0.0.0", head_start)
    assert config["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"
    for commands in (head_start, worker_start):
        assert "MLFLOW_TRACKING_USERNAME=" in commands and "MLFLOW_TRACKING_PASSWORD=" in commands
    head_setup = "\n".join(config["head_setup_commands"])
    assert 'pip install --quiet "mlflow[auth]"' in head_setup and "authenticate_request_basic_auth" in head_setup
    bucket = re.search(r"--artifacts-destination (s3|gs)://(\S+?)/", head_start)
    assert bucket, "MLflow artifacts go to the bucket"
    assert bucket.group(2) in "\n".join(config["setup_commands"]), "the same bucket is mounted for checkpoints"
    assert "/mnt/hardbatch" in "\n".join(config["setup_commands"])
    assert {".venv", "mlflow.db", "hardbatch_results"} <= set(config["rsync_exclude"])


def test_rayignore_keeps_the_working_dir_small():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".rayignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "mlflow.db", "mlruns", "hardbatch_results", ".git"} <= ignored
