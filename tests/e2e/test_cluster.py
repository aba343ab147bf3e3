"""A job on a cluster, as the README shows it: `ray job submit --working-dir . -- hardbatch run ...`
to a real Ray head with token authentication, logging to a real `mlflow server` over HTTP.

The head is the session's (tests/conftest.py: `ray start --head` on 127.0.0.1, a token made for the
session); the MLflow server is started here on 127.0.0.1 at a free port with a sqlite backend and
proxied artifacts, and the job finds it through MLFLOW_TRACKING_URI as on a cluster node. Only the
server's own process group is stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import free_port, stop_group, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray, mlflow and hardbatch


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1; yields its URL and the server's own directory."""
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
           "--artifacts-destination", str(server_dir / "artifacts")]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, cwd=server_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: _healthy(url), 120, "healthy mlflow server", proc=server, period=1.0)
        except AssertionError as err:
            raise AssertionError(f"{err}; server log:\n{(tmp_path / 'server.log').read_text()[-3000:]}") from None
        yield url, server_dir
    finally:
        stop_group(server.pid, leader=server)
        server.wait(timeout=30)
        log.close()


def _ray(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_job_submit_with_token_auth_logs_to_an_mlflow_server(ray_head, mlflow_server, tmp_path):
    url, server_dir = mlflow_server

    # Token auth is on: the Jobs API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)

    submission_id = f"hardbatch-e2e-{os.getpid()}"
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": url}})  # as cluster.yaml sets it on nodes
    submit = _ray("job", "submit", "--address", ray_head.dashboard, "--submission-id", submission_id,
                  "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
                  "hardbatch", "run", "configs/smoke.yaml", "--set", "train.epochs=2",
                  "--set", f"storage.path={tmp_path / 'results'}", "--set", "tracking.run_name=e2e-job", timeout=540)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-5000:]
    assert "MLflow run id:" in output and f"--backend-store-uri {url}" in output

    # The uploaded working directory is the code only (.rayignore keeps .venv, results and dbs out).
    packages = [p for p in ray_head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert len(packages) == 1, packages
    files = [f for f in packages[0].rglob("*") if f.is_file()]
    assert (packages[0] / "pipelines" / "run.py").is_file() and (packages[0] / "configs" / "smoke.yaml").is_file()
    assert not (packages[0] / ".venv").exists() and not list(packages[0].rglob("mlflow.db"))
    assert sum(f.stat().st_size for f in files) < 5 * 1024 * 1024
    assert not list(packages[0].rglob("mlruns"))  # nothing fell back to a file store

    # The job's status through the Jobs REST API, this time with the token.
    request = urllib.request.Request(f"{ray_head.dashboard}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["status"] == "SUCCEEDED"

    # The run, read back over HTTP with MLflow's REST API.
    experiment = _get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=hardbatch-smoke")
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment["experiment"]["experiment_id"]]}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read())["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["e2e-job"] and runs[0]["info"]["status"] == "FINISHED"
    run_id = runs[0]["info"]["run_id"]
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    assert float(params["derived.cluster_cpus"]) == ray_head.num_cpus  # it ran on the head, not a private Ray
    history = _get_json(f"{url}/api/2.0/mlflow/metrics/get-history?"
                        + urllib.parse.urlencode({"run_id": run_id, "metric_key": "eval/knn_acc"}))
    assert len(history["metrics"]) == 2 and max(m["value"] for m in history["metrics"]) > 0.5  # chance 0.1
    latest = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert {"eval/knn_acc_k200", "eval/linear_acc", "eval/alignment", "eval/uniformity", "train/loss"} <= set(latest)
    assert 0.0 <= latest["eval/alignment"] <= 4.0 and -4.0 <= latest["eval/uniformity"] <= 0.0

    # Artifacts went through the server's proxy into its artifact store; checkpoints to storage.path.
    client = MlflowClient(url)
    assert {"config/smoke.yaml", "config/config.resolved.yaml"} <= {a.path for a in client.list_artifacts(run_id, "config")}
    assert list((server_dir / "artifacts").rglob("config.resolved.yaml"))
    assert (tmp_path / "results" / "e2e-job" / "train" / "epoch_0001" / "model.pt").exists()
