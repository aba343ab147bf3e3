"""The trained encoder as a product (pipelines/export.py), without Ray: a real MLflow run (sqlite in
tmp_path) logs a small network's encoder; it loads back in a fresh process through MLflow, and as
the TorchScript and torch.export files ``hardbatch export`` writes, with the module's outputs; and
``hardbatch export`` / ``hardbatch embed`` refuse bad requests in one line, before Ray starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from _procs import run_cli
from pipelines.export import export_encoder, find_encoder, load_encoder, log_encoders
from pipelines.synthetic import image_folder
from trainers.models import Encoder, build_network, encoder_card, load_network, network_spec, save_network

MODEL = {"backbone": "small_cnn", "width": 4, "embed_dim": 8, "proj_hidden": 16, "proj_dim": 4}
SHAPE = (3, 16, 16)


def _checkpoint(directory: Path, seed: int, epoch: int) -> Path:
    """A checkpoint as the workers write one: model.pt, network.json, meta.json."""
    spec = network_spec("siamese", MODEL, SHAPE)
    torch.manual_seed(seed)
    save_network(build_network(spec), spec, directory)
    (directory / "meta.json").write_text(json.dumps({"epoch": epoch, "step": 4 * (epoch + 1)}))
    return directory


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run that logged a final and a best encoder, a run that logged only a final one, a failed run
    and a finished run without encoders, in one sqlite store."""
    tmp = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("export-test", artifact_location=(tmp / "mlruns").as_uri())
    final, best = _checkpoint(tmp / "final", 0, 1), _checkpoint(tmp / "best", 1, 0)
    meta = json.loads((best / "meta.json").read_text())
    (best / "meta.json").write_text(json.dumps({**meta, "metric": "eval/knn_acc", "value": 0.5}))
    example = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    runs = {}
    for name, best_dir in (("both", best), ("final_only", tmp / "no_best")):
        run_id = client.create_run(experiment, run_name=name).info.run_id
        client.log_param(run_id, "train.lr", 0.1)
        # the run's record (metrics.jsonl) and what it sent to MLflow: the best epoch's step 4, the final 8
        record = tmp / f"{name}.jsonl"
        lines = [{"step": 4, "time_ms": 1_000, "src": "worker", "eval/knn_acc": 0.25, "train/loss": 2.0},
                 {"step": 6, "time_ms": 2_000, "src": "worker", "train/loss": 1.5},
                 {"step": 8, "time_ms": 3_000, "src": "worker", "eval/knn_acc": 0.5}]
        record.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 8, "time_')  # cut short
        for line in lines:
            for key in ("eval/knn_acc", "train/loss"):
                if key in line:
                    client.log_metric(run_id, key, line[key], timestamp=line["time_ms"], step=line["step"])
        out = log_encoders(uri, run_id, final, best_dir, example, metrics_file=record if name == "both" else None)
        assert out["final"] and (out["best"] is not None) == (name == "both") and out["seconds"] > 0
        client.set_terminated(run_id, "FINISHED")
        runs[name] = run_id
    for name, status in (("failed", "FAILED"), ("old", "FINISHED")):
        runs[name] = client.create_run(experiment, run_name=name).info.run_id
        client.set_terminated(runs[name], status)
    return {"uri": uri, "tmp": tmp, "runs": runs, "final": final, "best": best, "example": example}


