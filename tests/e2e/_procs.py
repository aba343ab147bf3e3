"""Process helpers shared by the end-to-end tests that start servers (a Ray head, an MLflow server)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional

from pipelines.run import free_loopback_port as free_port  # noqa: F401  (re-exported for the tests)


def stop_group(pgid: int, grace_s: float = 10.0, leader: Optional[subprocess.Popen] = None) -> None:
    """SIGTERM every process of the group ``pgid``, then SIGKILL what is left after ``grace_s``.

    ``leader``, the group's first process when it is this process's child, is reaped on the way
    (a zombie would still count as a member of the group).
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if leader is not None:
                leader.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def private_env() -> dict[str, str]:
    """This process's environment without RAY_ADDRESS and MLFLOW_TRACKING_URI, so a command under
    test starts its own local Ray and logs where its config says, whatever the caller's shell has."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


def run_cli(cmd: list[str], *, timeout: float, env: Optional[dict[str, str]] = None,
            **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new process group, with
    ``env`` (default :func:`private_env`).

    On timeout the whole group is stopped (the driver and the local Ray it started: killing
    only the driver leaves raylet and its agents running) and the test fails with the tail of
    what the command printed, so a slow or stuck run shows where it was.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=private_env() if env is None else env, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid, leader=proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:4])} ... still running after {timeout:.0f} s; "
                             f"stdout tail:\n{out[-3000:]}\nstderr tail:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def head_env(head) -> dict[str, str]:
    """:func:`private_env` pointed at the session's Ray head (``tests/conftest.py``): a command
    under test joins it instead of starting a Ray of its own."""
    return {**private_env(), "RAY_ADDRESS": head.address}


def wait_for(condition, timeout: float, what: str, proc: Optional[subprocess.Popen] = None,
             period: float = 0.5) -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout`` seconds naming ``what``, or as
    soon as ``proc`` (a command under test) has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(period)
