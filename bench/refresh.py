"""The trainer's stall per graph refresh, ``refresh.mode=async`` against ``refresh.mode=sync``.

    python bench/refresh.py [--quick] [--epochs N] [--every-steps N] [--keep]

Runs the real job twice, once per mode (``hardbatch run configs/smoke.yaml`` in a subprocess, a fresh
local Ray each time, MLflow and checkpoints under a temporary directory), with a refresh every epoch
(or every ``--every-steps`` steps), and reads the run's own ``metrics.jsonl`` back. Per mode: refreshes,
mean and max stall per refresh (``refresh/stall_seconds`` as rank 0 logged it), mean refresh time
(``refresh/embed_seconds + refresh/graph_seconds``), stall / refresh time, and three wall times:
``train span`` (first training log row to the last row the workers log: the part the refresh mode can
change, free of Ray and worker start-up noise), ``run/wall_seconds`` (data, graph v0, worker start-up
and training) and the whole process (Ray start and stop too). Then the async/sync ratios.

A refresh still in flight when training ends is collected at teardown (``refresh/teardown_wait_seconds``);
it cost the trainer only its weight snapshot and is left out of the per-refresh stall figures (counted
as ``at teardown``).

Cross-check of the logged metric: the training loop always logs a row at an epoch's last step, and
refresh boundaries are chosen to fall on logged steps, so in sync mode the gap between the training row
logged at the boundary and the refresh row logged after the blocking wait is the stall measured from
timestamps (ms resolution; it also holds one MLflow write). It is printed beside the logged sync stall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smoke.yaml"


def run_job(mode: str, work: Path, epochs: int, every_steps: int) -> dict:
    """One ``hardbatch run`` in ``mode``; returns the parsed metric rows and the process wall time."""
    name = f"bench-{mode}"
    overrides = {
        "refresh.mode": mode, "train.epochs": epochs,
        "tracking.uri": f"sqlite:///{work / 'mlflow.db'}", "storage.path": str(work / "results"),
        "tracking.experiment": "bench-refresh", "tracking.run_name": name,
    }
    if every_steps:  # log at every boundary: the largest period <= 4 that divides it
        overrides.update({"refresh.every_steps": every_steps,
                          "train.log_every_steps": max(d for d in range(1, 5) if every_steps % d == 0)})
    else:
        overrides["refresh.every_epochs"] = 1
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(CONFIG)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    log = work / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stdout.write(log.read_text()[-4000:])
        raise SystemExit(f"{mode} run failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    rows = [json.loads(line) for line in (work / "results" / name / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "process_wall": wall}


def summarise(rows: list[dict]) -> dict:
    collected = [r for r in rows if "refresh/stall_seconds" in r]  # graph v0 (step 0) has no stall
    refreshes = [r for r in collected if "refresh/teardown_wait_seconds" not in r]
    stalls = [r["refresh/stall_seconds"] for r in refreshes]
    cost = [r["refresh/embed_seconds"] + r["refresh/graph_seconds"] for r in refreshes]
    wall = next(r["run/wall_seconds"] for r in rows if "run/wall_seconds" in r)
    worker_rows = [r for r in rows if "run/wall_seconds" not in r]
    first_train = min(r["time_ms"] for r in worker_rows if "train/loss" in r)
    span = (max(r["time_ms"] for r in worker_rows) - first_train) / 1000
    # training row at a boundary step -> refresh row logged at that step (sync: right after the wait)
    train_ms = {r["step"]: r["time_ms"] for r in rows if "train/loss" in r}
    gaps = [(r["time_ms"] - train_ms[r["step"]]) / 1000 for r in refreshes if r["step"] in train_ms]
    n = max(len(refreshes), 1)
    return {"n": len(refreshes), "stalls": stalls, "stall_mean": sum(stalls) / n, "stall_max": max(stalls, default=0.0),
            "cost_mean": sum(cost) / n, "frac": sum(stalls) / max(sum(cost), 1e-9), "wall": wall, "span": span,
            "gaps": gaps, "gap_mean": sum(gaps) / len(gaps) if gaps else float("nan"),
            "activations": [int(r["refresh/activate_step"]) for r in collected],
            "at_teardown": len(collected) - len(refreshes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, 2 refreshes per mode")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4, --quick 3)")
    parser.add_argument("--every-steps", type=int, default=0,
                        help="refresh every N steps instead of every epoch (11 steps per epoch)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 4)
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="hardbatch-bench-refresh-"))
    results, process_wall = {}, {}
    t0 = time.perf_counter()
    try:
        for mode in ("async", "sync"):
            print(f"running {mode} ...", flush=True)
            job = run_job(mode, work, epochs, args.every_steps)
            results[mode] = summarise(job["rows"])
            process_wall[mode] = job["process_wall"]
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    period = f"every {args.every_steps} steps" if args.every_steps else "every epoch"
    print(f"configs/smoke.yaml, {epochs} epochs, refresh {period}; cores={os.cpu_count()}, "
          f"load average before {load:.1f}; benchmark {time.perf_counter() - t0:.0f} s")
    print(f"{'mode':6s} {'refreshes':>9s} {'at teardown':>11s} {'stall mean s':>12s} {'stall max s':>11s} "
          f"{'refresh s':>9s} {'stall/refresh':>13s} {'sync gap s':>10s} {'train span s':>12s} "
          f"{'run wall s':>10s} {'process s':>9s}")
    for mode, r in results.items():
        gap = f"{r['gap_mean']:10.2f}" if mode == "sync" else f"{'-':>10s}"
        print(f"{mode:6s} {r['n']:9d} {r['at_teardown']:11d} {r['stall_mean']:12.3f} {r['stall_max']:11.3f} "
              f"{r['cost_mean']:9.2f} {r['frac']:13.3f} {gap} {r['span']:12.1f} {r['wall']:10.1f} "
              f"{process_wall[mode]:9.1f}")
    for mode, r in results.items():
        print(f"{mode}: stall per refresh (s) {', '.join(f'{s:.3f}' for s in r['stalls'])}; "
              f"activation steps {r['activations']}")
    a, s = results["async"], results["sync"]
    print(f"sync stall from timestamps per refresh (s): {', '.join(f'{g:.2f}' for g in s['gaps'])} "
          f"(logged: {', '.join(f'{v:.2f}' for v in s['stalls'])})")
    print(f"async/sync: stall per refresh {a['stall_mean'] / s['stall_mean']:.3f}; "
          f"train span {a['span'] / s['span']:.3f}; run wall {a['wall'] / s['wall']:.3f}; "
          f"process wall {process_wall['async'] / process_wall['sync']:.3f}")


if __name__ == "__main__":
    main()
