"""The fault matrix: storage that cannot take a checkpoint (README "Faults").

The run's checkpoint directory for epoch 2 cannot be created because a file is in its place (we run
as root here, so permissions cannot make storage unwritable; a full disk fails the same call, Ray
Train's ``create_dir``/copy of the checkpoint, with another errno). The run must stop with one clear
paragraph (the checkpoint it could not write, the one that is intact, how to resume), its MLflow run
FAILED; once the path is writable again the same command resumes from the intact checkpoint and
finishes the same MLflow run. Both commands join the session's Ray head.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import head_env, run_cli

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3


@pytest.mark.e2e
def test_a_checkpoint_that_cannot_be_written_stops_the_run_clearly_and_it_resumes(ray_head, tmp_path):
    db, run_dir = tmp_path / "mlflow.db", tmp_path / "results" / "storage"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
           "--set", f"storage.path={tmp_path / 'results'}", "--set", f"tracking.uri=sqlite:///{db}",
           "--set", "tracking.run_name=storage", "--set", f"train.epochs={EPOCHS}", "--set", "refresh.every_epochs=0",
           "--set", "train.max_failures=0"]  # a retry would fail the same way (the file stays in the way)
    blocked = run_dir / "train" / "epoch_0001"  # where the checkpoint of epoch 2 goes
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")

    first = run_cli(cmd, cwd=tmp_path, env=head_env(ray_head), timeout=600)
    console = first.stdout + first.stderr
    assert first.returncode == 1, console[-4000:]
    intact = run_dir / "train" / "epoch_0000"
    said = [line for line in first.stderr.splitlines() if line.startswith("hardbatch: ")]
    assert len(said) == 1, console[-4000:]
    assert said[0].startswith("hardbatch: run storage failed: rank 0 CheckpointWriteError: cannot write the checkpoint "
                              "of epoch 2 (epoch_0001): FileExistsError:"), said
    assert said[0].endswith(f"The MLflow run is marked FAILED; the checkpoint of epoch 1 ({intact}) is intact; once "
                            "the storage takes writes again, the same command (tracking.run_name=storage) resumes "
                            "the run from it"), said
    # the driver prints no traceback of its own (the workers' went to the console as they failed)
    assert not [line for line in console.splitlines() if line.startswith("Traceback")], console[-4000:]
    # train.max_failures=0: the first failure ends the run, reported once as it happened
    assert console.count("[hardbatch] worker failure: rank 0 CheckpointWriteError") == 1, console[-4000:]
    assert json.loads((intact / "meta.json").read_text())["epoch"] == 0 and (intact / "model.pt").exists()
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "storage"

    blocked.unlink()  # the storage takes writes again
    second = run_cli(cmd, cwd=tmp_path, env=head_env(ray_head), timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming run storage" in second.stdout
    assert "resuming from the checkpoint of epoch 1: training epochs 2..3" in second.stdout
    (again,) = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"  # the same run, continued
    spe = int(run.data.params["derived.steps_per_epoch"])
    knn = client.get_metric_history(run.info.run_id, "eval/knn_acc")
    assert {m.step for m in knn} == {spe * e for e in range(1, EPOCHS + 1)}
    assert sorted(p.name for p in (run_dir / "train").glob("epoch_*")) == [f"epoch_{e:04d}" for e in range(EPOCHS)]
    assert all((run_dir / "train" / f"epoch_{e:04d}" / "model.pt").exists() for e in range(EPOCHS))
