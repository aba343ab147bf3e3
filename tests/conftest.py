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
from typing import Optional

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


_NO_GPU: list[str] = []  # the GPU tests this process's collection deselected
_NO_GPU_IN_WORKERS: list[int] = []  # under pytest-xdist, the controller: how many each worker deselected


def _uses_head(item) -> bool:
    return bool({"ray_head", "ray_local"} & set(getattr(item, "fixturenames", ())))


def _is_job(nodeid: str) -> bool:
    """Whether a test is one of the end-to-end jobs (``tests/e2e``)."""
    return nodeid.startswith("tests/e2e/")


def _worker() -> Optional[str]:
    """This process's pytest-xdist worker id (``gw0``, ...), or ``None`` when pytest runs alone."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config):
    """Under pytest-xdist (``make test``: ``-n 2``) one worker runs the end-to-end jobs while the other
    runs the rest. Both share the machine's cores with the jobs' processes, so torch computes on one
    thread in the workers themselves: two OpenMP threads on a machine already busy spin at each
    barrier for the one that was descheduled (a 2-second unit test took 30 s so). The jobs' own
    processes are untouched (their threads are the run's configuration)."""
    if _worker() is not None:
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown where xdist is not loaded
def pytest_xdist_make_scheduler(config, log):
    """The scheduler of ``-n N``: the end-to-end jobs (``tests/e2e``) are one unit of work, which one
    worker runs first to last (in file order, on its one Ray head); every other test module is a unit
    of its own (its module fixtures set up once), handed to whichever worker is free. The jobs come
    first in the collection (:func:`pytest_collection_modifyitems`) and the units are taken in that
    order, so the jobs, the longest unit by far, start at once."""
    from xdist.scheduler import LoadScopeScheduling

    class JobsApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/e2e" if _is_job(nodeid) else nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep the collection's order (not the largest unit first)
    return JobsApart(config, log)


def pytest_collection_modifyitems(config, items):
    """Run alone, tests that need no Ray head run first (in their usual order), then those of the
    session's head: the head starts at its first use and stays to the end, and its idle processes take
    about 0.07 of a core, which the head-free tests (the runs on their own local Ray above all) then keep.
    Under pytest-xdist the end-to-end jobs come first (:func:`pytest_xdist_make_scheduler`).

    Tests marked ``gpu`` need a CUDA device: where none is visible they are deselected (not run,
    not counted as passed) and the end of the run says so."""
    items.sort(key=_uses_head)  # stable: the order within each group is kept
    if _worker() is not None:
        items.sort(key=lambda item: not _is_job(item.nodeid))
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    _NO_GPU.extend(item.nodeid for item in items if item.get_closest_marker("gpu"))
    config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu")])
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_sessionfinish(session):
    if _worker() is not None and hasattr(session.config, "workeroutput"):
        session.config.workeroutput["no_gpu"] = len(_NO_GPU)  # read by the controller (below)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown where xdist is not loaded
def pytest_testnodedown(node, error):
    """pytest-xdist's controller (which collects nothing itself): a worker ended, with its count."""
    _NO_GPU_IN_WORKERS.append(getattr(node, "workeroutput", {}).get("no_gpu", 0))


def pytest_terminal_summary(terminalreporter):
    count = max([len(_NO_GPU), *_NO_GPU_IN_WORKERS])  # every worker collects (and deselects) the same
    if count:
        terminalreporter.write_line(f"{count} GPU tests not run: no CUDA device here "
                                    f"(bench/gpu_check.sh runs them on a GPU machine)")
