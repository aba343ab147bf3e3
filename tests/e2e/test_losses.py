"""A bimodal loss through `hardbatch` end to end, read back from MLflow: the two-tower network, its
pair data and its retrieval metrics. The Siamese losses and the soft-target classifier are the runs
of test_sweep_compare.py (sscl, mveb, soft_infonce) and of every other end-to-end test (infonce).
Every loss, each bimodal one included, trains in-process on every kind of data, with its metrics, in
tests/trainers/test_tasks.py; what a loss adds to a run (its name, its resolved settings) is the same
wiring for each, so one bimodal run shows the rest of the path.

The run must finish with a finite, falling training loss, log its resolved loss settings (cross-rank
flags included) and the metrics of its kind. It joins the session's Ray head.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _checks import check_training
from _procs import head_env, run_cli

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.e2e
def test_a_bimodal_loss_trains_through_hardbatch(ray_head, tmp_path):
    """``loss.name=joint`` on the bimodal Gaussian pairs, 2 epochs on graph version 0: no refresh during
    training (``refresh.every_epochs=0``; a refresh after epoch 1 of 2 would land after the last step and
    only be waited for). Refresh during training is the subject of test_faults.py (async) and
    test_data_s3.py (sync)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(BIN / "hardbatch"), "run", str(ROOT / "configs/bimodal_gaussian.yaml"), "--set", "loss.name=joint",
           "--set", "data.num_samples=2000", "--set", "train.epochs=2", "--set", "refresh.every_epochs=0",
           "--set", f"tracking.uri={uri}", "--set", f"storage.path={tmp_path / 'results'}",
           "--set", "tracking.experiment=losses"]
    proc = run_cli(cmd, cwd=tmp_path, env=head_env(ray_head), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("losses").experiment_id])
    assert run.data.params["loss.name"] == "joint"
    check_training(client, run)
    assert run.data.params["derived.network_kind"] == "bimodal"
    # 400 held-out candidates: chance is 0.0025
    assert run.data.metrics["eval/retrieval_acc"] > 0.01
