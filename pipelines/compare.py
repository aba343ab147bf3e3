"""``hardbatch compare``: the runs of an MLflow experiment side by side, as a table, a CSV and plots.

    hardbatch compare --experiment hardbatch-smoke --metric eval/knn_acc --out reports/smoke

Which runs: the children of the latest sweep in the experiment (``--sweep RUN_ID`` picks another,
``--all`` takes every finished run). Runs are grouped by variant (the sweep's grid values; a run
outside a sweep is grouped by loss and sampler), one row per variant:

    variant | seeds | best mean, std | final mean, std | wall time | samples/s

"best" is the best value of the metric over the run's epochs (highest, or lowest with
``--mode min``), "final" the last one; mean and standard deviation (n - 1) are over seeds.
With ``--baseline VARIANT`` every other variant is also set against that one, paired by seed (the
same seed draws the same initial weights and data order in both): per seed the difference of the
best values, their mean and standard deviation, a 95 % interval and the two-sided p-value of the
paired t-test (n - 1 degrees of freedom). A difference is called significant when its interval
excludes 0; with 3 seeds the interval is wide (t = 4.30), which is the honest answer at that count.

The report (``compare.csv``, ``table.txt``, ``differences.csv`` with a baseline, and three PNG plots:
the metric against epoch with a band of one standard deviation over seeds, the training loss, and
sampler hardness against the same-class rate of batches) is written to ``--out`` and logged to a
report run in the experiment.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipelines.sweep import GRID_TAG, KIND_TAG, SEED_TAG, VARIANT_TAG
from trainers.tracking import PARENT_RUN_TAG

CURVES = ("train/loss", "train/samples_per_s", "sampler/hardness", "sampler/same_class_rate", "run/wall_seconds")
COLUMNS = ("variant", "seeds", "best_mean", "best_std", "final_mean", "final_std", "wall_s", "samples_per_s")
DIFF_COLUMNS = ("variant", "baseline", "pairs", "diff_mean", "diff_std", "ci_low", "ci_high", "p_value", "significant")
PLOTS = ("metric_by_epoch.png", "loss.png", "hardness_vs_same_class.png")


@dataclass
class RunRecord:
    """One finished run as the report needs it: histories as ``(epoch, value)`` in step order."""

    run_id: str
    name: str
    variant: str
    seed: str
    histories: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


@dataclass
class Report:
    rows: list[dict[str, Any]]
    table: str
    out_dir: Path
    files: list[Path]
    report_run_id: Optional[str]
    runs: list[RunRecord]
    differences: Optional[list[dict[str, Any]]] = None


class CompareError(RuntimeError):
    """Nothing to compare (unknown experiment, no finished runs); the message is meant for the user."""


# ----------------------------------------------------------------------------------------------
# reading MLflow


def select_runs(client, experiment_name: str, sweep_id: Optional[str] = None, all_runs: bool = False):
    """The finished runs to compare and a one-line description of the selection.

    Raises:
        CompareError: the experiment does not exist or holds no finished run to compare.
    """
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise CompareError(f"no MLflow experiment named {experiment_name!r} in {getattr(client, 'tracking_uri', 'the store')}")
    runs = client.search_runs([experiment.experiment_id], max_results=5000, order_by=["attributes.start_time DESC"])
    sweeps = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
    training = [r for r in runs if r.data.tags.get(KIND_TAG) not in ("sweep", "report")]
    if all_runs:
        chosen, what = training, f"all runs of experiment {experiment_name!r}"
        grid_keys = None
    else:
        parent = None
        if sweep_id:
            parent = next((r for r in sweeps if r.info.run_id == sweep_id), None)
            if parent is None:
                raise CompareError(f"no sweep run {sweep_id!r} in experiment {experiment_name!r}")
        elif sweeps:
            parent = sweeps[0]  # the latest
        if parent is None:
            chosen, what, grid_keys = training, f"all runs of experiment {experiment_name!r} (no sweep)", None
        else:
            chosen = [r for r in training if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
            what = f"sweep {parent.info.run_name} ({parent.info.run_id}) in experiment {experiment_name!r}"
            grid_keys = [k for k in parent.data.tags.get(GRID_TAG, "").split(",") if k]
    finished = [r for r in chosen if r.info.status == "FINISHED"]
    skipped = len(chosen) - len(finished)
    if skipped:
        what += f"; {skipped} unfinished run(s) left out"
    if not finished:
        raise CompareError(f"no finished runs to compare: {what}")
    return finished, what, grid_keys


def variant_of(run, grid_keys: Optional[list[str]]) -> str:
    """The variant label of a run: its sweep tag, else its grid values, else its loss and sampler."""
    tags, params = run.data.tags, run.data.params
    if tags.get(VARIANT_TAG):
        return tags[VARIANT_TAG]
    keys = grid_keys or ["loss.name", "sampler.name"]
    return ",".join(f"{key}={params.get(key, '?')}" for key in keys)


def load_record(client, run, metric: str, grid_keys: Optional[list[str]]) -> RunRecord:
    """Fetch the histories of ``metric`` and :data:`CURVES`, steps converted to epochs."""
    spe = float(run.data.params.get("derived.steps_per_epoch") or 1) or 1.0
    record = RunRecord(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id,
                       variant=variant_of(run, grid_keys),
                       seed=run.data.tags.get(SEED_TAG) or run.data.params.get("train.seed", "?"))
    for key in dict.fromkeys((metric, *CURVES)):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        record.histories[key] = [(m.step / spe, m.value) for m in history]
    return record


# ----------------------------------------------------------------------------------------------
# the table


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def summarize(records: list[RunRecord], metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """One row per variant (columns :data:`COLUMNS`), the best variant first.

    Args:
        records: the runs, several per variant when there are several seeds.
        metric: the metric whose best and final values are compared.
        mode: ``max`` when higher is better, ``min`` when lower is.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    pick = max if mode == "max" else min
    rows = []
    for variant, group in _by_variant(records).items():
        curves = [[v for _, v in r.histories.get(metric, [])] for r in group]
        curves = [c for c in curves if c]
        best_mean, best_std = _mean_std([pick(c) for c in curves])
        final_mean, final_std = _mean_std([c[-1] for c in curves])
        walls = [r.histories["run/wall_seconds"][-1][1] for r in group if r.histories.get("run/wall_seconds")]
        speeds = [float(np.mean([v for _, v in r.histories["train/samples_per_s"]]))
                  for r in group if r.histories.get("train/samples_per_s")]
        rows.append({"variant": variant, "seeds": len(group), "best_mean": best_mean, "best_std": best_std,
                     "final_mean": final_mean, "final_std": final_std,
                     "wall_s": float(np.mean(walls)) if walls else math.nan,
                     "samples_per_s": float(np.mean(speeds)) if speeds else math.nan})
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda row: (math.isnan(row["best_mean"]), sign * np.nan_to_num(row["best_mean"])))


