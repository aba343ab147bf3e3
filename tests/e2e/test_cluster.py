"""A job on a cluster, as the README shows it: `ray job submit --working-dir . -- hardbatch run ...`
to a real Ray head with token authentication, logging to a real `mlflow server` over HTTP.

The head is the session's (tests/conftest.py: `ray start --head` on 127.0.0.1, a token made for the
session); the MLflow server is started here on 127.0.0.1 at a free port with a sqlite backend, proxied
artifacts and MLflow's basic authentication (`--app-name basic-auth`, as cluster.yaml starts it), and
the job finds it and its credentials through MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, as on a cluster node. The job trains a bimodal loss (``BIMODAL``), so this
is also the end-to-end run of the two-tower path. Only the server's own session is stopped.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from _checks import check_training
from _procs import free_port, run_cli, stop_session, wait_for

ROOT = Path(__file__).resolve().parents[2]
# The job: a bimodal loss on the two-tower network and its pair data, 2 epochs on graph version 0 (no
# refresh during training: one after epoch 1 of 2 would land after the last step and only be waited
# for; refresh during training is test_faults.py's (async) and test_data_s3.py's (sync)). The Siamese
# losses and the soft-target classifier are the other end-to-end runs; every loss trains in-process on
# every kind of data in tests/trainers/test_tasks.py.
BIMODAL = ("--set", "loss.name=joint", "--set", "data.num_samples=2000", "--set", "train.epochs=2",
           "--set", "refresh.every_epochs=0")
BIN = Path(sys.executable).parent  # the venv's ray, mlflow and hardbatch


def _request(url: str, auth: tuple[str, str], data: dict | None = None) -> dict:
    """GET (or POST ``data``) ``url`` with HTTP basic authentication; the JSON answer."""
    token = base64.b64encode(":".join(auth).encode()).decode()
    headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _head_server_script(home: Path, port: int) -> str:
    """cluster.yaml's own commands that set up and start the head's MLflow server, made to run here:
    the head's home is ``home``, the server binds 127.0.0.1:``port`` with one worker, artifacts go to
    a local directory instead of the bucket, and the pip line (the extra is installed) is left out."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    commands = [c for c in config["head_setup_commands"] if "pip install" not in c]
    commands += [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    script = "\n".join(commands)
    for old, new in (("/home/ubuntu", str(home)), ("127.0.0.1:5000", f"127.0.0.1:{port}"),
                     ("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port} --workers 1"),
                     ("s3://hardbatch-example-bucket/mlflow-artifacts", str(home / "artifacts"))):
        assert old in script, old
        script = script.replace(old, new)
    return script


@pytest.fixture
def mlflow_server(tmp_path):
    """The head's ``mlflow server --app-name basic-auth``, started by cluster.yaml's commands on
    127.0.0.1, with the account of a ``~/.mlflow/credentials`` made here (as a user makes it before
    ``ray up``); yields its URL, the server's home and the credentials (username, password)."""
    home = tmp_path / "head"
    (home / ".mlflow").mkdir(parents=True)
    auth = ("hardbatch-admin", secrets.token_urlsafe(16))
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {auth[0]}\nmlflow_tracking_password = {auth[1]}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    # Output to a file, not a pipe: the background job (`curl ... || nohup mlflow server ... &`) keeps
    # the script's stdout open for as long as the server runs.
    script_log = tmp_path / "head-setup.log"
    with open(script_log, "w") as out:
        setup = subprocess.Popen(["bash", "-ec", _head_server_script(home, port)], cwd=home, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        setup.wait(timeout=60)  # the server itself runs on in the background
        assert setup.returncode == 0, script_log.read_text()[-3000:]
        try:
            wait_for(lambda: _healthy(url), 120, "healthy mlflow server", period=1.0)
        except AssertionError as err:
            log = home / "mlflow" / "server.log"
            raise AssertionError(f"{err}; server log:\n{log.read_text()[-3000:] if log.exists() else '-'}") from None
        yield url, home, auth
    finally:
        stop_session(setup.pid, grace_s=3.0, leader=setup)  # the server stayed in the script's session


def _ray(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_job_submit_with_token_auth_logs_to_an_mlflow_server(ray_head, mlflow_server, tmp_path, monkeypatch):
    url, server_home, auth = mlflow_server

    # Basic auth is on: the MLflow server refuses a client without credentials, and hardbatch says so
    # in one line, before any Ray starts.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert refused.value.code == 401
    no_creds = run_cli([str(BIN / "hardbatch"), "run", "configs/smoke.yaml", "--set", f"tracking.uri={url}",
                        "--set", f"storage.path={tmp_path / 'refused'}"], cwd=ROOT, timeout=120)
    assert no_creds.returncode == 2, no_creds.stdout[-2000:] + no_creds.stderr[-2000:]
    assert (f"hardbatch: config error: tracking.uri = '{url}': the MLflow server refused a request without "
            f"credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") in no_creds.stderr
    assert "Traceback" not in no_creds.stderr and not (tmp_path / "refused").exists()

    # Token auth is on: the Jobs API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)

    submission_id = f"hardbatch-e2e-{os.getpid()}"
    # as cluster.yaml exports them on every node
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": auth[0],
                                           "MLFLOW_TRACKING_PASSWORD": auth[1]}})
    submit = _ray("job", "submit", "--address", ray_head.dashboard, "--submission-id", submission_id,
                  "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
                  "hardbatch", "run", "configs/bimodal_gaussian.yaml", *BIMODAL,
                  "--set", f"storage.path={tmp_path / 'results'}", "--set", "tracking.run_name=e2e-job", timeout=540)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-5000:]
    assert "MLflow run id:" in output and f"--backend-store-uri {url}" in output

    # The uploaded working directory is the code only (.rayignore keeps .venv, results and dbs out).
    packages = [p for p in ray_head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert len(packages) == 1, packages
    files = [f for f in packages[0].rglob("*") if f.is_file()]
    assert (packages[0] / "pipelines" / "run.py").is_file() and (packages[0] / "configs" / "bimodal_gaussian.yaml").is_file()
    assert not (packages[0] / ".venv").exists() and not list(packages[0].rglob("mlflow.db"))
    assert sum(f.stat().st_size for f in files) < 5 * 1024 * 1024
    assert not list(packages[0].rglob("mlruns"))  # nothing fell back to a file store

    # The job's status through the Jobs REST API, this time with the token.
    request = urllib.request.Request(f"{ray_head.dashboard}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["status"] == "SUCCEEDED"

    # The run, read back over HTTP with MLflow's REST API and the credentials.
    experiment = _request(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=hardbatch-bimodal-gaussian", auth)
    runs = _request(f"{url}/api/2.0/mlflow/runs/search", auth,
                    {"experiment_ids": [experiment["experiment"]["experiment_id"]]})["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["e2e-job"] and runs[0]["info"]["status"] == "FINISHED"
    run_id = runs[0]["info"]["run_id"]
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    assert float(params["derived.cluster_cpus"]) == ray_head.num_cpus  # it ran on the head, not a private Ray
    # the job is the bimodal loss end to end: two towers on Gaussian pairs, their retrieval metrics
    assert params["loss.name"] == "joint" and params["derived.network_kind"] == "bimodal"
    history = _request(f"{url}/api/2.0/mlflow/metrics/get-history?"
                       + urllib.parse.urlencode({"run_id": run_id, "metric_key": "eval/retrieval_acc"}), auth)
    # one a epoch; 400 held-out candidates, so chance is 0.0025
    assert len(history["metrics"]) == 2 and max(m["value"] for m in history["metrics"]) > 0.01
    latest = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert {"eval/retrieval_acc_u", "eval/alignment", "eval/uniformity", "train/loss"} <= set(latest)
    assert 0.0 <= latest["eval/alignment"] <= 4.0 and -4.0 <= latest["eval/uniformity"] <= 0.0

    # Artifacts went through the server's proxy into its artifact store; checkpoints to storage.path.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth[1])
    client = MlflowClient(url)
    assert {"config/bimodal_gaussian.yaml", "config/config.resolved.yaml"} <= {a.path for a in client.list_artifacts(run_id, "config")}
    assert list((server_home / "artifacts").rglob("config.resolved.yaml"))
    assert (tmp_path / "results" / "e2e-job" / "train" / "epoch_0001" / "model.pt").exists()
    check_training(client, client.get_run(run_id))  # finished, a falling loss, per-rank loss flags
