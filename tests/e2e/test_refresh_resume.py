"""Refresh protocols and crash recovery, end to end through the CLI and MLflow."""

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

from _procs import private_env, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _cmd(tmp_path: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
           "--set", f"storage.path={tmp_path / 'results'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.e2e
def test_sync_refresh_activates_each_version_at_its_epoch_boundary(tmp_path):
    proc = run_cli(_cmd(tmp_path, "refresh.mode=sync", "tracking.run_name=sync"), cwd=tmp_path, env=private_env(),
                   timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])[0]
    spe = int(run.data.params["derived.steps_per_epoch"])
    activations = [v for _, v in _history(client, run.info.run_id, "refresh/activate_step")]
    assert activations == [spe, 2 * spe]  # exactly at the boundaries: the paper's protocol
    # every plan after a boundary came from the new version
    for step, version in _history(client, run.info.run_id, "graph/version"):
        if step > 0:
            assert version == (step - 1) // spe, (step, version)
    stalls = [v for _, v in _history(client, run.info.run_id, "refresh/stall_seconds")]
    work = [e + g for (_, e), (_, g) in zip(_history(client, run.info.run_id, "refresh/embed_seconds")[1:],
                                            _history(client, run.info.run_id, "refresh/graph_seconds")[1:])]
    assert len(stalls) == 2 and len(work) == 2
    # sync: the trainer waits for the whole refresh, so its stall covers the embedding and the build
    assert all(stall >= 0.95 * w for stall, w in zip(stalls, work)), (stalls, work)
    state = json.loads((tmp_path / "results" / "sync" / "sampler_state.json").read_text())
    assert [v["activate_step"] for v in state["versions"]] == [0, spe, 2 * spe]


@pytest.mark.e2e
def test_resume_after_crash_continues_on_the_persisted_graph_version(tmp_path):
    run_dir = tmp_path / "results" / "crash"
    cmd = _cmd(tmp_path, "tracking.run_name=crash", "train.epochs=4", "refresh.every_epochs=1")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=private_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "train" / "epoch_0001" / "model.pt").exists():
            assert first.poll() is None, "the first run ended before it could be interrupted"
            assert time.time() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started: a crash
        first.wait(timeout=60)
    v0_mtime = (run_dir / "graphs" / "v0000.npz").stat().st_mtime
    before = json.loads((run_dir / "sampler_state.json").read_text())["versions"]
    assert len(before) >= 2

    second = run_cli(cmd, cwd=tmp_path, env=private_env(), timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming run crash" in second.stdout
    assert (run_dir / "graphs" / "v0000.npz").stat().st_mtime == v0_mtime  # not rebuilt from scratch
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, continued
    spe = int(runs[0].data.params["derived.steps_per_epoch"])
    after = json.loads((run_dir / "sampler_state.json").read_text())["versions"]
    kept = [v for v in before if v["activate_step"] <= 2 * spe]
    assert after[:len(kept)] == kept  # the versions active at the checkpoint were reloaded
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "eval/knn_acc")} == \
        {spe * e for e in range(1, 5)}
    assert (run_dir / "train" / "epoch_0003" / "model.pt").exists()
