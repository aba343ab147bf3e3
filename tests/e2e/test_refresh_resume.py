"""Crash recovery and the synchronous refresh protocol, end to end through the CLI and MLflow.

One job in `refresh.mode: sync` (every graph version active exactly at its epoch boundary, so what
was persisted when is deterministic): the driver and the local Ray it started are killed after the
second checkpoint; the same command resumes it; during the resumed run a Train worker process dies
once (`train.max_failures` lets Ray Train restart the group from the last checkpoint). The run must
finish as one MLflow run, on the persisted graph versions, with the console saying what happened,
and train exactly as the same command run without a fault beside it (another run name, its own Ray
and MLflow store): every logging window's loss, replays included, and every final metric.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import private_env, run_cli, stop_group, wait_for

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _logged(client: MlflowClient, run_id: str, key: str) -> dict[tuple[int, int], float]:
    """``(step, timestamp) -> value``: the metrics of one ``log_batch`` share a timestamp."""
    return {(m.step, m.timestamp): m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.e2e
def test_sync_refresh_survives_a_driver_crash_and_a_worker_failure(tmp_path, request):
    run_dir = tmp_path / "results" / "crash"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
           "--set", f"storage.path={tmp_path / 'results'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
           "--set", "tracking.run_name=crash", "--set", f"train.epochs={EPOCHS}", "--set", "refresh.every_epochs=1",
           "--set", "refresh.mode=sync", "--set", "train.max_failures=1", "--set", "checkpoint.keep=2",
           "--set", "loss.name=sscl"]  # SSCL draws synthetic negatives: a random stream the replay must repeat
    # the same run without faults, at the same time: the baseline of exact resume
    straight_cmd = [*cmd, "--set", "tracking.run_name=straight", "--set",
                    f"tracking.uri=sqlite:///{tmp_path / 'straight.db'}"]
    straight_out = open(tmp_path / "straight.txt", "w")
    straight = subprocess.Popen(straight_cmd, cwd=tmp_path, env=private_env(), stdout=straight_out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    request.addfinalizer(lambda: straight.poll() is not None or stop_group(straight.pid, leader=straight))
    first = subprocess.Popen(cmd, cwd=tmp_path, env=private_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "train" / "epoch_0001" / "model.pt").exists(), 300, "second checkpoint", first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started: a crash
        first.wait(timeout=60)
        stop_group(first.pid)
    v0_mtime = (run_dir / "graphs" / "v0000.json").stat().st_mtime  # the manifest outlives the pruned table
    before = json.loads((run_dir / "sampler_state.json").read_text())["versions"]
    # sync: version e is active from the boundary after epoch e - 1; the boundary refresh after
    # epoch 1 ran before that epoch's checkpoint, so v0..v2 were persisted by then
    assert [v["version"] for v in before[:3]] == [0, 1, 2]

    # a resume that would train something else is refused before Ray starts, naming what changed
    changed = run_cli([*cmd, "--set", "train.lr=0.01"], cwd=tmp_path, timeout=120)
    assert changed.returncode == 2 and "train.lr = 0.01 (was 0.002)" in changed.stderr, changed.stderr[-2000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    spe = int(run.data.params["derived.steps_per_epoch"])
    # rank 1 dies once, late in the last epoch of the resumed run
    env = {**private_env(), "HARDBATCH_FAULT_ONCE": f"1:{4 * spe - 2}:{tmp_path / 'worker-died'}"}
    second = run_cli(cmd, cwd=tmp_path, env=env, timeout=600)
    try:
        straight.wait(timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run without faults still runs: " + (tmp_path / "straight.txt").read_text()[-3000:])
    straight_out.close()
    assert straight.returncode == 0, (tmp_path / "straight.txt").read_text()[-3000:]
    out = second.stdout
    assert second.returncode == 0, out[-3000:] + second.stderr[-3000:]
    assert (tmp_path / "worker-died").exists()  # the worker really died
    assert "resuming run crash" in out
    assert "resuming from the checkpoint of epoch 2: training epochs 3..4" in out  # the driver's resume
    # the failure and its cause (the dead process first) are shown...
    assert re.search(r"worker failure: rank 1 (WorkerHealthCheckFailedError|ActorDiedError)", out), out[-4000:]
    # ...and the restart, from the newest checkpoint the Train controller had registered: epoch 3's,
    # or epoch 2's when the failure came before the controller took in epoch 3's report
    assert re.search(r"resuming from the checkpoint of epoch [23]: training epochs [34]\.\.4", out.split("worker failure")[1])
    assert (run_dir / "graphs" / "v0000.json").stat().st_mtime == v0_mtime  # not rebuilt from scratch

    runs = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, continued
    rid = runs[0].info.run_id
    # checkpoint.keep=2: after the last epoch (3) the checkpoints of epochs 2 and 3 stay, and the plans
    # from step 2 spe on (one checkpoint in reserve) need versions 2 and the one made at 3 spe only
    after = json.loads((run_dir / "sampler_state.json").read_text())["versions"]
    assert after[0] == before[2]  # reloaded from the first run, never rebuilt
    assert [v["activate_step"] for v in after] == [2 * spe, 3 * spe]  # exactly at the boundaries
    assert sorted(p.name for p in (run_dir / "graphs").glob("v*.npz")) == [Path(v["path"]).name for v in after]
    assert len(list((run_dir / "graphs").glob("v*.json"))) >= 4  # every manifest stays
    assert sorted(p.name for p in (run_dir / "train").glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    assert {m.step for m in client.get_metric_history(rid, "eval/knn_acc")} == {spe * e for e in range(1, EPOCHS + 1)}
    # every plan after a boundary came from the new version (steps up to 3 spe: versions 0..2,
    # numbered the same by every attempt)
    for step, version in _history(client, rid, "graph/version"):
        if 0 < step <= 3 * spe:
            assert version == (step - 1) // spe, (step, version)
    # sync: the trainer waits for the whole refresh, so its stall covers the embedding and the build
    stalls = _logged(client, rid, "refresh/stall_seconds")
    embed, build = _logged(client, rid, "refresh/embed_seconds"), _logged(client, rid, "refresh/graph_seconds")
    assert len(stalls) >= 3 and all(stall >= 0.95 * (embed[key] + build[key]) for key, stall in stalls.items())
    assert (run_dir / "train" / f"epoch_{EPOCHS - 1:04d}" / "model.pt").exists()
    # exact resume: the steps replayed after the worker failure (at least the windows of the last epoch
    # logged before rank 1 died at step 4 spe - 2) trained on the same batches, views and synthetic
    # negatives from the same weights, so each such window's loss is logged twice with the same value
    losses: dict[int, list[float]] = {}
    for step, value in _history(client, rid, "train/loss"):
        losses.setdefault(step, []).append(value)
    replayed = {step: values for step, values in losses.items() if len(values) > 1}
    every = 4  # configs/smoke.yaml: train.log_every_steps
    before_failure = {s for s in range(3 * spe + 1, 4 * spe - 1) if s % every == 0}
    assert before_failure and before_failure <= set(replayed), (sorted(before_failure), sorted(replayed))
    for step, values in replayed.items():
        assert max(values) - min(values) <= 1e-6 * max(1.0, abs(values[0])), (step, values)

    # exact resume against the run that never failed: the same loss in every window (those logged twice
    # included) and the same final metrics
    base_client = MlflowClient(f"sqlite:///{tmp_path / 'straight.db'}")
    (base,) = base_client.search_runs([base_client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    base_losses = dict(_history(base_client, base.info.run_id, "train/loss"))
    assert sorted(losses) == sorted(base_losses)
    for step, values in losses.items():
        assert all(abs(v - base_losses[step]) <= 1e-6 * max(1.0, abs(v)) for v in values), (step, values,
                                                                                           base_losses[step])
    final = {k: v for k, v in client.get_run(rid).data.metrics.items() if k.startswith("eval/")}
    base_final = {k: v for k, v in base.data.metrics.items() if k.startswith("eval/")}
    assert {"eval/knn_acc", "eval/linear_acc"} <= set(final) and final.keys() == base_final.keys()
    assert all(abs(final[k] - base_final[k]) <= 1e-6 * max(1.0, abs(final[k])) for k in final), (final, base_final)
