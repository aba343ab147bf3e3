"""`hardbatch sweep` over image losses on the smoke config, then `hardbatch compare`, as a user runs
them; the sweep's runs are also the end-to-end check that SSCL and the soft-target classifier
(soft_infonce) train through hardbatch (InfoNCE is the loss of test_faults.py's runs, MVEB
test_data_s3.py's, a bimodal loss the job of test_cluster.py).

The sweep draws uniform batches (``sampler.name=uniform``): soft_infonce estimates its partition
function from the batch's own targets, so batches of few classes (RWR's: same-class rate ~0.19 here
against 0.10) starve it (ALGORITHMS.md 1.12): after 22 steps its held-out accuracy under RWR lands
anywhere in 0.13-0.24 depending on the graph, 0.44 with uniform batches. RWR batches are every other
end-to-end run's.

The sweep joins the session's Ray head (tests/conftest.py) instead of starting a Ray of its own. Its
runs train on graph version 0 (``refresh.every_epochs=0``): a refresh after epoch 1 of 2 lands after
the last step, so it would only be waited for; refresh is the subject of test_faults.py (async) and
test_data_s3.py (sync).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _checks import check_training
from _procs import head_env, run_cli

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOSSES = ["sscl", "soft_infonce"]


@pytest.mark.e2e
def test_sweep_the_image_losses_then_compare(ray_head, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = head_env(ray_head)
    sweep = run_cli(
        [str(BIN / "hardbatch"), "sweep", str(ROOT / "configs/smoke.yaml"), "--grid", f"loss.name={','.join(LOSSES)}",
         "--set", "train.epochs=2", "--set", "refresh.every_epochs=0", "--set", "sampler.name=uniform", "--set", f"tracking.uri={uri}", "--set", f"storage.path={tmp_path / 'results'}",
         "--name", "e2e-sweep"],
        cwd=tmp_path, env=env, timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert f"sweep e2e-sweep: {len(LOSSES)} finished, 0 failed" in sweep.stdout

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hardbatch-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_name == "e2e-sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.params["loss.name"] for r in children) == sorted(LOSSES)
    by_name = {r.data.params["loss.name"]: r for r in children}
    for run in children:
        check_training(client, run)
        assert len(client.get_metric_history(run.info.run_id, "eval/knn_acc")) == 2
        assert run.data.metrics["eval/knn_acc"] > 0.5  # chance is 0.1
    soft = by_name["soft_infonce"].data
    assert 0.0 <= soft.metrics["eval/ece"] <= 1.0 and soft.metrics["eval/accuracy"] > 0.3
    noise = [float(q) for q in soft.params["loss.resolved.noise"].strip("[]").split(",")]
    assert len(noise) == 10 and abs(sum(noise) - 1) < 1e-3  # training-set class frequencies
    assert by_name["sscl"].data.params["loss.resolved.tau_plus"] == "0.1"

    out = tmp_path / "report"
    compare = run_cli(
        [str(BIN / "hardbatch"), "compare", "--experiment", "hardbatch-smoke", "--out", str(out),
         "--tracking-uri", uri, "--baseline", "loss.name=sscl"],
        cwd=tmp_path, env=env, timeout=300)
    assert compare.returncode == 0, compare.stdout[-3000:] + compare.stderr[-3000:]
    table = compare.stdout
    assert "best eval/knn_acc" in table and "samples/s" in table
    assert all(f"loss.name={name}" in table for name in LOSSES)
    # against the baseline, paired by seed: one seed each, so a difference and no test
    assert "against loss.name=sscl, paired by seed:" in table
    with open(out / "differences.csv") as handle:
        (diff,) = list(csv.DictReader(handle))
    assert diff["variant"] == "loss.name=soft_infonce" and diff["pairs"] == "1" and diff["p_value"] == ""
    assert float(diff["diff_mean"]) == pytest.approx(
        max(m.value for m in client.get_metric_history(by_name["soft_infonce"].info.run_id, "eval/knn_acc"))
        - max(m.value for m in client.get_metric_history(by_name["sscl"].info.run_id, "eval/knn_acc")))

    with open(out / "compare.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["variant"] for r in rows) == sorted(f"loss.name={name}" for name in LOSSES)
    assert all(0.1 < float(r["best_mean"]) <= 1.0 and float(r["samples_per_s"]) > 0 and float(r["wall_s"]) > 0
               for r in rows)
    for name in ("metric_by_epoch.png", "loss.png", "hardness_vs_same_class.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    reports = client.search_runs([experiment.experiment_id], filter_string="tags.`hardbatch.kind` = 'report'")
    assert len(reports) == 1
    assert {"report/compare.csv", "report/metric_by_epoch.png"} <= {
        a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
