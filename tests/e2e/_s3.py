"""A real S3-protocol server on 127.0.0.1 for tests: ``moto_server`` (package ``moto[server]``).

    with moto_s3() as s3:              # s3.endpoint = "http://127.0.0.1:PORT"
        s3.upload_dir(local_dir, "bucket/prefix")

Credentials are the dummy ``testing`` pair, exported by :meth:`MotoS3.env` for subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from _procs import free_port, stop_session

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def moto_command() -> list[str]:
    beside = Path(sys.executable).with_name("moto_server")
    exe = str(beside) if beside.exists() else shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]' (the dev extra has it)")
    return [exe]


class MotoS3:
    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                                 allow_bucket_creation=True)

    def upload_dir(self, local: Path, target: str) -> int:
        """Copy every file under ``local`` to ``bucket/prefix`` (creating the bucket); returns the count."""
        fs = self.filesystem()
        fs.create_dir(target.split("/", 1)[0])
        count = 0
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                with fs.open_output_stream(f"{target}/{path.relative_to(local).as_posix()}") as out:
                    out.write(path.read_bytes())
                count += 1
        return count

    def env(self) -> dict[str, str]:
        """Environment variables a client needs: the dummy credentials (the endpoint goes in the config)."""
        return dict(CREDENTIALS)


@contextlib.contextmanager
def moto_s3(timeout: float = 30.0) -> Iterator[MotoS3]:
    """Start ``moto_server -H 127.0.0.1 -p PORT``, wait until it answers, stop it (and its session) after."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([*moto_command(), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **CREDENTIALS})
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.2)
        yield MotoS3(port)
    finally:
        stop_session(proc.pid, grace_s=5.0, leader=proc)
