"""`ray job submit --working-dir . -- hardbatch run configs/smoke.yaml` against a real Ray head.

The test starts its own head (`ray start --head`, bound to 127.0.0.1, free ports, a private temp
dir) with token authentication on and a token in a private HOME, so the user's ~/.ray and any other
Ray on the machine are left alone; it stops only the processes of that head (its process group).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import free_port, stop_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray, hardbatch and python


@pytest.fixture
def ray_head():
    """A token-authenticated Ray head on 127.0.0.1; yields (env for clients, dashboard URL, temp dir)."""
    home = Path(tempfile.mkdtemp(prefix="hbray", dir="/tmp"))  # short: Ray's unix socket paths
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_")) or k.startswith("RAY_TRAIN_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0")
    gen = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert gen.returncode == 0 and (home / ".ray" / "auth_token").is_file(), gen.stderr[-2000:]
    dashboard_port = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--num-cpus", "2", "--object-store-memory", str(512 * 1024 * 1024),
           "--temp-dir", str(home / "ray"), "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, cwd=home, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out[-3000:]
        yield env, f"http://127.0.0.1:{dashboard_port}", home / "ray"
    finally:
        if head.poll() is None:
            head.kill()
            head.wait()
        stop_group(head.pid)  # `ray start` made the group; the head's daemons stay in it
        shutil.rmtree(home, ignore_errors=True)


def _ray(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_job_submit_smoke_config_with_token_auth(ray_head, tmp_path):
    env, dashboard, ray_tmp = ray_head

    # Token auth is on: the Jobs API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)

    db = tmp_path / "mlflow.db"
    submission_id = f"hardbatch-e2e-{os.getpid()}"
    submit = _ray(env, "job", "submit", "--address", dashboard, "--submission-id", submission_id,
                  "--working-dir", ".", "--", "hardbatch", "run", "configs/smoke.yaml",
                  "--set", f"tracking.uri=sqlite:///{db}", "--set", f"storage.path={tmp_path / 'results'}",
                  "--set", "tracking.run_name=e2e-job", timeout=540)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-5000:]
    assert "MLflow run id:" in output

    # The uploaded working directory is the code only (.rayignore keeps .venv, results and dbs out).
    packages = [p for p in ray_tmp.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(packages) == 1, packages
    files = [f for f in packages[0].rglob("*") if f.is_file()]
    assert (packages[0] / "pipelines" / "run.py").is_file() and (packages[0] / "configs" / "smoke.yaml").is_file()
    assert not (packages[0] / ".venv").exists() and not list(packages[0].rglob("mlflow.db"))
    assert sum(f.stat().st_size for f in files) < 5 * 1024 * 1024

    # The job's status through the Jobs REST API, this time with the token.
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(f"{dashboard}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["status"] == "SUCCEEDED"

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert [r.info.run_name for r in runs] == ["e2e-job"] and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert float(run.data.params["derived.cluster_cpus"]) == 2.0  # it ran on this head, not a private Ray
    knn = client.get_metric_history(run.info.run_id, "eval/knn_acc")
    assert len(knn) == 3 and max(m.value for m in knn) > 0.5
    for key in ("eval/knn_acc_k200", "eval/linear_acc", "eval/alignment", "eval/uniformity"):
        assert key in run.data.metrics, key
    assert (tmp_path / "results" / "e2e-job" / "train" / "epoch_0002" / "model.pt").exists()