def paired_differences(records: list[RunRecord], metric: str, baseline: str, mode: str = "max",
                       level: float = 0.95) -> list[dict[str, Any]]:
    """Each variant's best ``metric`` against ``baseline``'s, paired by seed (columns :data:`DIFF_COLUMNS`).

    For the ``n`` seeds both ran, ``d_s = best(variant, s) - best(baseline, s)``; the row holds the mean
    and standard deviation (n - 1) of ``d``, the ``level`` interval ``mean +- t * sd / sqrt(n)`` with
    ``t`` the Student quantile of n - 1 degrees of freedom, the two-sided p-value of the paired t-test,
    and whether the interval excludes 0. Fewer than 2 pairs give NaN statistics (no test possible).

    Raises:
        ValueError: ``baseline`` is not one of the variants.
    """
    from scipy import stats

    pick = max if mode == "max" else min
    groups = _by_variant(records)
    if baseline not in groups:
        raise ValueError(f"--baseline {baseline!r} is not one of the variants: {', '.join(sorted(groups))}")

    def best_by_seed(group: list[RunRecord]) -> dict[str, float]:
        return {r.seed: pick(v for _, v in r.histories[metric]) for r in group if r.histories.get(metric)}

    base = best_by_seed(groups[baseline])
    rows = []
    for variant, group in groups.items():
        if variant == baseline:
            continue
        mine = best_by_seed(group)
        seeds = sorted(set(mine) & set(base))
        d = np.array([mine[s] - base[s] for s in seeds], dtype=float)
        row = {"variant": variant, "baseline": baseline, "pairs": len(d), "diff_mean": math.nan,
               "diff_std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
               "significant": False}
        if len(d):
            row["diff_mean"] = float(d.mean())
        if len(d) >= 2:
            sd = float(d.std(ddof=1))
            half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * sd / math.sqrt(len(d))
            if sd > 0:
                p_value = float(2 * stats.t.sf(abs(d.mean()) / (sd / math.sqrt(len(d))), len(d) - 1))
            else:  # every pair differs by the same amount: no spread to test against
                p_value = 1.0 if d.mean() == 0 else 0.0
            row.update(diff_std=sd, ci_low=float(d.mean()) - half, ci_high=float(d.mean()) + half,
                       p_value=p_value, significant=bool(float(d.mean()) - half > 0 or float(d.mean()) + half < 0))
        rows.append(row)
    return rows


