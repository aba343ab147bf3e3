"""The private local Ray of ``hardbatch run`` (``pipelines.run.init_ray``) with another Ray on the machine."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from _procs import run_cli

ROOT = Path(__file__).resolve().parents[2]

# What Ray Train's PlacementGroupCleaner does every second of a run: ask the state API, with no
# address, about an actor of its own cluster. With two Rays on the machine Ray's auto-detection
# finds both ("Found multiple active Ray instances") and the cleaner's thread dies with a traceback
# in the run's console (CI, stop 22), or it finds the other one.
PROBE = textwrap.dedent("""
    import os
    import ray
    from pipelines.config import load_config
    from pipelines.run import init_ray

    init_ray(load_config("configs/digits.yaml"))
    own = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]

    @ray.remote(num_cpus=0)
    class Probe:
        def look(self):
            from ray.util.state import get_actor
            me = ray.get_runtime_context().get_actor_id()
            found = get_actor(me, timeout=30)
            return os.environ.get("RAY_ADDRESS"), found.state if found else None

    address, state = ray.get(Probe.remote().look.remote(), timeout=120)
    print("RESULT", own, address, state, os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_GCS_SERVER_PORT"))
    ray.shutdown()
""")


@pytest.mark.timeout(240)
def test_the_state_api_inside_a_local_run_finds_its_own_ray(ray_head):
    """With the session's head running, an actor of a run's local Ray reaches its own GCS by
    ``RAY_ADDRESS``; the driver's own environment is left as it was."""
    proc = run_cli([sys.executable, "-c", PROBE], cwd=ROOT, timeout=200)  # a timeout fails with the output tail
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    _, own_port, address, state, driver_address, driver_port = line.split()
    assert address == f"127.0.0.1:{own_port}", line
    assert ray_head.address != address and state == "ALIVE", line
    assert driver_address == "None" and driver_port == "None", line  # nothing leaks into the driver
