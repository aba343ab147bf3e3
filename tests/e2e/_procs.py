"""Process helpers shared by the end-to-end tests that start servers (a Ray head, an MLflow server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Optional


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
