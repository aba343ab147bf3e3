"""The smoke run as a user runs it, and the same run through the faults of the fault matrix (README
"Faults"), side by side.

Two ``hardbatch run configs/smoke.yaml`` commands with one config (12 epochs of 11 steps, a refresh
every 3 epochs used 33 steps after its snapshot) start at once, each on the local Ray it starts itself:

* the *smoke run*, undisturbed, logging to a sqlite file: its console as a user reads it and its run
  read back from MLflow;
* the *faulted run*, logging to a real ``mlflow server`` on 127.0.0.1 (sqlite). Four drivers run it,
  one after the other, each resuming it by its name (``tracking.run_name``):

  A. Once it trains, the server is stopped for 30 s (SIGSTOP to its processes: it takes connections
     but answers nothing, the harder case of a hung server) and continued. The sampler actor's
     process dies when a plan of step 58 is first asked for, the refresher's in the middle of the
     first refresh (after embedding, before the graph build): Ray restarts both, the sampler from its
     state file, the refresher retrying the refresh from its weight snapshot. Once all that happened
     and 6 epochs are checkpointed, the driver gets SIGTERM, as from a scheduler: it stops within
     seconds, with the local Ray it started, and marks the MLflow run KILLED.
  B. resumes; a Train worker process dies late in its first epoch (``train.max_failures=1``: Ray Train
     restarts the group from the last checkpoint); once the next checkpoint is written, the driver
     and its local Ray are killed (SIGKILL: a crash). Beside B, the same command with another
     learning rate is refused, naming the key.
  C. resumes with a file where its first checkpoint must go (storage that takes no writes; we run as
     root here, so permissions cannot make it unwritable): the run stops with one clear line and is
     marked FAILED (``train.max_failures=0``, a key a resume may change: a retry would fail the same).
  D. resumes once the file is gone, and finishes.

A run's batches depend only on (seed, config) (samplers/protocol.py), so the faulted run must train
exactly as the smoke run: the same loss in every logging window (those trained again after a restart
included), the same final metrics. The two start at the same time: that costs less than one after the
other (each leaves the CPUs idle at times), and their equality then also shows that timing does not enter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from mlflow.tracking import MlflowClient

from _procs import free_port, private_env, run_cli, session_gone, signal_session, stop_session, wait_for
from pipelines.run import last_checkpoint
from samplers.protocol import RefreshSchedule

ROOT = Path(__file__).resolve().parents[2]
# configs/smoke.yaml on builtin:digits: 11 steps per epoch
SPE, EPOCHS = 11, 12
EVERY = 3  # epochs between refreshes
SAMPLER_FAULT_STEP = 5 * SPE + 3  # before version 1 is activated (step 66): the restarted sampler must serve it
OUTAGE_S = 30.0
A_EPOCHS = 6  # driver A is stopped once this many epochs are checkpointed (and the outage is over)
# Each step of driver A takes at least this long (trainers.loop.PACE_ENV; a faster step sleeps the rest):
# its 66 steps then span at least 23 s, so training goes on through most of the outage even on the
# fastest machine, while on a slow one (steps of 0.5 s and more) nothing waits. Pacing costs time only
# (the equality test below).
PACE_S = 0.35
# a refresh after every 3 epochs, used 3 epochs (configs/smoke.yaml's lag_steps: 33) later; the snapshot
# at step 99 would only be used after the last step, so it is not made
ACTIVATIONS = tuple(RefreshSchedule(SPE, EPOCHS, every_epochs=EVERY, lag_steps=33).activations())
TOLERANCE = 1e-6
RESUMED = re.compile(r"resuming from the checkpoint of epoch (\d+): training epochs (\d+)\.\.(\d+)")


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
        stop_session(server.pid, grace_s=2.0, leader=server)
        raise AssertionError(f"{err}; server log:\n{log.read_text()[-3000:]}") from None
    return server


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _logged(client: MlflowClient, run_id: str, key: str) -> dict[tuple[int, int], float]:
    """``(step, timestamp) -> value``: the metrics of one ``log_batch`` share a timestamp."""
    return {(m.step, m.timestamp): m.value for m in client.get_metric_history(run_id, key)}


@dataclass
class Run:
    """One ``hardbatch run`` driver started by the fixture, and where it wrote."""

    name: str
    run_dir: Path
    db: Path  # its sqlite store (the smoke run) or the MLflow server's (the faulted run)
    out: Path
    err: Path
    proc: Optional[subprocess.Popen] = None

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

    def wait(self, timeout: float) -> None:
        """Wait for the driver to end; after ``timeout`` seconds stop its session and fail with its tail."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_session(self.proc.pid, leader=self.proc)
            raise AssertionError(f"{self.name} still running after {timeout:.0f} s; {self.tail()}") from None


