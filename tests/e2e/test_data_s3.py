"""`hardbatch run` on the user's own images in S3 (a real moto server on 127.0.0.1), on the session's
Ray head, read back from MLflow. The S3 keys are in the command's environment only: they reach the
head's workers with the source.

The run refreshes its graph synchronously after every epoch (`refresh.mode: sync`): each version is
active exactly from the epoch boundary after its snapshot, and the trainer waits for the whole refresh.
(The asynchronous protocol, the default, is the smoke run's: test_faults.py.) Its loss is MVEB (an EMA
target network beside the online one, in every checkpoint): the end-to-end check that MVEB trains
through hardbatch; the sweep of test_sweep_compare.py is SSCL's and the soft-target classifier's."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _procs import head_env, run_cli
from _s3 import moto_s3
from pipelines.synthetic import image_folder

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3
TINY = ["model.width=8", "model.embed_dim=32", "model.proj_hidden=64", "model.proj_dim=16", "train.batch_size=32",
        f"train.epochs={EPOCHS}", "train.log_every_steps=2", "sampler.m=40", "data.image_size=16",
        "refresh.mode=sync", "refresh.every_epochs=1", "loss.name=mveb"]


@pytest.mark.e2e
def test_run_on_s3_image_folders_with_a_corrupt_file(ray_head, tmp_path):
    made = image_folder(tmp_path / "imgs", num_classes=4, per_class={"train": 24, "test": 6}, size=(14, 22),
                        formats=("png", "jpg"), modes=("RGB", "L"), seed=5)
    corrupt = tmp_path / "imgs" / made.files["train"][3]
    corrupt.write_bytes(b"not an image at all")
    db = tmp_path / "mlflow.db"
    with moto_s3() as s3:
        s3.upload_dir(tmp_path / "imgs", "bucket/imgs")
        overrides = ["data.source=images:s3://bucket/imgs/train", "data.test_source=images:s3://bucket/imgs/test",
                     f"data.s3_endpoint={s3.endpoint}", f"storage.path={tmp_path / 'results'}",
                     f"tracking.uri=sqlite:///{db}", "tracking.run_name=e2e-s3", *TINY]
        cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/smoke.yaml"),
               *[arg for item in overrides for arg in ("--set", item)]]
        proc = run_cli(cmd, cwd=tmp_path, env={**head_env(ray_head), **s3.env()}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "data: images:s3://bucket/imgs/train: 96 training / 24 data.test_source" in out
    assert f"data: skipped sample 3 ({made.files['train'][3].split('/', 1)[1]})" in out

    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("hardbatch-smoke").experiment_id])[0]
    rid, params = run.info.run_id, run.data.params
    assert run.info.status == "FINISHED"
    assert params["derived.sample_shape"] == "3x16x16" and params["derived.classes"] == ", ".join(made.classes)
    assert params["derived.augment_preset"] == "natural" and params["derived.store_location"] == "object_store"
    skipped = client.get_metric_history(rid, "data/skipped")
    assert skipped and max(m.value for m in skipped) >= 1  # replaced, counted, and the run went on
    knn = client.get_metric_history(rid, "eval/knn_acc")
    assert len(knn) == EPOCHS and all(0.0 <= m.value <= 1.0 for m in knn)
    loss = [m.value for m in sorted(client.get_metric_history(rid, "train/loss"), key=lambda m: m.step)]
    assert len(loss) >= EPOCHS and all(math.isfinite(v) for v in loss)
    # MVEB's own state: the EMA target's momentum follows its schedule from ema_base (0.99) up to 1;
    # kappa = 1 / kernel width, the width clamped at 0.1
    assert params["loss.name"] == "mveb" and float(params["loss.resolved.lam"]) == 0.01
    momentum = [m.value for m in sorted(client.get_metric_history(rid, "mveb/momentum"), key=lambda m: m.step)]
    assert len(momentum) >= EPOCHS and momentum == sorted(momentum) and 0.99 <= momentum[0] < momentum[-1] <= 1.0
    kappa = client.get_metric_history(rid, "mveb/kappa")
    assert kappa and all(0 < m.value <= 10 for m in kappa)
    assert {a.path for a in client.list_artifacts(rid, "data")} >= {"data/items_train.csv", "data/items_test.csv"}
    # refresh.mode=sync: the plans of epoch e (from 0) come from version e, built from the weights at the
    # end of epoch e - 1, and the trainer's stall covers the whole refresh (embedding and build); there is
    # no refresh after the last epoch
    spe = int(params["derived.steps_per_epoch"])
    versions = sorted((m.step, m.value) for m in client.get_metric_history(rid, "graph/version"))
    assert versions and all(v == max(step - 1, 0) // spe for step, v in versions), (spe, versions)  # 0: graph v0's record
    assert {v for _, v in versions} == set(range(EPOCHS))
    logged = {key: {(m.step, m.timestamp): m.value for m in client.get_metric_history(rid, key)}
              for key in ("refresh/stall_seconds", "refresh/embed_seconds", "refresh/graph_seconds")}
    stalls, embed, build = logged.values()
    assert len(stalls) == EPOCHS - 1, logged
    assert all(stall >= 0.95 * (embed[key] + build[key]) for key, stall in stalls.items()), logged
    items = (tmp_path / "results" / "e2e-s3" / "data" / "items_train.csv").read_text().splitlines()
    assert len(items) == 97 and items[4].split(",")[2] == f'"{made.files["train"][3].split("/", 1)[1]}"'
