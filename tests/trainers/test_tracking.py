"""Rank-0 MLflow logging against a real sqlite store; failures never raise."""

from __future__ import annotations

import json
import time
import warnings

from mlflow.tracking import MlflowClient

from trainers.tracking import RunTracker, artifact_root_for, resolve_tracking_uri


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel.db", str(tmp_path)) == f"sqlite:///{tmp_path}/rel.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, str(tmp_path)) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert artifact_root_for(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlruns").as_uri()


def test_tracker_logs_to_sqlite_and_local_file(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=artifact_root_for(uri))
    run_id = client.create_run(exp).info.run_id
    tracker = RunTracker(uri, run_id, str(tmp_path / "m.jsonl"))
    tracker.log_metrics({"train/loss": 2.0}, step=1)
    tracker.log_params({f"p{i}": i for i in range(150)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_metrics({"train/loss": 1.5, "grad/norm": float("nan")}, step=2)
        tracker.log_metrics({"train/loss": float("inf"), "grad/norm": float("-inf")}, step=3)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    assert client.get_run(run_id).data.params["p149"] == "149"
    # never dropped silently: one warning per metric (naming value and step), a running count in MLflow
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all(issubclass(w.category, RuntimeWarning) for w in caught)
    assert "step 2: grad/norm = nan" in messages[0] and "step 3: train/loss = inf" in messages[1]
    count = client.get_metric_history(run_id, "tracking/nonfinite_metrics")
    assert [(m.step, m.value) for m in count] == [(2, 1.0), (3, 3.0)]
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [line.get("train/loss") for line in lines] == [2.0, 1.5, None]
    assert "nonfinite" not in lines[0] and lines[1]["nonfinite"] == {"grad/norm": "nan"}
    assert lines[2]["nonfinite"] == {"train/loss": "inf", "grad/norm": "-inf"}


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = RunTracker("sqlite:///" + str(tmp_path / "x.db"), "nope", str(tmp_path / "m.jsonl"), enabled=False)
    tracker.log_metrics({"a": 1.0}, step=0)
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "x.db").exists()


def test_unreachable_server_warns_once_and_keeps_local_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = RunTracker("http://127.0.0.1:9", "0" * 32, str(tmp_path / "m.jsonl"), retries=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_metrics({"a": 1.0}, step=0)
        tracker.log_metrics({"a": 2.0}, step=1)
    assert sum("MLflow" in str(w.message) for w in caught) == 1
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def test_tracking_server_check_names_what_is_wrong_in_one_line():
    import pytest

    from _procs import free_port
    from trainers.tracking import check_tracking_server

    check_tracking_server("sqlite:////tmp/x.db")  # a file store: nothing to ask
    with pytest.raises(ValueError, match=r"^no MLflow server answers there \(.*\); start it, or fix the URI$"):
        check_tracking_server(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    # a server that refuses the credentials: tests/e2e/test_cluster.py, against a real basic-auth server


def test_background_tracker_sends_its_own_lines_in_order_without_blocking(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bg", artifact_location=artifact_root_for(uri))).info.run_id
    path = tmp_path / "m.jsonl"
    driver = RunTracker(uri, run_id, str(path))  # the driver's lines, sent by the driver itself
    worker = RunTracker(uri, run_id, str(path), background=True, source="worker")
    driver.log_metrics({"data/stored_mb": 1.0}, step=0)
    for step in range(1, 301):
        worker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
    (tmp_path / "manifest.json").write_text("{}")
    worker.log_artifact(str(tmp_path / "manifest.json"), "graphs")
    assert worker.close(timeout_s=60) == 0
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert loss == [(step, 1.0 / step) for step in range(1, 301)]  # every line once, 600 metrics in batches
    assert len(client.get_metric_history(run_id, "data/stored_mb")) == 1  # not sent twice
    assert [a.path for a in client.list_artifacts(run_id, "graphs")] == ["graphs/manifest.json"]
    assert (tmp_path / "m.jsonl.worker.sent").read_text() == str(path.stat().st_size)


def test_metrics_logged_while_mlflow_is_down_wait_on_disk_and_arrive_later(tmp_path):
    from _procs import free_port

    from trainers.tracking import count_pending, send_pending

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("down", artifact_location=artifact_root_for(uri))).info.run_id
    path = tmp_path / "m.jsonl"
    said = []
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a server that is down
    worker = RunTracker(down, run_id, str(path), background=True, source="worker", say=said.append)
    t0 = time.perf_counter()
    for step in range(1, 51):
        worker.log_metrics({"train/loss": float(step)}, step=step)
    assert time.perf_counter() - t0 < 1.0  # the training thread never waits for MLflow
    deadline = time.monotonic() + 60
    while not said and time.monotonic() < deadline:  # the thread's first attempt (MLflow's own retries)
        time.sleep(0.1)
    assert len(said) == 1 and said[0].startswith("MLflow stopped answering"), said
    assert worker.close(timeout_s=1) == 50 == count_pending(path, "worker")  # all kept, on disk
    # once a server answers (here: the store the run lives in), what waited on disk reaches it
    assert send_pending(uri, run_id, path, "worker", timeout_s=30) == 0
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 51))
    assert count_pending(path, "worker") == 0
