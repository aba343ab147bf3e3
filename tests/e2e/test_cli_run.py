"""`hardbatch run configs/smoke.yaml` as a user runs it, on the local Ray it starts itself: its
console as a user reads it, and its run read back from MLflow."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import private_env, run_cli

ROOT = Path(__file__).resolve().parents[2]
# 6 epochs of 11 steps, an async refresh after each epoch used 33 steps later (configs/smoke.yaml's
# refresh.lag_steps): versions 1 and 2 (snapshots at 11 and 22) active from steps 44 and 55, whatever the
# timing; the later snapshots would only be used after the last step, so they are not made.
EPOCHS = 6
ACTIVATIONS = (44, 55)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _logged(client: MlflowClient, run_id: str, key: str) -> dict[tuple[int, int], float]:
    """``(step, timestamp) -> value``: the metrics of one ``log_batch`` share a timestamp."""
    return {(m.step, m.timestamp): m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.e2e
def test_smoke_run_logs_a_learning_run(tmp_path):
    db = tmp_path / "mlflow.db"
    env = private_env()
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
           "--set", f"storage.path={tmp_path / 'results'}", "--set", f"tracking.uri=sqlite:///{db}",
           "--set", "tracking.run_name=e2e-smoke", "--set", f"train.epochs={EPOCHS}"]
    proc = run_cli(cmd, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MLflow run id:" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout

    # The console: hardbatch's own lines, no Ray or MLflow internals (README "What a run prints").
    console = proc.stdout + proc.stderr
    for noise in ("Reporting training result", "Checkpoint successfully created", "core_worker.cc",
                  "Execution plan of Dataset", "Started a local Ray instance", "Token authentication is",
                  "INFO mlflow", "Warning:", "Traceback"):
        assert noise not in console, (noise, console[-3000:])
    forwarded = [line for line in console.splitlines()
                 if line.startswith(("(RayTrainWorker", "(GraphRefresher", "(SamplerActor", "(TrainController",
                                     "(MapWorker", "(ProgressRelay"))]
    assert not forwarded, forwarded  # what hardbatch's processes report, the driver prints
    lines = proc.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("[hardbatch] epoch ")]
    assert len(epochs) == EPOCHS, lines
    assert all(f"/{EPOCHS}" in line and "loss " in line and "samples/s" in line and "graph v" in line
               and "elapsed" in line for line in epochs)
    assert all("ETA" in line for line in epochs[:-1]) and "ETA" not in epochs[-1]
    assert sum(line.startswith("[hardbatch]   eval/knn_acc") for line in lines) == EPOCHS
    assert any(line.startswith("[hardbatch] graph v1 ready:") for line in lines)

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("hardbatch-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e-smoke"
    params = run.data.params
    assert params["train.epochs"] == str(EPOCHS) and params["sampler.name"] == "rwr" and params["loss.name"] == "infonce"
    assert params["derived.per_worker_batch"] == "64"

    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(loss) >= 2 * EPOCHS and loss[-1] < loss[0]
    knn = client.get_metric_history(run.info.run_id, "eval/knn_acc")
    assert len(knn) == EPOCHS and max(m.value for m in knn) > 0.5  # chance is 0.1
    assert client.get_metric_history(run.info.run_id, "train/samples_per_s")
    assert len(client.get_metric_history(run.info.run_id, "sampler/hardness")) == EPOCHS
    assert len(client.get_metric_history(run.info.run_id, "sampler/same_class_rate")) == EPOCHS
    filled = client.get_metric_history(run.info.run_id, "sampler/filled_ids")  # the walk's uniform fill
    assert len(filled) == EPOCHS and all(0 <= m.value <= 11 * 128 for m in filled)  # 11 steps of 128 ids
    assert not client.get_metric_history(run.info.run_id, "tracking/nonfinite_metrics")
    rid = run.info.run_id
    # async refresh, activation fixed in advance: the version of every step's plans is known beforehand
    # (the plan of the step before the logged one is what the window ended with)
    versions = _history(client, rid, "graph/version")
    assert versions and all(v == sum(a <= step - 1 for a in ACTIVATIONS) for step, v in versions), versions
    assert {v for _, v in versions} == {0.0, 1.0, 2.0}
    assert client.get_metric_history(rid, "graph/mean_neighbor_similarity")
    # the trainer pays for saving the weights, plus any wait at an activation step for a refresh that
    # was late; never more than the refresh itself took
    stalls, embed, build = (_logged(client, rid, key) for key in ("refresh/stall_seconds", "refresh/embed_seconds",
                                                                  "refresh/graph_seconds"))
    assert len(stalls) == len(ACTIVATIONS) and sorted(int(m.value) for m in client.get_metric_history(
        rid, "refresh/activate_step")) == list(ACTIVATIONS)
    assert all(stall <= embed[key] + build[key] + 1.0 for key, stall in stalls.items()), (stalls, embed, build)
    overlap = client.get_metric_history(rid, "refresh/neighbour_overlap")
    assert overlap and all(m.value < 1.0 for m in overlap)  # training changed the neighbours
    assert {a.path for a in client.list_artifacts(rid, "graphs")} >= {"graphs/v0000.json", "graphs/v0001.json"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/smoke.yaml", "config/config.resolved.yaml"} <= artifacts
    run_dir = tmp_path / "results" / "e2e-smoke"
    assert (run_dir / "train" / f"epoch_{EPOCHS - 1:04d}" / "model.pt").exists()

    # Retention (checkpoint.keep: 3 by default): the newest 3 checkpoints and the best encoder stay;
    # weight snapshots go once their graph is built; graph versions no kept checkpoint needs go too
    # (their manifests stay); the run reports its disk use.
    kept = sorted(p.name for p in (run_dir / "train").glob("epoch_*"))
    assert kept == [f"epoch_{e:04d}" for e in range(EPOCHS - 3, EPOCHS)], kept
    best = json.loads((run_dir / "best" / "meta.json").read_text())
    knn_by_step = {m.step: m.value for m in knn}
    assert best["metric"] == "eval/knn_acc" and best["value"] == max(knn_by_step.values())
    assert knn_by_step[best["step"]] == best["value"] and (run_dir / "best" / "model.pt").exists()
    assert not list((run_dir / "snapshots").glob("step_*/model.pt"))
    tables, manifests = sorted(run_dir.glob("graphs/v*.npz")), sorted(run_dir.glob("graphs/v*.json"))
    state = json.loads((run_dir / "sampler_state.json").read_text())["versions"]
    assert [Path(v["path"]).name for v in state] == [t.name for t in tables]  # what is on disk is what is used
    # after the last epoch the kept checkpoints (epochs 3..5, one more in reserve: steps from 33 on) need
    # versions 0 (active up to step 43), 1 and 2: none is old enough to go (the pruning itself is checked
    # in test_refresh_resume.py and tests/samplers/test_plans.py)
    assert [t.name for t in tables] == ["v0000.npz", "v0001.npz", "v0002.npz"], tables
    assert [m.name for m in manifests] == [f"v{v:04d}.json" for v in range(3)]
    disk = [line for line in lines if line.startswith("[hardbatch] disk: ")]
    assert len(disk) == 1 and "checkpoints" in disk[0] and "graph versions" in disk[0], disk
    assert client.get_metric_history(rid, "run/disk_bytes")[0].value > 0


@pytest.mark.e2e
def test_sigterm_stops_the_run_in_seconds_and_marks_it_killed(tmp_path):
    """`kill <driver>` (SIGTERM, as a scheduler or `ray job stop` sends it) once training has started:
    the driver stops within seconds with the local Ray it started, the MLflow run is KILLED, not
    FAILED or FINISHED, and its name stays resumable."""
    import os
    import signal
    import subprocess

    from _procs import stop_group, wait_for

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
