"""The fault matrix, part two (README "Faults"): one async run that loses its MLflow server for 30 s,
its sampler actor and its graph refresher, and finishes as if nothing had happened.

The MLflow server is a real ``mlflow server`` on 127.0.0.1 (sqlite), stopped mid-run (SIGSTOP to its
processes: it takes connections but answers nothing, the harder case of a hung server) and continued
30 s later. The sampler actor's process dies when a plan of a given
step is first asked for, the refresher's in the middle of a refresh (after embedding, before the
graph build): Ray restarts both, the sampler from its state file, the refresher retrying the refresh
from its weight snapshot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import free_port, private_env, stop_group, wait_for
from samplers.protocol import RefreshSchedule

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# configs/smoke.yaml on builtin:digits: 11 steps per epoch of 1.5-3 s here, so 27 epochs outlast the outage
SPE, EPOCHS = 11, 27
SAMPLER_FAULT_STEP = 12 * SPE + 3
OUTAGE_S = 30.0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _start_mlflow(store: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--default-artifact-root", (store / "artifacts").as_uri(), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log, "a") as out:
        server = subprocess.Popen(cmd, cwd=store, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}"), 120, "healthy mlflow server", server, period=0.5)
    except AssertionError as err:
        stop_group(server.pid, grace_s=2.0, leader=server)
        raise AssertionError(f"{err}; server log:\n{log.read_text()[-3000:]}") from None
    return server


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.e2e
def test_a_run_survives_mlflow_down_30_s_a_killed_sampler_and_a_killed_refresher(tmp_path):
    store, log = tmp_path / "mlflow", tmp_path / "mlflow.log"
    store.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_mlflow(store, port, log)
    run_dir = tmp_path / "results" / "faults"
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
           "--set", f"storage.path={tmp_path / 'results'}", "--set", f"tracking.uri={url}",
           "--set", "tracking.run_name=faults", "--set", f"train.epochs={EPOCHS}", "--set", "refresh.every_epochs=3"]
    env = {**private_env(), "HARDBATCH_SAMPLER_FAULT_ONCE": f"{SAMPLER_FAULT_STEP}:{tmp_path / 'sampler-died'}",
           "HARDBATCH_REFRESHER_FAULT_ONCE": str(tmp_path / "refresher-died")}
    console = tmp_path / "console.txt"
    with open(console, "w") as out:
        driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        # training is under way: stop the server for OUTAGE_S seconds, then start it again
        wait_for(lambda: any("train/loss" in line for line in _lines(metrics)), 300, "the first training window",
                 driver)
        os.killpg(server.pid, signal.SIGSTOP)  # the server and its workers stop: requests hang, unanswered
        down_at = time.time()
        wait_for(lambda: time.time() - down_at >= OUTAGE_S, OUTAGE_S + 5, "the end of the outage", driver)
        os.killpg(server.pid, signal.SIGCONT)
        up_at = time.time()
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            stop_group(driver.pid, leader=driver)
        text = console.read_text()
    try:
        assert driver.returncode == 0, text[-4000:]
        assert (tmp_path / "sampler-died").exists() and (tmp_path / "refresher-died").exists()  # both really died
        # a request that hung past its timeout is reported once, and the server's return once (whether one
        # timed out depends on when the sender's requests fell in the outage)
        assert ("MLflow stopped answering" in text) == ("MLflow answers again" in text), text[-4000:]

        lines = [line for line in _lines(metrics) if line.get("src") == "worker"]
        during = [line for line in lines if down_at * 1000 < line["time_ms"] < up_at * 1000 and "train/loss" in line]
        assert len(during) >= 5, "training did not go on while MLflow was down"
        assert max(line["time_ms"] for line in lines) > up_at * 1000  # and went on after it came back
        # no step waited for MLflow: the gaps between training windows during the outage stay as short as
        # without one (all but the gap of the sampler actor's restart)
        windows = [line for line in lines if "train/loss" in line]
        gaps = {(a["step"], b["step"]): (b["time_ms"] - a["time_ms"]) / 1000 for a, b in zip(windows, windows[1:])
                if down_at * 1000 <= a["time_ms"] <= up_at * 1000 and not a["step"] <= SAMPLER_FAULT_STEP < b["step"]}
        stalls = {line["step"]: line["refresh/stall_seconds"] for line in lines if "refresh/stall_seconds" in line}
        assert max(gaps.values()) < 10.0, (gaps, stalls)

        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
        assert run.info.status == "FINISHED"
        # every metric logged (by rank 0, and by the driver before and after), the outage's included,
        # reached MLflow exactly once
        for key in ("train/loss", "train/samples_per_s", "eval/knn_acc", "graph/version"):
            logged = sorted(line["step"] for line in _lines(metrics) if key in line)
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == logged, key
        # the refresh protocol held through both restarts: every step's graph version is the schedule's
        # (a refresh after every 3 epochs, used 3 epochs later)
        activations = RefreshSchedule(SPE, EPOCHS, every_epochs=3).activations()
        assert activations == [66, 99, 132, 165, 198, 231, 264]
        for line in lines:
            if "graph/version" in line:
                assert line["graph/version"] == sum(a <= line["step"] - 1 for a in activations), line
    finally:
        stop_group(server.pid, grace_s=2.0, leader=server)