def format_differences(rows: list[dict[str, Any]], metric: str) -> str:
    """The paired differences as an aligned plain-text table; a missing value prints as ``-``."""

    def signed(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:+.4f}"

    def plain(value: float, digits: int = 4) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"

    header = ["variant", "pairs", f"best {metric} - baseline", "95 % interval", "p (paired t)", "significant"]
    body = [[row["variant"], str(row["pairs"]), f"{signed(row['diff_mean'])} ± {plain(row['diff_std'])}",
             f"[{signed(row['ci_low'])}, {signed(row['ci_high'])}]", plain(row["p_value"], 3),
             "yes" if row["significant"] else "no"] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    title = f"against {rows[0]['baseline']}, paired by seed:" if rows else "no other variant to set against"
    return "\n".join([title, fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The rows as an aligned plain-text table; a missing value (one seed: no std) prints as ``-``."""

    def num(value: float, digits: int) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    header = ["variant", "seeds", f"best {metric}", f"final {metric}", "wall s", "samples/s"]
    body = [[row["variant"], str(row["seeds"]),
             f"{num(row['best_mean'], 4)} ± {num(row['best_std'], 4)}",
             f"{num(row['final_mean'], 4)} ± {num(row['final_std'], 4)}",
             num(row["wall_s"], 1), num(row["samples_per_s"], 0)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def write_csv(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


# ----------------------------------------------------------------------------------------------
# plots


def _by_variant(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.variant, []).append(record)
    return groups


def band(curves: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds at the x values every curve has.

    Returns:
        ``(x, mean, std)``; std is 0 with a single curve.
    """
    curves = [dict(c) for c in curves if c]
    if not curves:
        return np.array([]), np.array([]), np.array([])
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[x] for x in xs] for c in curves], dtype=float)
    std = values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
    return np.asarray(xs, dtype=float), values.mean(0), std


