"""Sweep planning and execution, and the comparison report, with stand-in runs (no training).

The stand-in runner creates real MLflow child runs (sqlite in tmp) with metric histories shaped like
a job's, so the report is built from what MLflow returns, as in ``hardbatch compare``.
"""

from __future__ import annotations

import csv
import math
import os
import time
import types
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines import sweep as sweep_mod
from pipelines.cli import main
from pipelines.compare import (RunRecord, band, compare, format_differences, format_table, paired_differences, summarize,
                               variant_styles)
from pipelines.config import ConfigError, load_config
from pipelines.sweep import parallel_capacity, parse_grid, plan_sweep, run_demand, run_sweep

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/smoke.yaml")


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ----------------------------------------------------------------------------------------------
# planning


def test_parse_grid_values_are_yaml_scalars():
    assert parse_grid("sampler.name=uniform,rwr") == ("sampler.name", ("uniform", "rwr"))
    assert parse_grid("train.epochs=1, 2") == ("train.epochs", (1, 2))
    assert parse_grid("sampler.restart_decay=true,false") == ("sampler.restart_decay", (True, False))
    for bad in ("sampler.name", "sampler.name=", "=a,b", "sampler.name=a,,b", "sampler.name=rwr,rwr"):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)


def test_plan_is_the_product_times_seeds(tmp_path):
    plan = plan_sweep(SMOKE, ["sampler.name=uniform,rwr", "train.lr=0.001,0.002"], seeds=2,
                      overrides=["train.epochs=1", f"storage.path={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                      name="sw")
    assert len(plan.children) == 8 and plan.seeds == (0, 1)
    combos = {(c.config.sampler.name, c.config.train.lr, c.config.train.seed) for c in plan.children}
    assert len(combos) == 8
    first = plan.children[0]
    assert first.variant == "sampler.name=uniform,train.lr=0.001" and first.run_name == "sw-uniform-0.001-s0"
    assert first.config.train.epochs == 1 and first.config.tracking.run_name == first.run_name
    assert first.config.tracking.uri == f"sqlite:///{tmp_path}/m.db"
    assert len({c.run_name for c in plan.children}) == 8


def test_plan_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(SMOKE, ["sampler.name=uniform"], overrides=["storage.path=rel"])
    child = plan.children[0].config
    assert child.storage.path == str(tmp_path / "rel")
    assert child.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize("grid, seeds, message", [
    (["sampler.name=uniform,rwrr"], 1, r"variant sampler.name=rwrr: sampler.name = 'rwrr': must be one of"),
    (["sampler.nme=uniform"], 1, r"unknown config key 'sampler.nme'; did you mean 'sampler.name'"),
    (["sampler.k=5,500"], 1, r"variant sampler.k=500: sampler.k = 500 must be smaller than sampler.m"),
    (["sampler.name=uniform", "sampler.name=rwr"], 1, "key repeated"),
    (["sampler.name=uniform"], 0, "--seeds 0"),
])
def test_every_combination_is_validated_before_anything_starts(grid, seeds, message, monkeypatch):
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda *a, **k: pytest.fail("must not start"))
    with pytest.raises(ConfigError, match=message):
        plan_sweep(SMOKE, grid, seeds=seeds)


def test_cli_sweep_config_error_is_one_line(capsys):
    assert main(["sweep", SMOKE, "--grid", "sampler.name=uniform,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hardbatch: config error: variant sampler.name=bogus")


def test_bad_max_parallel_is_refused_before_the_parent_run_exists(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["sweep", SMOKE, "--grid", "sampler.name=uniform,rwr", "--max-parallel", "0", "--set", f"tracking.uri={uri}"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "hardbatch: config error: --max-parallel 0: must be at least 1"
    assert MlflowClient(uri).get_experiment_by_name("hardbatch-smoke") is None  # no (failed) parent run left


def test_parallel_capacity_counts_whole_runs(monkeypatch):
    config = load_config(SMOKE, ["ray.num_cpus=2"])  # 2 workers, embed pool 1 x 0.25 CPU
    assert run_demand(config, 2.0) == {"CPU": pytest.approx(2.0)}  # 2 x 0.875 + 0.25
    assert parallel_capacity(config, {"CPU": 2.0}) == 1
    assert parallel_capacity(config, {"CPU": 16.0}) == 7  # 2 x 1 + 0.25 = 2.25 per run
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster's GPUs are counted once connected
    gpu = load_config(SMOKE, ["train.use_gpu=true", "train.cpus_per_worker=1", "ray.num_cpus=8",
                              "storage.path=/mnt/shared/results", "tracking.uri=http://10.0.0.1:5000"])
    assert run_demand(gpu, 64.0) == {"CPU": 2.25, "GPU": 2}
    assert parallel_capacity(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    assert parallel_capacity(gpu, {"CPU": 64.0}) == 1  # no GPU node yet (autoscaling from 0)


# ----------------------------------------------------------------------------------------------
# running with a stand-in runner, then comparing


def _fake_runner(histories):
    """A runner that logs a run shaped like a job's, with ``histories[variant](seed)`` as eval/knn_acc."""

    def runner(config, config_path, parent_run_id):
        client = MlflowClient(config.tracking.uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        run = client.create_run(experiment.experiment_id, run_name=config.tracking.run_name,
                                tags={"mlflow.parentRunId": parent_run_id})
        run_id = run.info.run_id
        for key, value in {**config.flat(), "derived.steps_per_epoch": 10}.items():
            client.log_param(run_id, key, value)
        if config.sampler.name == "knn":
            client.set_terminated(run_id, status="FAILED")
            raise RuntimeError("boom")
        acc = histories[config.sampler.name](config.train.seed)
        for epoch, value in enumerate(acc):
            step = (epoch + 1) * 10
            client.log_metric(run_id, "eval/knn_acc", value, step=step)
            client.log_metric(run_id, "train/loss", 5.0 - epoch, step=step)
            client.log_metric(run_id, "train/samples_per_s", 100.0 * (2 if config.sampler.name == "uniform" else 1), step=step)
            client.log_metric(run_id, "sampler/hardness", 0.1 * epoch, step=step)
            client.log_metric(run_id, "sampler/same_class_rate", 0.1 + 0.05 * epoch, step=step)
        client.log_metric(run_id, "run/wall_seconds", 30.0 + config.train.seed, step=len(acc) * 10)
        client.set_terminated(run_id, status="FINISHED")
        return types.SimpleNamespace(run_id=run_id)

    return runner


def test_sweep_then_compare_report(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    histories = {"uniform": lambda s: [0.5, 0.6 + 0.02 * s, 0.55], "rwr": lambda s: [0.6, 0.7, 0.8 + 0.02 * s],
                 "knn": lambda s: []}
    plan = plan_sweep(SMOKE, ["sampler.name=uniform,rwr,knn"], seeds=2,
                      overrides=[f"tracking.uri={uri}", f"storage.path={tmp_path}"], name="unit")
    result = run_sweep(plan, runner=_fake_runner(histories))
    assert len(result.finished) == 4 and [c.variant for c, _ in result.failed] == ["sampler.name=knn"] * 2
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["hardbatch.kind"] == "sweep"
    assert parent.data.tags["hardbatch.grid"] == "sampler.name"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 6
    tagged = {(r.data.tags.get("hardbatch.variant"), r.data.tags.get("hardbatch.seed")) for r in children}
    assert ("sampler.name=rwr", "1") in tagged

    out = tmp_path / "report"
    capsys.readouterr()
    report = compare("hardbatch-smoke", out_dir=str(out), tracking_uri=uri)
    printed = capsys.readouterr().out
    assert "sampler.name=rwr" in printed and "sampler.name=uniform" in printed and "sampler.name=knn" not in printed
    rows = {row["variant"]: row for row in report.rows}
    assert [row["variant"] for row in report.rows] == ["sampler.name=rwr", "sampler.name=uniform"]
    rwr, uni = rows["sampler.name=rwr"], rows["sampler.name=uniform"]
    assert rwr["seeds"] == 2 and rwr["best_mean"] == pytest.approx(0.81)
    assert rwr["best_std"] == pytest.approx(np.std([0.8, 0.82], ddof=1))
    assert uni["best_mean"] == pytest.approx(0.61) and uni["final_mean"] == pytest.approx(0.55)
    assert uni["final_std"] == pytest.approx(0.0) and uni["samples_per_s"] == pytest.approx(200.0)
    assert rwr["wall_s"] == pytest.approx(30.5)

    with open(out / "compare.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["variant"] for r in csv_rows] == ["sampler.name=rwr", "sampler.name=uniform"]
    assert float(csv_rows[0]["best_mean"]) == pytest.approx(0.81)
    for name in ("metric_by_epoch.png", "loss.png", "hardness_vs_same_class.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(report.report_run_id, "report")}
    assert {"report/compare.csv", "report/loss.png"} <= logged
    report_run = client.get_run(report.report_run_id)
    assert report_run.data.tags["hardbatch.kind"] == "report"

    # A second compare leaves the report run out, and --mode min ranks the other way round.
    again = compare("hardbatch-smoke", out_dir=str(out), tracking_uri=uri, mode="min", log_to_mlflow=False)
    assert sum(row["seeds"] for row in again.rows) == 4
    assert again.rows[0]["variant"] == "sampler.name=uniform"


def test_compare_cli_errors(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # an existing store without that experiment
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 1
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_summary_and_band_math():
    records = [RunRecord("a", "a", "v1", "0", {"m": [(1, 0.2), (2, 0.4)]}),
               RunRecord("b", "b", "v1", "1", {"m": [(1, 0.4), (2, 0.2)]}),
               RunRecord("c", "c", "v2", "0", {"m": [(1, 0.9)]})]
    rows = summarize(records, "m")
    assert [r["variant"] for r in rows] == ["v2", "v1"]
    assert rows[1]["best_mean"] == pytest.approx(0.4) and rows[1]["best_std"] == pytest.approx(0.0)
    assert rows[1]["final_mean"] == pytest.approx(0.3) and math.isnan(rows[0]["best_std"])
    table = format_table(rows, "m")
    assert "0.9000 ± -" in table and table.splitlines()[0].startswith("variant")
    x, mean, std = band([records[0].histories["m"], records[1].histories["m"]])
    assert list(x) == [1.0, 2.0] and np.allclose(mean, [0.3, 0.3]) and np.allclose(std, [0.1414214] * 2)



def _seeded(variant: str, bests: dict[str, float]) -> list[RunRecord]:
    """One run per seed whose metric ``m`` peaks at the given value (and ends lower)."""
    return [RunRecord(f"{variant}-{seed}", f"{variant}-{seed}", variant, seed, {"m": [(1, best), (2, best - 0.1)]})
            for seed, best in bests.items()]


@pytest.mark.parametrize("count", [1, 10, 11, 20, 21, 45])
def test_every_variant_of_a_report_has_its_own_colour_and_line(count):
    """Past 10 variants tab10 would give the 11th the 1st one's colour (a `compare --all` of the shapes
    study had 11): each variant keeps a distinct (colour, line style), and up to 20 distinct colours."""
    variants = [f"sampler.m={i}" for i in range(count)]
    styles = variant_styles(variants)
    assert list(styles) == variants
    assert len(set(styles.values())) == count
    colours = {colour for colour, _ in styles.values()}
    assert len(colours) == min(count, 20)
    if count <= 10:
        assert {line for _, line in styles.values()} == {"-"}


def test_paired_differences_against_hand_computed_statistics():
    records = (_seeded("base", {"0": 0.5, "1": 0.6, "2": 0.7})
               + _seeded("better", {"0": 0.55, "1": 0.68, "2": 0.74, "3": 0.99})  # seed 3 has no pair
               + _seeded("same", {"0": 0.55, "1": 0.57, "2": 0.71})
               + _seeded("shifted", {"0": 0.52, "1": 0.62, "2": 0.72})
               + _seeded("once", {"0": 0.9}))
    rows = {row["variant"]: row for row in paired_differences(records, "m", "base")}
    assert set(rows) == {"better", "same", "shifted", "once"}

    # d = (0.05, 0.08, 0.04): mean 0.05667, sd 0.02082; t(0.975, 2 dof) = 4.302653 (tables)
    better = rows["better"]
    d = [0.05, 0.08, 0.04]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)
    assert better["pairs"] == 3 and better["diff_mean"] == pytest.approx(mean) and better["diff_std"] == pytest.approx(sd)
    assert (better["ci_low"], better["ci_high"]) == pytest.approx((mean - half, mean + half))
    # with 2 degrees of freedom Student's CDF is 1/2 + t / (2 sqrt(2 + t^2)): p = 1 - t / sqrt(2 + t^2)
    t = mean / (sd / math.sqrt(3))
    assert better["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t)) and better["significant"]
    assert 0.04 < better["p_value"] < 0.045

    # d = (0.05, -0.03, 0.01): the interval holds 0
    same = rows["same"]
    assert same["diff_mean"] == pytest.approx(0.01) and same["ci_low"] < 0 < same["ci_high"] and not same["significant"]
    # the same difference on every seed: no spread, the interval is the point
    shifted = rows["shifted"]
    assert shifted["diff_std"] == pytest.approx(0.0, abs=1e-12) and shifted["significant"]
    assert shifted["ci_low"] == pytest.approx(0.02) and shifted["ci_high"] == pytest.approx(0.02)
    # one pair: a difference, no test
    once = rows["once"]
    assert once["pairs"] == 1 and once["diff_mean"] == pytest.approx(0.4)
    assert math.isnan(once["p_value"]) and math.isnan(once["ci_low"]) and not once["significant"]

    # lower is better: the best value of each run is its minimum (0.1 below the peak here)
    low = {row["variant"]: row for row in paired_differences(records, "m", "base", mode="min")}
    assert low["better"]["diff_mean"] == pytest.approx(mean)
    table = format_differences(list(rows.values()), "m")
    assert table.splitlines()[0] == "against base, paired by seed:"
    assert f"{mean:+.4f} ± {sd:.4f}" in table and "[-" in table and " yes" in table and " no" in table
    with pytest.raises(ValueError, match="--baseline 'uniform' is not one of the variants: base, better, once"):
        paired_differences(records, "m", "uniform")


# ----------------------------------------------------------------------------------------------
# parallel children as Ray tasks


@pytest.mark.ray
def test_parallel_children_run_at_the_same_time(ray_local, tmp_path):
    plan = plan_sweep(SMOKE, ["sampler.name=uniform,rwr"], overrides=["tracking.uri=http://127.0.0.1:1"])
    rendezvous = str(tmp_path)

    def runner(config, config_path, parent_run_id):  # each child waits until the other has started
        Path(rendezvous, config.sampler.name).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(rendezvous)) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the other child never started")
            time.sleep(0.1)
        return types.SimpleNamespace(run_id=f"run-{config.sampler.name}-{parent_run_id}")

    tags = []
    client = types.SimpleNamespace(set_tag=lambda run_id, key, value: tags.append((run_id, key, value)))
    result = sweep_mod.SweepResult(parent_run_id="p", tracking_uri=plan.tracking_uri)
    sweep_mod._run_parallel(plan, "p", runner, result, client, limit=2)
    assert not result.failed, result.failed
    assert {outcome.run_id for _, outcome in result.finished} == {"run-uniform-p", "run-rwr-p"}
    assert ("run-rwr-p", "hardbatch.variant", "sampler.name=rwr") in tags


def test_compare_does_not_create_a_missing_store(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'missing.db'}"
    assert main(["compare", "--experiment", "x", "--tracking-uri", uri]) == 1
    assert capsys.readouterr().err.strip().startswith(f"hardbatch: no MLflow store at {uri}")
    assert not (tmp_path / "missing.db").exists()
