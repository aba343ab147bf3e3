"""Stopping `hardbatch run configs/smoke.yaml` as a user or a scheduler does (SIGTERM), on the local
Ray it starts itself. The smoke run as a user reads it is in test_faults.py, beside the same run
through the fault matrix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import private_env, stop_group, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_sigterm_stops_the_run_in_seconds_and_marks_it_killed(tmp_path):
    """`kill <driver>` (SIGTERM, as a scheduler or `ray job stop` sends it) once training has started:
    the driver stops within seconds with the local Ray it started, the MLflow run is KILLED, not
    FAILED or FINISHED, and its name stays resumable."""
    db, run_dir = tmp_path / "mlflow.db", tmp_path / "results" / "stopped"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
           "--set", f"storage.path={tmp_path / 'results'}", "--set", f"tracking.uri=sqlite:///{db}",
           "--set", "tracking.run_name=stopped", "--set", "train.epochs=20"]
    out_file = open(tmp_path / "console.txt", "w")
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=private_env(), stdout=out_file, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "train" / "epoch_0000" / "model.pt").exists(), 300, "first checkpoint", driver)
        os.kill(driver.pid, signal.SIGTERM)  # the driver only, not its group
        sent = time.monotonic()
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the driver was still running 60 s after SIGTERM:\n"
                                 + (tmp_path / "console.txt").read_text()[-3000:]) from None
        stopped_in = time.monotonic() - sent

        def group_gone() -> bool:  # the local Ray the driver started went with it
            try:
                os.killpg(driver.pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(group_gone, 30, "the end of the driver's Ray processes")
    finally:
        stop_group(driver.pid, leader=driver)
        out_file.close()
    console = (tmp_path / "console.txt").read_text()
    assert driver.returncode == 130, console[-3000:]
    assert stopped_in < 30, (stopped_in, console[-3000:])
    assert "[hardbatch] stopped: the MLflow run is marked KILLED" in console and "Traceback" not in console
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert run.info.status == "KILLED" and run.info.run_name == "stopped"
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run.info.run_id  # the same name resumes it
    assert (run_dir / "train" / "epoch_0000" / "model.pt").exists()
