"""A job logging to an MLflow tracking server (sqlite backend, local artifacts) over HTTP.

The test starts `mlflow server` on 127.0.0.1 at a free port, points MLFLOW_TRACKING_URI at it, runs
`hardbatch run configs/smoke.yaml`, and reads the run back through the server's REST API; it stops
only the server it started (its process group).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import free_port, private_env, run_cli, stop_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's mlflow and hardbatch


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


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
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not come up in 120 s"
            time.sleep(1)
        yield url, server_dir
    finally:
        stop_group(server.pid, leader=server)
        server.wait(timeout=30)
        log.close()


@pytest.mark.e2e
def test_job_logs_to_mlflow_server(mlflow_server, tmp_path):
    url, server_dir = mlflow_server
    work = tmp_path / "work"
    work.mkdir()
    env = private_env()
    env["MLFLOW_TRACKING_URI"] = url
    cmd = [str(BIN / "hardbatch"), "run", str(ROOT / "configs/smoke.yaml"), "--set", "train.epochs=2",
           "--set", f"storage.path={tmp_path / 'results'}", "--set", "tracking.run_name=e2e-server"]
    proc = run_cli(cmd, cwd=work, env=env, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"--backend-store-uri {url}" in proc.stdout
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()  # nothing fell back to files

    # The run, read back over HTTP with the REST API.
    experiment = _get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=hardbatch-smoke")
    experiment_id = experiment["experiment"]["experiment_id"]
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment_id]}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read())["runs"]
    assert len(runs) == 1
    info = runs[0]["info"]
    assert info["run_name"] == "e2e-server" and info["status"] == "FINISHED"
    run_id = info["run_id"]
    history = _get_json(f"{url}/api/2.0/mlflow/metrics/get-history?"
                        + urllib.parse.urlencode({"run_id": run_id, "metric_key": "eval/knn_acc"}))
    assert len(history["metrics"]) == 2 and max(m["value"] for m in history["metrics"]) > 0.5
    latest = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert {"eval/knn_acc_k200", "eval/linear_acc", "eval/alignment", "eval/uniformity", "train/loss"} <= set(latest)
    assert 0.0 <= latest["eval/alignment"] <= 4.0 and -4.0 <= latest["eval/uniformity"] <= 0.0

    # Artifacts went through the server's proxy into its artifact store.
    client = MlflowClient(url)
    assert {"config/smoke.yaml", "config/config.resolved.yaml"} <= {a.path for a in client.list_artifacts(run_id, "config")}
    assert list((server_dir / "artifacts").rglob("config.resolved.yaml"))
