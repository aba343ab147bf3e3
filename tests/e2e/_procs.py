"""Process helpers shared by the end-to-end tests that start servers (a Ray head, an MLflow server)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional

from pipelines.run import free_loopback_port as free_port  # noqa: F401  (re-exported for the tests)


def session_members(sid: int) -> list[int]:
    """The live processes of the session ``sid`` (zombies left out: they only wait to be reaped).

    Every command a test starts gets a session of its own (``start_new_session=True``), so its
    session is exactly what it started: the driver, the local Ray it brought up, and Ray's workers,
    which raylet puts in process groups of their own (a ``killpg`` of the driver's group misses them,
    and a killed run's Train controller can go on writing its checkpoint snapshot for a moment).
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) != sid:
                continue
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue  # ended while we looked
        if state != "Z":
            members.append(pid)
    return members


def signal_session(sid: int, sig: int) -> None:
    """Send ``sig`` to every live process of the session ``sid``, each by its PID."""
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def session_gone(sid: int, leader: Optional[subprocess.Popen] = None) -> bool:
    """Whether no live process of the session ``sid`` is left (``leader``, when it is this
    process's child, is reaped on the way)."""
    if leader is not None:
        leader.poll()
    return not session_members(sid)


def stop_session(sid: int, grace_s: float = 10.0, leader: Optional[subprocess.Popen] = None) -> None:
    """SIGTERM every process of the session ``sid`` a test started (:func:`session_members`), then
    SIGKILL what is left after ``grace_s``; returns once none is left, or 10 s after the SIGKILL.

    ``leader``, the session's first process when it is this process's child, is reaped on the way
    (a zombie does not count, but its PID would).
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        signal_session(sid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if session_gone(sid, leader):
                return
            time.sleep(0.2)


def private_env() -> dict[str, str]:
    """This process's environment without RAY_ADDRESS and MLFLOW_TRACKING_URI, so a command under
    test starts its own local Ray and logs where its config says, whatever the caller's shell has."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


def run_cli(cmd: list[str], *, timeout: float, env: Optional[dict[str, str]] = None,
            **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new session, with
    ``env`` (default :func:`private_env`).

    On timeout the whole session is stopped (the driver and the local Ray it started: killing
    only the driver leaves raylet and its agents running) and the test fails with the tail of
    what the command printed, so a slow or stuck run shows where it was.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=private_env() if env is None else env, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc.pid, leader=proc)
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