@dataclass
class Story:
    smoke: Run
    drivers: dict[str, Run]  # the faulted run's drivers A..D, in order
    url: str  # the faulted run's MLflow server
    markers: Path  # where the fault injections leave their marker files
    down_at: float
    up_at: float
    done: int = 0  # epochs checkpointed when driver A stopped
    crashed_at: int = 0  # epochs checkpointed when driver B was killed (more than ``done``)
    stopped_in: float = 0.0  # seconds from SIGTERM to driver A's end
    term_at: float = 0.0  # when driver A got SIGTERM (time.time())
    group_gone: bool = False  # driver A's local Ray and its workers ended with it
    status: dict[str, str] = field(default_factory=dict)  # the MLflow run's status after each driver
    refused: Optional[subprocess.CompletedProcess] = None  # the resume with another learning rate
    v0_mtime: float = 0.0  # graph version 0's manifest, as driver A left it

    @property
    def faulted(self) -> Run:
        return self.drivers["D"]


def _start(name: str, tmp: Path, uri: str, env: dict[str, str], *extra: str) -> Run:
    run_name = name.split()[0]
    run = Run(name, tmp / "results" / run_name,
              tmp / "mlflow" / "mlflow.db" if uri.startswith("http") else tmp / "smoke.db",
              tmp / f"{name.replace(' ', '-')}.out", tmp / f"{name.replace(' ', '-')}.err")
    cmd = [*_command(tmp, uri, run_name), *extra]
    with open(run.out, "w") as out, open(run.err, "w") as err:
        run.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=err, start_new_session=True)
    return run


def _command(tmp: Path, uri: str, run_name: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
            "--set", f"storage.path={tmp / 'results'}", "--set", f"tracking.uri={uri}",
            "--set", f"tracking.run_name={run_name}", "--set", f"train.epochs={EPOCHS}",
            "--set", f"refresh.every_epochs={EVERY}", "--set", "train.max_failures=1"]


