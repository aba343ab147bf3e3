"""The trained encoder as the product, end to end: `hardbatch run` trains a ResNet-18 (CIFAR stem)
on a generated image folder, on the session's Ray head; then, each in a fresh process,
`mlflow.pytorch.load_model("runs:/<id>/encoder")`, `hardbatch export` and `hardbatch embed` on the
same folder (the three at once) give the embeddings of the trained module (the last checkpoint, rebuilt with
`load_network`), and the parquet dataset has the documented columns, ids and labels (a garbage file
among the images: NaN and its reason)."""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from _procs import head_env, private_env, run_cli
from pipelines.store import SampleStore
from pipelines.synthetic import image_folder
from trainers.models import Encoder, load_network

ROOT = Path(__file__).resolve().parents[2]
SIDE = 16
TINY = ["model.backbone=resnet18", f"data.image_size={SIDE}", "train.epochs=1", "train.batch_size=16",
        "train.num_workers=1", "sampler.name=uniform", "refresh.every_epochs=0", "data.test_fraction=0.25"]

LOAD = """
import sys, numpy as np, torch, mlflow
uri, run_id, folder = sys.argv[1:4]
mlflow.set_tracking_uri(uri)
with torch.inference_mode():
    h = mlflow.pytorch.load_model(f"runs:/{run_id}/encoder")(torch.from_numpy(np.load(folder + "/x.npy")))
np.save(folder + "/mlflow.npy", h.numpy())
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


@pytest.mark.e2e
def test_resnet18_run_logs_its_encoder_which_export_and_embed_reproduce(ray_head, tmp_path):
    made = image_folder(tmp_path / "imgs", num_classes=4, per_class=24, size=(12, 20), corrupt=1, seed=11)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.source=images:{made.root}", f"storage.path={tmp_path / 'results'}", f"tracking.uri={uri}",
                 "tracking.run_name=e2e-encoder", *TINY]
    run = run_cli(_cli("run", str(ROOT / "configs/smoke.yaml"), *[a for o in overrides for a in ("--set", o)]),
                  cwd=tmp_path, env=head_env(ray_head), timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    logged = re.search(r"MLflow models encoder and encoder_best logged in ([\d.]+) s", run.stdout)
    assert logged, run.stdout[-3000:]
    run_id = re.search(r"MLflow run id: (\w+)", run.stdout).group(1)
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.params["derived.sample_shape"] == f"3x{SIDE}x{SIDE}"
    assert client.get_metric_history(run_id, "run/log_model_seconds")[0].value == pytest.approx(
        float(logged.group(1)), abs=0.1)

    # the samples as hardbatch decodes them, and the trained module: the last checkpoint
    files = made.files[""]
    store = SampleStore.in_memory(encoded=[(made.root / f).read_bytes() for f in files], image_size=SIDE)
    x = store.take(np.arange(len(files)))
    np.save(tmp_path / "x.npy", x)

    # three fresh processes at once: MLflow's loader, hardbatch export (neither needs Ray) and
    # hardbatch embed on the same folder (on the session's head)
    commands = {
        "mlflow": ([sys.executable, "-c", LOAD, uri, run_id, str(tmp_path)], private_env()),
        "export": (_cli("export", "--run", run_id, "--out", str(tmp_path / "export"), "--tracking-uri", uri),
                   private_env()),
        "embed": (_cli("embed", "--run", run_id, "--source", f"images:{made.root}", "--out", str(tmp_path / "emb"),
                       "--tracking-uri", uri, "--batch-size", "32"), head_env(ray_head)),
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {name: pool.submit(run_cli, cmd, cwd=tmp_path, env=env, timeout=240)
                   for name, (cmd, env) in commands.items()}
        (last,) = sorted((tmp_path / "results" / "e2e-encoder" / "train").glob("epoch_*"))
        net, _ = load_network(last)
        with torch.inference_mode():
            want = Encoder(net).eval()(torch.from_numpy(x)).numpy()
        procs = {name: future.result() for name, future in futures.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-3000:])
        assert "Traceback" not in proc.stdout + proc.stderr, name
    np.testing.assert_allclose(np.load(tmp_path / "mlflow.npy"), want, atol=1e-5, err_msg="mlflow")

    assert f"as export: {tmp_path / 'export' / 'encoder.pt2'}" in procs["export"].stdout
    card = json.loads((tmp_path / "export" / "encoder.json").read_text())
    assert card["run_id"] == run_id and card["which"] == "final" and card["backbone"] == "resnet18"
    assert card["input"]["shape"] == [3, SIDE, SIDE] and card["embedding_dim"] == 512 and card["epoch"] == 1
    with torch.inference_mode():
        exported = torch.export.load(tmp_path / "export" / "encoder.pt2").module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(exported, want, atol=1e-5, err_msg="export")

    assert f"[hardbatch] embedded {len(files)} samples of images:{made.root}" in procs["embed"].stdout
    assert "[hardbatch] 1 samples could not be decoded: their embedding is NaN" in procs["embed"].stdout
    table = pq.read_table(tmp_path / "emb").sort_by("id")  # the folder as a parquet dataset
    assert table.column_names == ["id", "location", "label", "class", "embedding", "error"]
    assert table.column("id").to_pylist() == list(range(len(files)))  # id: the sorted listing's row
    assert table.column("location").to_pylist() == files
    assert table.column("label").to_pylist() == made.labels[""].tolist()
    assert table.column("class").to_pylist() == [made.classes[c] for c in made.labels[""]]
    embedding = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    bad = files.index(made.corrupt[0])  # the garbage file: no embedding, and why
    errors = table.column("error").to_pylist()
    assert np.isnan(embedding[bad]).all() and "not a decodable image" in errors[bad]
    assert sum(e is not None for e in errors) == 1
    keep = np.arange(len(files)) != bad
    np.testing.assert_allclose(embedding[keep], want[keep], atol=1e-5, err_msg="embed")
    about = json.loads((tmp_path / "emb" / "_hardbatch.json").read_text())
    assert about["run_id"] == run_id and about["rows"] == len(files) and about["which"] == "final"
