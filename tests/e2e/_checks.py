"""Assertions on runs read back from MLflow, shared by the end-to-end tests."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient


def check_training(client: MlflowClient, run) -> None:
    """A finished run with a finite, falling loss, per-rank loss flags and the graph it should use."""
    assert run.info.status == "FINISHED"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    name = run.data.params["loss.name"]
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses), (name, losses)
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, (name, losses)  # the loss falls
    assert run.data.params["loss.resolved.distributed_flags"] != ""
    for flag in run.data.params["loss.resolved.distributed_flags"].split(","):
        assert run.data.params[f"loss.resolved.{flag}"] == "False", (name, flag)  # per-rank by default
    uses_graph = run.data.params["sampler.name"] != "uniform"
    assert (int(run.data.metrics["graph/version"]) >= 0) == uses_graph  # -1: plans drawn without a graph