def _checkpointed(run_dir: Path) -> int:
    """Epochs up to the newest checkpoint Ray Train registered: the one a resume starts from."""
    latest = last_checkpoint(run_dir)
    return 0 if latest is None else int(latest.rsplit("_", 1)[1]) + 1


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Both runs, started together; the faulted one through its four drivers (module docstring). Yields
    when both have ended; the server stays up for the tests."""
    tmp = tmp_path_factory.mktemp("faults")
    store, log = tmp / "mlflow", tmp / "mlflow.log"
    store.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_mlflow(store, port, log)
    fault_env = {**private_env(), "HARDBATCH_SAMPLER_FAULT_ONCE": f"{SAMPLER_FAULT_STEP}:{tmp / 'sampler-died'}",
                 "HARDBATCH_REFRESHER_FAULT_ONCE": str(tmp / "refresher-died"), "HARDBATCH_STEP_PACE_S": str(PACE_S)}
    runs: list[Run] = []
    client = MlflowClient(url)

    def status() -> str:
        (run,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
        return run.info.status

    try:
        runs.append(_start("e2e-smoke", tmp, f"sqlite:///{tmp / 'smoke.db'}", private_env()))
        runs.append(_start("faults A", tmp, url, fault_env))
        smoke, a = runs
        run_dir = a.run_dir
        story = Story(smoke, {"A": a}, url, tmp, 0.0, 0.0)
        try:
            # training is under way: stop the server for OUTAGE_S seconds, then start it again
            wait_for(lambda: any("train/loss" in line for line in _lines(run_dir / "metrics.jsonl")), 300,
                     "driver A's first training window", a.proc)
            os.killpg(server.pid, signal.SIGSTOP)  # the server and its workers stop: requests hang, unanswered
            story.down_at = time.time()
            wait_for(lambda: time.time() - story.down_at >= OUTAGE_S, OUTAGE_S + 5, "the end of the outage", a.proc)
        finally:
            os.killpg(server.pid, signal.SIGCONT)
        story.up_at = time.time()

        # A: SIGTERM once both actors died and were restarted, and A_EPOCHS epochs are checkpointed
        wait_for(lambda: _checkpointed(run_dir) >= A_EPOCHS, 400, f"{A_EPOCHS} checkpoints of driver A", a.proc)
        assert (tmp / "sampler-died").exists() and (tmp / "refresher-died").exists(), a.tail()
        os.kill(a.proc.pid, signal.SIGTERM)  # the driver only, not its session
        sent, story.term_at = time.monotonic(), time.time()
        a.wait(60)
        story.stopped_in = time.monotonic() - sent
        story.group_gone = _wait_quietly(lambda: session_gone(a.proc.pid, a.proc), 30)
        stop_session(a.proc.pid)
        story.done, story.status["A"] = _checkpointed(run_dir), status()
        story.v0_mtime = (run_dir / "graphs" / "v0000.json").stat().st_mtime

        # B: rank 1 dies once, two steps before the end of the first epoch B trains; killed with its Ray
        # once that epoch's checkpoint is written again
        fail_step = (story.done + 1) * SPE - 2
        b = story.drivers["B"] = _start("faults B", tmp, url, {
            **private_env(), "HARDBATCH_FAULT_ONCE": f"1:{fail_step}:{tmp / 'worker-died'}"})
        runs.append(b)
        # meanwhile, a resume that would train something else is refused before Ray starts, naming what
        # changed (it reads the run's saved config and MLflow status only: B, resuming, changes neither)
        refusal = ThreadPoolExecutor(1)
        refused = refusal.submit(run_cli, [*_command(tmp, url, "faults"), "--set", "train.lr=0.01"], cwd=tmp,
                                 timeout=120)
        refusal.shutdown(wait=False)
        wait_for(lambda: (tmp / "worker-died").exists() and _checkpointed(run_dir) > story.done, 400,
                 "driver B's worker failure and its next checkpoint", b.proc, period=0.1)
        # a crash: the driver, the local Ray it started and Ray's workers (each in a process group of
        # its own) at once. The newest checkpoint is read once none of them is left: a Train controller
        # that outlived its raylet for a moment could still register one.
        signal_session(b.proc.pid, signal.SIGKILL)
        b.proc.wait(timeout=60)
        stop_session(b.proc.pid)
        assert session_gone(b.proc.pid), "driver B's processes outlived a SIGKILL"
        story.status["B"] = status()
        story.refused = refused.result()

        story.crashed_at = _checkpointed(run_dir)

        # C: the storage takes no writes where its first checkpoint goes. B may have written part of
        # that checkpoint before it was killed (never registered: C does not resume from it); the file
        # takes its place.
        blocked = run_dir / "train" / f"epoch_{story.crashed_at:04d}"
        if blocked.is_dir():
            shutil.rmtree(blocked)
        blocked.write_text("in the way")
        c = story.drivers["C"] = _start("faults C", tmp, url, private_env(), "--set", "train.max_failures=0")
        runs.append(c)
        c.wait(400)
        story.status["C"] = status()

        # D: the storage takes writes again
        blocked.unlink()
        d = story.drivers["D"] = _start("faults D", tmp, url, private_env())
        runs.append(d)
        d.wait(400)
        story.status["D"] = status()
        smoke.wait(max(60.0, 900 - (time.time() - story.down_at)))
        yield story
    except AssertionError as err:
        raise AssertionError(f"{err}\n" + "\n".join(run.tail() for run in runs)) from None
    finally:
        for run in runs:
            if run.proc.poll() is None:
                stop_session(run.proc.pid, leader=run.proc)
        stop_session(server.pid, grace_s=2.0, leader=server)


def _wait_quietly(condition, timeout: float) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds (the test says what it means)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.e2e
def test_smoke_run_logs_a_learning_run(story):
    """The undisturbed run as a user reads it: its console and its run in MLflow."""
    assert story.smoke.returncode == 0, story.smoke.tail()
    stdout, db, run_dir = story.smoke.stdout, story.smoke.db, story.smoke.run_dir
    assert "MLflow run id:" in stdout and "mlflow ui --backend-store-uri" in stdout

    # The console: hardbatch's own lines, no Ray or MLflow internals (README "What a run prints").
    console = stdout + story.smoke.stderr
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
def test_a_run_survives_mlflow_down_30_s_a_killed_sampler_and_a_killed_refresher(story):
    a, faulted, url, down_at, up_at = story.drivers["A"], story.faulted, story.url, story.down_at, story.up_at
    assert faulted.returncode == 0, faulted.tail()
    assert (story.markers / "sampler-died").exists() and (story.markers / "refresher-died").exists()  # both died
    # a request that hung past its timeout is reported once, and the server's return once (whether one
    # timed out depends on when the sender's requests fell in the outage)
    text = a.stdout + a.stderr
    assert ("MLflow stopped answering" in text) == ("MLflow answers again" in text), text[-4000:]

    lines = faulted.worker_lines()
    during = [line for line in lines if down_at * 1000 < line["time_ms"] < up_at * 1000 and "train/loss" in line]
    assert len(during) >= 5, "training did not go on while MLflow was down"
    # no step waited for MLflow: the gaps between driver A's training windows during the outage stay as
    # short as without one (all but the gap of the sampler actor's restart; A may reach its last
    # checkpoint just before the outage ends, and the window after it is then driver B's)
    windows = [line for line in lines if "train/loss" in line and line["time_ms"] <= story.term_at * 1000]
    gaps = {(a["step"], b["step"]): (b["time_ms"] - a["time_ms"]) / 1000 for a, b in zip(windows, windows[1:])
            if down_at * 1000 <= a["time_ms"] <= up_at * 1000 and not a["step"] <= SAMPLER_FAULT_STEP < b["step"]}
    stalls = {line["step"]: line["refresh/stall_seconds"] for line in lines if "refresh/stall_seconds" in line}
    assert max(gaps.values()) < 10.0, (gaps, stalls)

    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert run.info.status == "FINISHED"
    # every metric logged (by rank 0, and by the drivers), the outage's and those of the driver that was
    # killed included, reached MLflow exactly once
    everything = _lines(faulted.run_dir / "metrics.jsonl")
    for key in ("train/loss", "train/samples_per_s", "eval/knn_acc", "graph/version"):
        logged = sorted(line["step"] for line in everything if key in line)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == logged, key
    # the refresh protocol held through every restart: every step's graph version is the schedule's
    assert ACTIVATIONS == (66, 99)
    for line in lines:
        if "graph/version" in line:
            assert line["graph/version"] == sum(a <= line["step"] - 1 for a in ACTIVATIONS), line


@pytest.mark.e2e
def test_sigterm_stops_the_driver_in_seconds_and_marks_the_run_killed(story):
    """`kill <driver>` (SIGTERM, as a scheduler or `ray job stop` sends it) while it trains: the driver
    stops within seconds with the local Ray it started, the MLflow run is KILLED, not FAILED or
    FINISHED, and its name resumes it (driver B)."""
    a = story.drivers["A"]
    console = a.stdout + a.stderr
    assert a.returncode == 130, a.tail()
    assert story.stopped_in < 30 and story.group_gone, (story.stopped_in, story.group_gone, a.tail())
    assert "[hardbatch] stopped: the MLflow run is marked KILLED" in console, a.tail()
    assert not [line for line in console.splitlines() if line.startswith("Traceback")], a.tail()
    assert story.status["A"] == "KILLED" and story.done >= A_EPOCHS
    assert "resuming run faults" in story.drivers["B"].stdout


@pytest.mark.e2e
def test_the_run_resumes_after_a_crash_a_worker_failure_and_storage_that_took_no_writes(story):
    b, c, d = (story.drivers[key] for key in "BCD")
    done, run_dir = story.done, story.faulted.run_dir
    # the same name with another learning rate: refused before Ray starts, naming what changed
    refused = story.refused
    assert refused.returncode == 2 and "train.lr = 0.01 (was 0.002)" in refused.stderr, refused.stderr[-2000:]

    # B resumed where A stopped; its rank 1 died, and Ray Train restarted the group from that checkpoint
    out = b.stdout
    assert (story.markers / "worker-died").exists()  # the worker really died
    assert RESUMED.findall(out)[0] == (str(done), str(done + 1), str(EPOCHS)), out[-3000:]
    assert re.search(r"worker failure: rank 1 (WorkerHealthCheckFailedError|ActorDiedError)", out), out[-4000:]
    assert RESUMED.findall(out.split("worker failure")[1])[0][0] == str(done), out[-3000:]
    assert story.status["B"] == "RUNNING"  # killed with its Ray: nothing marked it, the resume continues it

    # C: killed B had checkpointed at least one more epoch; C resumed from the newest and could not
    # write the next
    crashed = story.crashed_at
    assert done < crashed < EPOCHS, (done, crashed)
    console = c.stdout + c.stderr
    assert c.returncode == 1, c.tail()
    assert RESUMED.findall(c.stdout) == [(str(crashed), str(crashed + 1), str(EPOCHS))], c.tail()
    said = [line for line in c.stderr.splitlines() if line.startswith("hardbatch: ")]
    assert len(said) == 1, c.tail()
    intact = run_dir / "train" / f"epoch_{crashed - 1:04d}"
    assert said[0].startswith(f"hardbatch: run faults failed: rank 0 CheckpointWriteError: cannot write the "
                              f"checkpoint of epoch {crashed + 1} (epoch_{crashed:04d}): FileExistsError:"), said
    assert said[0].endswith(f"The MLflow run is marked FAILED; the checkpoint of epoch {crashed} ({intact}) is "
                            "intact; once the storage takes writes again, the same command "
                            "(tracking.run_name=faults) resumes the run from it"), said
    # the driver prints no traceback of its own (the workers' went to the console as they failed), and
    # train.max_failures=0 ends the run at the first failure, reported once as it happened
    assert not [line for line in console.splitlines() if line.startswith("Traceback")], c.tail()
    assert console.count("[hardbatch] worker failure: rank 0 CheckpointWriteError") == 1, c.tail()
    assert story.status["C"] == "FAILED"

    # D resumed from the intact checkpoint and finished the one MLflow run
    assert d.returncode == 0, d.tail()
    assert RESUMED.findall(d.stdout) == [(str(crashed), str(crashed + 1), str(EPOCHS))], d.tail()
    assert story.status["D"] == "FINISHED"
    client = MlflowClient(story.url)
    (run,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert run.info.run_name == "faults" and json.loads((run_dir / "run.json").read_text())["run_id"] == run.info.run_id
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval/knn_acc")} == {
        SPE * e for e in range(1, EPOCHS + 1)}
    assert (run_dir / "graphs" / "v0000.json").stat().st_mtime == story.v0_mtime  # reloaded, never rebuilt
    assert sorted(p.name for p in (run_dir / "train").glob("epoch_*")) == [
        f"epoch_{e:04d}" for e in range(EPOCHS - 3, EPOCHS)]  # checkpoint.keep: 3


@pytest.mark.e2e
def test_the_faulted_run_trains_exactly_as_the_undisturbed_one(story):
    """Same (seed, config), so the same batches, views and weights: every logging window's loss and
    every end-of-epoch metric of the faulted run equal the smoke run's (the faults cost time only),
    those trained again after a restart included."""
    assert story.smoke.returncode == 0 and story.faulted.returncode == 0, story.smoke.tail() + story.faulted.tail()
    by_step: dict[str, dict[str, list[float]]] = {"smoke": {}, "faulted": {}}
    for name, run in (("smoke", story.smoke), ("faulted", story.faulted)):
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
    # the restarts made the faulted run train some windows twice: the worker failure at least one
    assert any(len(faulted[key]) > 1 for key in windows), "no logging window was trained again"
    differ = {key: (smoke[key], faulted[key]) for key in smoke
              if any(abs(a - b) > TOLERANCE * max(1.0, abs(a)) for a in smoke[key] for b in faulted[key])}
    assert not differ, differ