def variant_styles(variants: list[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """A distinct ``(colour, line style)`` per variant, in order: tab10's colours for up to 10 variants,
    tab20's for up to 20, then tab20's again with dashed, dotted and dash-dot lines (an 11th variant
    must not share the 1st one's colour: a sweep compared with ``--all`` easily has more than 10)."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(variants) <= 10 else "tab20"]  # palette.N colours: 10 or 20
    dashes = ("-", "--", ":", "-.")
    return {v: (tuple(palette(i % palette.N)), dashes[(i // palette.N) % len(dashes)]) for i, v in enumerate(variants)}


def plot_report(records: list[RunRecord], metric: str, out_dir: Path) -> list[Path]:
    """Draw :data:`PLOTS` into ``out_dir`` and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_variant(records)
    styles = variant_styles(list(groups))  # variant -> (colour, line style)
    paths = []

    for key, name, ylabel in ((metric, PLOTS[0], metric), ("train/loss", PLOTS[1], "train/loss")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant, group in groups.items():
            x, mean, std = band([r.histories.get(key, []) for r in group])
            if not len(x):
                continue
            color, line = styles[variant]
            ax.plot(x, mean, color=color, linestyle=line, marker="o" if key == metric and len(x) < 30 else None,
                    label=f"{variant} (n={len(group)})")
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel}: mean over seeds, band ± 1 std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(out_dir / name)
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for variant, group in groups.items():
        for i, record in enumerate(group):
            hardness = dict(record.histories.get("sampler/hardness", []))
            same = dict(record.histories.get("sampler/same_class_rate", []))
            epochs = sorted(set(hardness) & set(same))
            if not epochs:
                continue
            xs, ys = [hardness[e] for e in epochs], [same[e] for e in epochs]
            color, line = styles[variant]
            ax.plot(xs, ys, color=color, linestyle=line, alpha=0.4, linewidth=1)
            ax.scatter(xs, ys, color=color, s=[12 + 36 * k / max(len(epochs) - 1, 1) for k in range(len(xs))],
                       label=variant if i == 0 else None)
    ax.set_xlabel("sampler/hardness (mean pairwise cosine within a batch)")
    ax.set_ylabel("sampler/same_class_rate")
    ax.set_title("batch hardness vs same-class rate (marker grows with epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out_dir / PLOTS[2])
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# the command


def compare(experiment: str, metric: str = "eval/knn_acc", out_dir: Optional[str] = None,
            tracking_uri: Optional[str] = None, sweep_id: Optional[str] = None, all_runs: bool = False,
            mode: str = "max", log_to_mlflow: bool = True, baseline: Optional[str] = None) -> Report:
    """Build the report of an experiment; see the module docstring.

    Args:
        experiment: MLflow experiment name.
        metric: the metric to rank variants by.
        out_dir: where the CSV, table and plots go; default ``hardbatch_results/compare/<experiment>``.
        tracking_uri: default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.
        sweep_id: compare the children of this sweep (parent run id) instead of the latest sweep.
        all_runs: compare every finished run of the experiment.
        mode: ``max`` if higher values of ``metric`` are better, else ``min``.
        log_to_mlflow: log the report as a run (tag ``hardbatch.kind = report``) in the experiment.
        baseline: a variant to set every other against, paired by seed (:func:`paired_differences`).

    Raises:
        CompareError: nothing to compare, or ``baseline`` is not a variant.
    """
    from mlflow.tracking import MlflowClient

    from trainers.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # opening a sqlite store creates it: a read-only command must not leave an empty one behind
        raise CompareError(f"no MLflow store at {uri} (give --tracking-uri, or run from the directory "
                           f"holding mlflow.db)")
    client = MlflowClient(uri)
    runs, what, grid_keys = select_runs(client, experiment, sweep_id, all_runs)
    records = [load_record(client, run, metric, grid_keys) for run in runs]
    if not any(r.histories.get(metric) for r in records):
        raise CompareError(f"metric {metric!r} was not logged by any of the runs ({what})")
    rows = summarize(records, metric, mode)
    table = format_table(rows, metric)
    differences = None
    if baseline is not None:
        try:
            differences = paired_differences(records, metric, baseline, mode)
        except ValueError as err:
            raise CompareError(str(err)) from None
        table = f"{table}\n\n{format_differences(differences, metric)}"

    out = Path(out_dir) if out_dir else Path("hardbatch_results", "compare", _safe(experiment))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "compare.csv")
    (out / "table.txt").write_text(f"{what}\n\n{table}\n")
    files = [out / "compare.csv", out / "table.txt"]
    if differences is not None:
        write_csv(differences, out / "differences.csv", DIFF_COLUMNS)
        files.append(out / "differences.csv")
    files += plot_report(records, metric, out)

    report_run_id = None
    if log_to_mlflow:
        report_run_id = _log_report(client, runs, experiment, metric, mode, files)
    print(what)
    print(table)
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    if report_run_id:
        print(f"logged to MLflow run {report_run_id} (experiment {experiment!r}, {uri})")
    return Report(rows=rows, table=table, out_dir=out, files=files, report_run_id=report_run_id, runs=records,
                  differences=differences)


def _log_report(client, runs, experiment: str, metric: str, mode: str, files: list[Path]) -> str:
    experiment_id = runs[0].info.experiment_id
    parents = {r.data.tags.get(PARENT_RUN_TAG) for r in runs}
    tags = {KIND_TAG: "report"}
    if len(parents) == 1 and None not in parents:
        tags[PARENT_RUN_TAG] = parents.pop()  # the report sits under its sweep in the MLflow UI
    run = client.create_run(experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    run_id = run.info.run_id
    for key, value in {"compare.metric": metric, "compare.mode": mode, "compare.runs": len(runs),
                       "compare.experiment": experiment}.items():
        client.log_param(run_id, key, str(value))
    for path in files:
        client.log_artifact(run_id, str(path), "report")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def main_compare(args) -> int:
    """The ``hardbatch compare`` subcommand body (``args`` from :mod:`pipelines.cli`)."""
    try:
        compare(args.experiment, metric=args.metric, out_dir=args.out, tracking_uri=args.tracking_uri,
                sweep_id=args.sweep, all_runs=args.all, mode=args.mode, log_to_mlflow=not args.no_log,
                baseline=args.baseline)
    except CompareError as err:
        print(f"hardbatch: {err}", file=sys.stderr)
        return 1
    return 0