def test_logged_encoders_carry_card_signature_metrics_and_load_back_strictly(logged):
    uri, run_id = logged["uri"], logged["runs"]["both"]
    spec = network_spec("siamese", MODEL, SHAPE)
    final = find_encoder(uri, run_id, "final")
    best = find_encoder(uri, run_id, "best")
    assert final.card == best.card == json.loads(json.dumps(encoder_card(spec)))
    assert final.meta["which"] == "final" and final.meta["epoch"] == 2 and final.meta["step"] == 8
    assert best.meta["metric"] == "eval/knn_acc" and best.meta["value"] == 0.5 and best.meta["epoch"] == 1
    assert final.run_uri == f"runs:/{run_id}/encoder" and best.run_uri == f"runs:/{run_id}/encoder_best"
    client = MlflowClient(uri)
    model = client.get_logged_model(final.model_id)
    assert model.name == "encoder" and model.source_run_id == run_id
    assert model.experiment_id == client.get_run(run_id).info.experiment_id  # not the default experiment
    # the run's metrics at the model's step are linked to it, and the run's history has each once
    assert [(m.key, m.value, m.step, m.timestamp) for m in model.metrics] == [("eval/knn_acc", 0.5, 8, 3_000)]
    assert sorted((m.key, m.step) for m in client.get_logged_model(best.model_id).metrics) == [
        ("eval/knn_acc", 4), ("train/loss", 4)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/knn_acc")) == [4, 8]
    assert sorted((o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs) == sorted(
        [(final.model_id, 8), (best.model_id, 4)])  # the run's outputs (MLflow returns them in no fixed order)
    assert model.params["train.lr"] == "0.1"  # the run's parameters, copied to the model
    x = torch.from_numpy(np.random.default_rng(1).random((5, *SHAPE), dtype=np.float32))
    for logged_encoder, directory in ((final, logged["final"]), (best, logged["best"])):
        encoder, meta = load_encoder(logged_encoder.model_uri, uri)  # strict: every weight, nothing more
        net, _ = load_network(directory)
        with torch.no_grad():
            assert torch.allclose(encoder(x), Encoder(net).eval()(x), atol=1e-6)
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{final.model_id}")
    assert info.signature.inputs.inputs[0].shape == (-1, *SHAPE)
    assert info.signature.outputs.inputs[0].shape == (-1, MODEL["embed_dim"])
    example = json.loads(Path(logged["tmp"], "mlruns", "models", final.model_id, "artifacts",
                              "input_example.json").read_text())
    np.testing.assert_allclose(np.asarray(example, dtype=np.float32), logged["example"])  # the samples given


VERIFY = """
import sys, numpy as np, torch, mlflow
uri, run_id, folder = sys.argv[1:4]
mlflow.set_tracking_uri(uri)
x = torch.from_numpy(np.load(folder + "/x.npy"))
out = {"mlflow": mlflow.pytorch.load_model(f"runs:/{run_id}/encoder")(x),
       "export": torch.export.load(folder + "/export/encoder.pt2").module()(x),
       "torchscript": torch.jit.load(folder + "/torchscript/encoder.pt")(x)}
np.savez(folder + "/out.npz", **{k: v.detach().numpy() for k, v in out.items()})
print("hardbatch imported:", any(m.split(".")[0] in ("pipelines", "trainers") for m in sys.modules))
"""


def test_mlflow_model_and_exported_files_give_the_modules_outputs_in_a_fresh_process(logged):
    uri, run_id, tmp = logged["uri"], logged["runs"]["both"], logged["tmp"]
    found = find_encoder(uri, run_id, "final")
    encoder, meta = load_encoder(found.model_uri, uri)
    files = {}
    for fmt in ("export", "torchscript"):
        target, card_file = export_encoder(encoder, meta, tmp / fmt, fmt, {"run_id": run_id, "which": "final"})
        files[fmt] = target
        card = json.loads(card_file.read_text())
        assert card["run_id"] == run_id and card["which"] == "final" and card["format"] == fmt
        assert card["file"] == target.name and card["input"]["shape"] == list(SHAPE)
        assert card["embedding_dim"] == MODEL["embed_dim"] and card["epoch"] == 2 and card["backbone"] == "small_cnn"
    assert files["export"].name == "encoder.pt2" and files["torchscript"].name == "encoder.pt"
    x = np.random.default_rng(2).random((7, *SHAPE), dtype=np.float32)  # another batch size than exported
    np.save(tmp / "x.npy", x)
    proc = run_cli([sys.executable, "-c", VERIFY, uri, run_id, str(tmp)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hardbatch imported: False" in proc.stdout  # the MLflow model and the files need torch only
    net, _ = load_network(logged["final"])
    with torch.no_grad():
        want = Encoder(net).eval()(torch.from_numpy(x)).numpy()
    got = np.load(tmp / "out.npz")
    for name in ("mlflow", "export", "torchscript"):
        np.testing.assert_allclose(got[name], want, atol=1e-5, err_msg=name)


PROBE = """
import json, sys
import pipelines.run
from pipelines.cli import main

def no_ray(*args, **kwargs):
    raise AssertionError("Ray was started")

pipelines.run.init_ray = no_ray  # every refusal comes before Ray
for args in json.loads(sys.argv[1]):
    print(f"rc={main(args)}", flush=True)
    print("--- end of case", file=sys.stderr, flush=True)
"""


def test_bad_requests_are_refused_in_one_line_before_ray(logged, tmp_path):
    uri, runs = logged["uri"], logged["runs"]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.parquet").write_text("x")
    images = tmp_path / "imgs"
    images.mkdir()  # a folder without images
    good = image_folder(tmp_path / "good", num_classes=2, per_class=2, size=16).root
    missing_db = tmp_path / "elsewhere" / "mlflow.db"
    base = ["--tracking-uri", uri]
    embed = ["embed", *base, "--run", runs["both"], "--out", str(tmp_path / "emb")]
    cases = [
        (["export", *base, "--run", "0123456789abcdef0123456789abcdef", "--out", str(tmp_path / "a")],
         "run '0123456789abcdef0123456789abcdef' not found in"),
        (["export", *base, "--run", runs["failed"], "--out", str(tmp_path / "b")],
         f"run {runs['failed']} (failed, FAILED) has no logged encoder: it did not finish training"),
        (["embed", *base, "--run", runs["old"], "--source", "builtin:digits", "--out", str(tmp_path / "c")],
         f"run {runs['old']} (old, FINISHED) has no logged encoder: it predates encoder logging"),
        (["export", *base, "--run", runs["final_only"], "--which", "best", "--out", str(tmp_path / "d")],
         f"run {runs['final_only']} (final_only, FINISHED) has no best encoder"),
        ([*embed, "--source", f"images:{tmp_path / 'nowhere'}"], f"--source images:{tmp_path / 'nowhere'}: "),
        ([*embed, "--source", f"images:{images}"], f"--source images:{images}: "),
        ([*embed, "--source", "mnist"], "--source mnist: unknown data source"),
        ([*embed, "--source", "builtin:digits"], "--source builtin:digits: its samples decode to 1x8x8, "
                                                 "the encoder takes 3x16x16"),
        (["export", *base, "--run", runs["both"], "--out", str(blocker / "out")],
         f"--out {blocker / 'out'}: {blocker} is a file, not a folder"),
        (["embed", *base, "--run", runs["both"], "--source", f"images:{good}", "--out", str(full)],
         f"--out {full}: the folder is not empty"),
        (["export", "--tracking-uri", f"sqlite:///{missing_db}", "--run", runs["both"], "--out", str(tmp_path / "e")],
         f"no MLflow store at {missing_db}"),
        ([*embed, "--source", f"images:{good}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ]
    work = tmp_path / "cwd"  # the default store of an MLflow call that forgot the tracking URI would land here
    work.mkdir()
    proc = run_cli([sys.executable, "-c", PROBE, json.dumps([args for args, _ in cases])], cwd=work, timeout=300)
    assert proc.stdout.splitlines() == ["rc=2"] * len(cases), proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = proc.stderr.split("--- end of case\n")[:-1]
    for (args, expected), err in zip(cases, outputs):
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("hardbatch: ") and expected in lines[0], (args, err)
    for name in "abcde":
        assert not (tmp_path / name).exists()  # nothing written for a refused request
    assert not (tmp_path / "emb").exists() and not missing_db.parent.exists()  # no empty store made either
    assert not list(work.iterdir())


def test_two_tower_and_classifier_encoders_log_and_load_back(logged, tmp_path):
    """The u tower of a two-tower network (vectors in, ``ND``) and a classifier's backbone (no head)."""
    client = MlflowClient(logged["uri"])
    experiment = client.get_run(logged["runs"]["both"]).info.experiment_id
    for kind, shape, extra in (("bimodal", (8,), {"v_shape": (6,)}), ("classifier", (1, 8, 8), {"num_classes": 3})):
        spec = network_spec(kind, MODEL, shape, **extra)
        torch.manual_seed(0)
        net = build_network(spec)
        save_network(net, spec, tmp_path / kind)
        run_id = client.create_run(experiment, run_name=kind).info.run_id
        log_encoders(logged["uri"], run_id, tmp_path / kind, tmp_path / "no_best",
                     np.random.default_rng(0).random((2, *shape), dtype=np.float32))
        found = find_encoder(logged["uri"], run_id, "final")
        assert found.card["input"]["shape"] == list(shape) and found.card["network_kind"] == kind
        assert found.card["input"]["layout"] == ("ND" if kind == "bimodal" else "NCHW")
        encoder, _ = load_encoder(found.model_uri, logged["uri"])
        x = torch.rand(3, *shape)
        with torch.no_grad():
            assert torch.allclose(encoder(x), Encoder(net).eval()(x), atol=1e-6)


def test_embedding_pool_takes_the_gpus_or_most_cpus():
    from pipelines.export import embed_pool

    assert embed_pool({"CPU": 2.0}) == {"pool_size": 1, "num_gpus": 0.0, "num_cpus": 1.5, "threads": 2,
                                        "device": "cpu"}  # one actor of 2 threads, room left for the writes
    assert embed_pool({"CPU": 32.0})["pool_size"] == 4 and embed_pool({"CPU": 32.0})["threads"] == 8
    assert embed_pool({"CPU": 16.0, "GPU": 2.0}) == {"pool_size": 2, "num_gpus": 1.0, "num_cpus": 1.0,
                                                     "threads": None, "device": "cuda"}
