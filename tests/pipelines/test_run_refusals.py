"""`hardbatch run` refuses what it can check before Ray starts: an unusable storage path, and the
name of a run that already finished (re-running a name otherwise resumes that run)."""

from __future__ import annotations

import json
import subprocess
import sys

from mlflow.tracking import MlflowClient

PROBE = """
import sys, ray
from pipelines.cli import main
rc = main(sys.argv[1:])
print(f"rc={rc} ray_started={ray.is_initialized()}")
"""


def _run(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    args = ["run", "configs/smoke.yaml", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", *overrides]
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)


def test_unusable_storage_path_is_a_config_error_before_ray(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _run(tmp_path, "--set", f"storage.path={blocker}")
    assert proc.stdout.strip().endswith("rc=2 ray_started=False"), proc.stdout + proc.stderr
    assert f"hardbatch: config error: storage.path = '{blocker}': cannot create" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_finished_run_name_is_refused_before_ray(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("hardbatch-smoke"), run_name="done")
    client.set_terminated(run.info.run_id, status="FINISHED")
    run_dir = tmp_path / "results" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
    proc = _run(tmp_path, "--set", f"storage.path={tmp_path / 'results'}", "--set", "tracking.run_name=done")
    assert proc.stdout.strip().endswith("rc=2 ray_started=False"), proc.stdout + proc.stderr
    assert "tracking.run_name = 'done': that run already finished" in proc.stderr
