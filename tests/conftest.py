"""Shared fixtures: one Ray head for the whole test session.

Every Ray of the session uses token authentication with one token made here, passed in the
environment (``RAY_AUTH_TOKEN``), so neither the user's ``~/.ray`` nor a cluster already running on
the machine is touched. :func:`ray_head` is a real ``ray start --head`` bound to 127.0.0.1 on free
ports with a private temp dir; the integration tests' driver (:func:`ray_local`) and the
end-to-end jobs connect to it, so Ray starts once, not once per module or job. Only the processes
of that head (its session) are stopped at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
# Set before anything imports Ray: Ray reads its auth mode once, at import.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.pop("RAY_ADDRESS", None)  # a cluster in the caller's shell must not capture the tests
# No usage reporting from the tests' Rays. It also keeps Ray Data's usage poller (a daemon thread of
# this process, polling the head's metrics) from printing a traceback at exit once the head is gone.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from _procs import free_port, stop_session  # noqa: E402  (tests/e2e is on the pytest pythonpath)

BIN = Path(sys.executable).parent  # the venv's ray, hardbatch, mlflow


@dataclass(frozen=True)
class Head:
    """A running Ray head: its GCS address, its dashboard (Jobs API) URL and its temp dir."""

    address: str
    dashboard: str
    temp_dir: Path
    num_cpus: int


@pytest.fixture(scope="session")
def ray_head():
    """``ray start --head`` on 127.0.0.1 (2 CPUs, 1 GiB object store, token auth) for the session."""
    temp = Path(tempfile.mkdtemp(prefix="hbray", dir="/tmp"))  # short: Ray's unix socket paths
    port, dashboard_port = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--port", str(port), "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--num-cpus", "2", "--object-store-memory", str(1024 * 1024 * 1024),
           "--temp-dir", str(temp / "ray"), "--disable-usage-stats"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(cmd, env=env, cwd=temp, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out[-3000:]
        yield Head(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}",
                   temp_dir=temp / "ray", num_cpus=2)
    finally:
        if head.poll() is None:
            head.kill()
            head.wait()
        # `ray start` made the session; the head's daemons and workers stay in it. Some of them outlast a
        # SIGTERM by more than 10 s (12 s of the suite's teardown), and nothing of a test head needs saving.
        stop_session(head.pid, grace_s=2.0)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(ray_head):
    """This process as a driver of the session's head (namespace ``hardbatch-tests``)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head.address, namespace="hardbatch-tests", log_to_driver=False)
    yield ray
    ray.shutdown()


_NO_GPU: list[str] = []


def _uses_head(item) -> bool:
    return bool({"ray_head", "ray_local"} & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config, items):
    """Tests that need no Ray head run first (in their usual order), then those of the session's
    head: the head starts at its first use and stays to the end, and its idle processes take about
    0.07 of a core, which the head-free tests (the runs on their own local Ray above all) then keep.

    Tests marked ``gpu`` need a CUDA device: where none is visible they are deselected (not run,
    not counted as passed) and the end of the run says so."""
    items.sort(key=_uses_head)  # stable: the order within each group is kept
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    _NO_GPU.extend(item.nodeid for item in items if item.get_closest_marker("gpu"))
    config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu")])
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_terminal_summary(terminalreporter):
    if _NO_GPU:
        terminalreporter.write_line(f"{len(_NO_GPU)} GPU tests not run: no CUDA device here "
                                    f"(bench/gpu_check.sh runs them on a GPU machine)")
