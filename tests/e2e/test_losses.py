"""Every loss through `hardbatch` end to end, read back from MLflow: the soft-target classifier and the
three bimodal losses here; the Siamese losses are the runs of test_sweep_compare.py (sscl, mveb) and of
every other end-to-end test (infonce). In-process training of every loss on every kind of data, with its metrics,
is in tests/trainers/test_tasks.py.

Each run must finish with a finite, falling training loss, log its resolved loss settings (cross-rank
flags included) and the metrics of its kind. The sweeps join the session's Ray head.
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


def sweep(head, tmp_path: Path, config: str, losses: list[str], *overrides: str) -> tuple[MlflowClient, list]:
    """Run ``hardbatch sweep`` over ``losses`` (2 epochs on graph version 0) on the session's head;
    the runs of its experiment.

    No refresh during training (``refresh.every_epochs=0``): version 0 is still embedded by the pool
    with each run's own network, and a refresh after epoch 1 of 2 would land after the last step
    and only be waited for. Refresh during training is the subject of test_cli_run.py (async) and
    test_refresh_resume.py (sync)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(BIN / "hardbatch"), "sweep", str(ROOT / config), "--grid", f"loss.name={','.join(losses)}",
           "--set", "train.epochs=2", "--set", "refresh.every_epochs=0", "--set", f"tracking.uri={uri}",
           "--set", f"storage.path={tmp_path / 'results'}", "--name", "losses", "--set", "tracking.experiment=losses"]
    for item in overrides:
        cmd += ["--set", item]
    proc = run_cli(cmd, cwd=tmp_path, env=head_env(head), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"sweep losses: {len(losses)} finished, 0 failed" in proc.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("losses").experiment_id
    runs = [r for r in client.search_runs([experiment]) if r.data.tags.get("hardbatch.kind") != "sweep"]
    assert sorted(r.data.params["loss.name"] for r in runs) == sorted(losses)
    return client, runs


@pytest.mark.e2e
def test_soft_target_classifier_trains_through_hardbatch(ray_head, tmp_path):
    # soft_infonce estimates its partition function from the batch's own targets, so batches of few
    # classes (RWR's: same-class rate ~0.19 here against 0.10) starve it (ALGORITHMS.md 1.12): after
    # 22 steps its held-out accuracy under RWR lands anywhere in 0.13-0.24 depending on the graph.
    # Uniform batches isolate the wiring: 0.44 on this config.
    client, (soft,) = sweep(ray_head, tmp_path, "configs/smoke.yaml", ["soft_infonce"], "sampler.name=uniform")
    check_training(client, soft)
    assert 0.0 <= soft.data.metrics["eval/ece"] <= 1.0 and soft.data.metrics["eval/accuracy"] > 0.3
    noise = [float(q) for q in soft.data.params["loss.resolved.noise"].strip("[]").split(",")]
    assert len(noise) == 10 and abs(sum(noise) - 1) < 1e-3  # training-set class frequencies


@pytest.mark.e2e
def test_every_bimodal_loss_trains_through_hardbatch(ray_head, tmp_path):
    client, runs = sweep(ray_head, tmp_path, "configs/bimodal_gaussian.yaml", ["clip", "conditional", "joint"],
                         "data.num_samples=2000")
    for run in runs:
        check_training(client, run)
        assert run.data.params["derived.network_kind"] == "bimodal"
        # 400 held-out candidates: chance is 0.0025
        assert run.data.metrics["eval/retrieval_acc"] > 0.01, run.data.params["loss.name"]
