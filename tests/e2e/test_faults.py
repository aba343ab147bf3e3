"""The smoke run as a user runs it, and the same run through the faults of the fault matrix's second
part (README "Faults"), side by side.

Two ``hardbatch run configs/smoke.yaml`` commands start at once, each on the local Ray it starts
itself, with one config (12 epochs of 11 steps, a refresh every 3 epochs used 33 steps after its
snapshot):

* the *smoke run*, undisturbed, logging to a sqlite file: its console as a user reads it and its run
  read back from MLflow;
* the *faulted run*, logging to a real ``mlflow server`` on 127.0.0.1 (sqlite) that is stopped for 30 s
  mid-run (SIGSTOP to its processes: it takes connections but answers nothing, the harder case of a
  hung server) and continued. Its sampler actor's process dies when a plan of a given step is first
  asked for, its refresher's in the middle of a refresh (after embedding, before the graph build):
  Ray restarts both, the sampler from its state file, the refresher retrying the refresh from its
  weight snapshot.

A run's batches depend only on (seed, config) (samplers/protocol.py), so the faulted run must train
exactly as the smoke run: the same loss in every logging window, the same final metrics. The two
run at the same time: that costs less than one after the other (each leaves the CPUs idle at times),
and their equality then also shows that timing does not enter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import free_port, private_env, stop_group, wait_for
from samplers.protocol import RefreshSchedule

ROOT = Path(__file__).resolve().parents[2]
# configs/smoke.yaml on builtin:digits: 11 steps per epoch
SPE, EPOCHS = 11, 12
EVERY = 3  # epochs between refreshes
SAMPLER_FAULT_STEP = 5 * SPE + 3  # before version 1 is activated (step 66): the restarted sampler must serve it
OUTAGE_S = 30.0
# Each step of the faulted run takes at least this long (trainers.loop.PACE_ENV; a faster step sleeps the
# rest): its 132 steps then span at least 46 s, so training goes on through the outage and after it even
# on the fastest machine, while on a slow one (steps of 0.5 s and more) nothing waits. Pacing costs time
# only (the equality test below).
PACE_S = 0.35
# a refresh after every 3 epochs, used 3 epochs (configs/smoke.yaml's lag_steps: 33) later; the snapshot
# at step 99 would only be used after the last step, so it is not made
ACTIVATIONS = tuple(RefreshSchedule(SPE, EPOCHS, every_epochs=EVERY, lag_steps=33).activations())
TOLERANCE = 1e-6


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _start_mlflow(store: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
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


@dataclass
class Run:
    """One ``hardbatch run`` driver started by the fixture, and where it wrote."""

    name: str
    run_dir: Path
    db: Path  # its sqlite store (the smoke run) or the MLflow server's (the faulted run)
    out: Path
    err: Path
    proc: subprocess.Popen

    @property
    def returncode(self) -> int:
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def tail(self) -> str:
        return f"{self.name} stdout tail:\n{self.stdout[-3000:]}\nstderr tail:\n{self.stderr[-3000:]}"

    def worker_lines(self) -> list[dict]:
        return [line for line in _lines(self.run_dir / "metrics.jsonl") if line.get("src") == "worker"]


@dataclass
class Pair:
    smoke: Run
    faulted: Run
    url: str  # the faulted run's MLflow server
    markers: Path  # where the fault injections leave their marker files
    down_at: float
    up_at: float


def _start(name: str, tmp: Path, uri: str, env: dict[str, str]) -> Run:
    run = Run(name, tmp / "results" / name, tmp / "mlflow" / "mlflow.db" if uri.startswith("http") else tmp / "smoke.db",
              tmp / f"{name}.out", tmp / f"{name}.err", None)  # type: ignore[arg-type]
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
           "--set", f"storage.path={tmp / 'results'}", "--set", f"tracking.uri={uri}",
           "--set", f"tracking.run_name={name}", "--set", f"train.epochs={EPOCHS}", "--set", f"refresh.every_epochs={EVERY}"]
    with open(run.out, "w") as out, open(run.err, "w") as err:
        run.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=err, start_new_session=True)
    return run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Both runs, started together; the faulted one's MLflow server stopped for OUTAGE_S seconds once it
    trains. Yields when both have ended; the server stays up for the tests."""
    tmp = tmp_path_factory.mktemp("faults")
    store, log = tmp / "mlflow", tmp / "mlflow.log"
    store.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_mlflow(store, port, log)
    fault_env = {**private_env(), "HARDBATCH_SAMPLER_FAULT_ONCE": f"{SAMPLER_FAULT_STEP}:{tmp / 'sampler-died'}",
                 "HARDBATCH_REFRESHER_FAULT_ONCE": str(tmp / "refresher-died"), "HARDBATCH_STEP_PACE_S": str(PACE_S)}
    runs: list[Run] = []
    try:
        runs.append(_start("e2e-smoke", tmp, f"sqlite:///{tmp / 'smoke.db'}", private_env()))
        runs.append(_start("faults", tmp, url, fault_env))
        smoke, faulted = runs
        metrics = faulted.run_dir / "metrics.jsonl"
        try:
            # training is under way: stop the server for OUTAGE_S seconds, then start it again
            wait_for(lambda: any("train/loss" in line for line in _lines(metrics)), 300,
                     "the faulted run's first training window", faulted.proc)
            os.killpg(server.pid, signal.SIGSTOP)  # the server and its workers stop: requests hang, unanswered
            down_at = time.time()
            wait_for(lambda: time.time() - down_at >= OUTAGE_S, OUTAGE_S + 5, "the end of the outage", faulted.proc)
        finally:
            os.killpg(server.pid, signal.SIGCONT)
        up_at = time.time()
        for run in runs:
            try:
                run.proc.wait(timeout=max(60.0, 600 - (time.time() - down_at)))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{run.name} still running after 600 s; {run.tail()}") from None
        yield Pair(smoke, faulted, url, tmp, down_at, up_at)
    except AssertionError as err:
        raise AssertionError(f"{err}\n" + "\n".join(run.tail() for run in runs)) from None
    finally:
        for run in runs:
            if run.proc.poll() is None:
                stop_group(run.proc.pid, leader=run.proc)
        stop_group(server.pid, grace_s=2.0, leader=server)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _logged(client: MlflowClient, run_id: str, key: str) -> dict[tuple[int, int], float]:
    """``(step, timestamp) -> value``: the metrics of one ``log_batch`` share a timestamp."""
    return {(m.step, m.timestamp): m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.e2e
def test_smoke_run_logs_a_learning_run(pair):
    """The undisturbed run as a user reads it: its console and its run in MLflow."""
    assert pair.smoke.returncode == 0, pair.smoke.tail()
    stdout, db, run_dir = pair.smoke.stdout, pair.smoke.db, pair.smoke.run_dir
    assert "MLflow run id:" in stdout and "mlflow ui --backend-store-uri" in stdout

    # The console: hardbatch's own lines, no Ray or MLflow internals (README "What a run prints").
    console = stdout + pair.smoke.stderr
    for noise in ("Reporting training result", "Checkpoint successfully created", "core_worker.cc",
                  "Execution plan of Dataset", "Started a local Ray instance", "Token authentication is",
                  "INFO mlflow", "Warning:", "Traceback"):
        assert noise not in console, (noise, console[-3000:])
    forwarded = [line for line in console.splitlines()
                 if line.startswith(("(RayTrainWorker", "(GraphRefresher", "(SamplerActor", "(TrainController",
                                     "(MapWorker", "(ProgressRelay"))]
    assert not forwarded, forwarded  # what hardbatch's processes report, the driver prints
    lines = stdout.splitlines()
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
    assert {v for _, v in versions} == set(range(len(ACTIVATIONS) + 1))
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
    # after the last epoch the kept checkpoints (epochs 9..11, one more in reserve: steps from 99 on)
    # need version 2 (active from 99); the refresh caller still counts from the last snapshot it made
    # (66: the one at 99 would only be used after the last step), so version 1 (active at 66) stays
    # too; the older table went, its manifest stays (the pruning itself: tests/samplers/test_plans.py)
    assert [t.name for t in tables] == ["v0001.npz", "v0002.npz"], tables
    assert [m.name for m in manifests] == [f"v{v:04d}.json" for v in range(len(ACTIVATIONS) + 1)]
    disk = [line for line in lines if line.startswith("[hardbatch] disk: ")]
    assert len(disk) == 1 and "checkpoints" in disk[0] and "graph versions" in disk[0], disk
    assert client.get_metric_history(rid, "run/disk_bytes")[0].value > 0



@pytest.mark.e2e
def test_a_run_survives_mlflow_down_30_s_a_killed_sampler_and_a_killed_refresher(pair):
    faulted, url, down_at, up_at = pair.faulted, pair.url, pair.down_at, pair.up_at
    text = faulted.stdout + faulted.stderr
    assert faulted.returncode == 0, faulted.tail()
    assert (pair.markers / "sampler-died").exists() and (pair.markers / "refresher-died").exists()  # both really died
    # a request that hung past its timeout is reported once, and the server's return once (whether one
    # timed out depends on when the sender's requests fell in the outage)
    assert ("MLflow stopped answering" in text) == ("MLflow answers again" in text), text[-4000:]

    lines = faulted.worker_lines()
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
    everything = _lines(faulted.run_dir / "metrics.jsonl")
    for key in ("train/loss", "train/samples_per_s", "eval/knn_acc", "graph/version"):
        logged = sorted(line["step"] for line in everything if key in line)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == logged, key
    # the refresh protocol held through both restarts: every step's graph version is the schedule's
    assert ACTIVATIONS == (66, 99)
    for line in lines:
        if "graph/version" in line:
            assert line["graph/version"] == sum(a <= line["step"] - 1 for a in ACTIVATIONS), line


@pytest.mark.e2e
def test_the_faulted_run_trains_exactly_as_the_undisturbed_one(pair):
    """Same (seed, config), so the same batches, views and weights: every logging window's loss and
    every end-of-epoch metric of the faulted run equal the smoke run's (the faults cost time only)."""
    assert pair.smoke.returncode == 0 and pair.faulted.returncode == 0, pair.smoke.tail() + pair.faulted.tail()
    by_step: dict[str, dict[int, list[float]]] = {"smoke": {}, "faulted": {}}
    for name, run in (("smoke", pair.smoke), ("faulted", pair.faulted)):
        for line in run.worker_lines():
            for key, value in line.items():
                if key.startswith(("train/loss", "eval/", "sampler/hardness", "sampler/same_class_rate",
                                   "graph/version")):
                    by_step[name].setdefault(f"{key}@{line['step']}", []).append(float(value))
    smoke, faulted = by_step["smoke"], by_step["faulted"]
    assert smoke.keys() == faulted.keys(), sorted(set(smoke) ^ set(faulted))
    windows = [key for key in smoke if key.startswith("train/loss@")]
    final = [key for key in smoke if key.startswith("eval/") and key.endswith(f"@{EPOCHS * SPE}")]
    assert len(windows) >= 2 * EPOCHS and {"eval/knn_acc", "eval/linear_acc"} <= {k.split("@")[0] for k in final}
    differ = {key: (smoke[key], faulted[key]) for key in smoke
              if any(abs(a - b) > TOLERANCE * max(1.0, abs(a)) for a in smoke[key] for b in faulted[key])}
    assert not differ, differ
