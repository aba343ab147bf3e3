"""`hardbatch run` refuses what it can check before Ray starts: an unusable storage path, and the
name of a run that already finished (re-running a name otherwise resumes that run).

Whether Ray started is a property of a fresh interpreter, so both refusals run in one process of
their own, one after the other.
"""

from __future__ import annotations

import json
import subprocess
import sys

from mlflow.tracking import MlflowClient

PROBE = """
import json, sys, ray
from pipelines.cli import main
for args in json.loads(sys.argv[1]):
    rc = main(args)
    print(f"rc={rc} ray_started={ray.is_initialized()}", flush=True)
    print("--- end of case", file=sys.stderr, flush=True)
"""


def test_unusable_storage_path_and_finished_run_name_are_refused_before_ray(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("hardbatch-smoke"), run_name="done")
    client.set_terminated(run.info.run_id, status="FINISHED")
    run_dir = tmp_path / "results" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))

    base = ["run", "configs/smoke.yaml", "--set", f"tracking.uri={uri}"]
    cases = [base + ["--set", f"storage.path={blocker}"],
             base + ["--set", f"storage.path={tmp_path / 'results'}", "--set", "tracking.run_name=done"]]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    assert proc.stdout.splitlines() == ["rc=2 ray_started=False"] * 2, proc.stdout + proc.stderr
    storage, finished, _ = proc.stderr.split("--- end of case\n")
    assert f"hardbatch: config error: storage.path = '{blocker}': cannot create" in storage
    assert "tracking.run_name = 'done': that run already finished" in finished
    assert "Traceback" not in proc.stderr
