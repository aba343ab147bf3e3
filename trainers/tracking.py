"""MLflow logging from rank 0 only, that never kills training.

Every metric is appended to a local JSONL file first (the run's own record), then sent to MLflow.
Two ways to send:

* in the caller (the driver): a failed MLflow call is retried with back-off; if it still fails, the
  problem is reported once and the JSONL file keeps the metrics;
* from a background thread (``background=True``: rank 0 of the Train workers), so that training
  never waits for MLflow. The JSONL file is the buffer, on disk and bounded by the run's own record:
  the thread sends the lines of its ``source`` in order from a cursor (a byte offset kept in
  ``<file>.<source>.sent``), and while MLflow does not answer it keeps them and retries every few
  seconds; once the server is back every line reaches it, also across a restart of the process
  (the cursor is on disk). :func:`send_pending` sends what a stopped thread left.

A non-finite value (NaN, +-inf) is never dropped silently: it is kept in the JSONL line (as the
string ``"nan"``, ``"inf"`` or ``"-inf"``, under ``"nonfinite"``), the first one of each metric is
reported in a warning naming the metric, its value and step, and the running count of them is
logged as the metric ``tracking/nonfinite_metrics`` (absent while there are none).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_DB = "mlflow.db"
NONFINITE_METRIC = "tracking/nonfinite_metrics"
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def resolve_tracking_uri(uri: Optional[str], cwd: Optional[str] = None) -> str:
    """The tracking URI a job uses: ``uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite in ``cwd``.

    A relative sqlite path is made absolute, because Ray Train workers and job entrypoints change
    their working directory.
    """
    cwd = cwd or os.getcwd()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cwd, DEFAULT_DB)}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(cwd, uri[len(prefix):]).resolve())
    return uri


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """For an ``http(s)`` tracking URI: one request to the server, with the credentials MLflow itself
    would send (``$MLFLOW_TRACKING_USERNAME`` / ``$MLFLOW_TRACKING_PASSWORD``, else
    ``~/.mlflow/credentials``; a token, TLS settings), so that a server that does not answer or
    refuses the credentials is reported in one line before Ray starts, not as a stack trace after.

    Raises:
        ValueError: what is wrong and how to fix it.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/search", "GET", max_retries=0,
                                timeout=timeout_s, raise_on_status=False, params={"max_results": 1})
    except Exception as err:  # connection refused, DNS, TLS, timeout: MLflow wraps them
        reason = str(err).splitlines()[0][:200]
        raise ValueError(f"no MLflow server answers there ({reason}); start it, or fix the URI") from None
    if response.status_code in (401, 403):
        who = f"user {creds.username!r}" if creds.username else "a request without credentials"
        raise ValueError(f"the MLflow server refused {who} (HTTP {response.status_code}): set "
                         f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) "
                         f"to an account of that server")


def artifact_root_for(uri: str) -> Optional[str]:
    """Where artifacts of a new experiment go for a sqlite store: ``mlruns/`` beside the database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return Path(Path(uri[len(prefix):]).parent, "mlruns").as_uri()
    return None


PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: nests a run under its parent in the UI


def experiment_id_for(client, name: str, uri: str) -> str:
    """The id of MLflow experiment ``name``, created (artifacts per :func:`artifact_root_for`)
    when it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(uri))


BATCH_METRICS = 900  # metrics per log_batch call (MLflow accepts 1000)
LINE_KEYS = ("step", "time_ms", "nonfinite", "src")  # what a JSONL line holds beside its metrics


def _cursor_file(local_path: Path, source: str) -> Path:
    return local_path.with_name(f"{local_path.name}.{source}.sent")


def read_pending(local_path: Path, source: str, limit: int = BATCH_METRICS) -> tuple[list[dict[str, Any]], int, int]:
    """The next lines of ``source`` not yet sent, up to ``limit`` metrics: ``(lines, offset_after, cursor)``.

    Reads from the cursor on; a last line still being written (no newline yet) is left for later.
    Lines of other sources are skipped (and passed by the cursor).
    """
    cursor_file = _cursor_file(local_path, source)
    cursor = int(cursor_file.read_text()) if cursor_file.exists() else 0
    lines, count, offset = [], 0, cursor
    if not local_path.exists():
        return lines, offset, cursor
    with local_path.open("rb") as f:
        f.seek(cursor)
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            line = json.loads(raw)
            size = sum(1 for k in line if k not in LINE_KEYS)
            if line.get("src", "driver") == source:
                if lines and count + size > limit:
                    break
                lines.append(line)
                count += size
            offset += len(raw)
    return lines, offset, cursor


def send_lines(client, run_id: str, lines: list[dict[str, Any]]) -> None:
    """One ``log_batch`` with the finite metrics of these JSONL lines (their own steps and times)."""
    from mlflow.entities import Metric

    batch = [Metric(k, float(v), int(line["time_ms"]), int(line["step"]))
             for line in lines for k, v in line.items() if k not in LINE_KEYS]
    if batch:
        client.log_batch(run_id, metrics=batch)


def send_pending(tracking_uri: str, run_id: str, local_path: str | Path, source: str = "worker",
                 timeout_s: float = 30.0) -> int:
    """Send the lines of ``source`` that a :class:`RunTracker`'s thread left unsent (MLflow was down when
    it stopped), retrying for at most ``timeout_s``; returns how many lines are still unsent."""
    from mlflow.tracking import MlflowClient

    local_path = Path(local_path)
    client, deadline = MlflowClient(tracking_uri), time.monotonic() + timeout_s
    while True:
        try:
            send_all(client, run_id, local_path, source)
            return 0
        except Exception:
            if time.monotonic() > deadline:
                return count_pending(local_path, source)
            time.sleep(1.0)


def send_all(client, run_id: str, local_path: Path, source: str) -> int:
    """Send every pending line of ``source`` in batches, moving the cursor after each; returns the lines
    sent. An MLflow failure propagates, with the cursor after the last batch that got through."""
    sent = 0
    while True:
        lines, offset, cursor = read_pending(local_path, source)
        if offset == cursor:
            return sent
        send_lines(client, run_id, lines)
        _cursor_file(local_path, source).write_text(str(offset))
        sent += len(lines)


def count_pending(local_path: Path, source: str) -> int:
    """Lines of ``source`` in the JSONL file not yet sent to MLflow."""
    return len(read_pending(Path(local_path), source, limit=10**12)[0])


class RunTracker:
    """Logs to one MLflow run; a no-op when ``enabled`` is false (every rank but 0).

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: the run created by the driver.
        local_path: JSONL file that receives every metric, whatever MLflow does.
        enabled: whether this process logs at all.
        retries: attempts per MLflow call before giving up on that call (sending in the caller).
        background: send metrics and artifacts from a thread, the JSONL file as the buffer (needs
            ``local_path``); see the module docstring.
        source: the name of this process's lines in the JSONL file (``driver``, ``worker``).
        say: where the thread reports that MLflow stopped answering, and that it answers again.
    """

    def __init__(self, tracking_uri: str, run_id: str, local_path: Optional[str] = None,
                 enabled: bool = True, retries: int = 3, background: bool = False, source: str = "driver",
                 say: Optional[Callable[[str], None]] = None):
        self.enabled = enabled
        self.run_id = run_id
        self.retries = retries
        self.local_path = Path(local_path) if local_path else None
        self.source = source
        self._client = None
        self._uri = tracking_uri
        self._reported = False
        self.nonfinite = 0  # non-finite values seen so far (logged as NONFINITE_METRIC)
        self._nonfinite_keys: set[str] = set()  # the metrics already warned about
        self._sender: Optional[_Sender] = None
        if enabled and self.local_path:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
        if enabled:
            # MLflow's own HTTP retries default to 7 with exponential back-off (minutes of stall);
            # this class retries itself, so keep each attempt short unless the user chose otherwise.
            # The background thread retries every few seconds for as long as it takes: one try per
            # attempt, and a short timeout, so that a hung server is noticed and a revived one soon used.
            if background:
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        if enabled and background:
            if self.local_path is None:
                raise ValueError("a background RunTracker needs local_path (the JSONL file is its buffer)")
            self._sender = _Sender(self, say or (lambda message: warnings.warn(message, RuntimeWarning)))

    def close(self, timeout_s: float = 30.0) -> int:
        """Stop the background thread once everything is sent, waiting at most ``timeout_s``; returns the
        number of lines still unsent (they stay in the JSONL file: :func:`send_pending`). 0 without a thread."""
        if self._sender is None:
            return 0
        return self._sender.stop(timeout_s)

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self._uri)
        return self._client

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        clean = {k: v for k, v in values.items() if math.isfinite(v)}
        bad = {k: str(v) for k, v in values.items() if k not in clean}
        if bad:
            self.nonfinite += len(bad)
            clean[NONFINITE_METRIC] = float(self.nonfinite)
            new = sorted(set(bad) - self._nonfinite_keys)
            if new:
                self._nonfinite_keys.update(new)
                warnings.warn(f"non-finite metric at step {step}: "
                              f"{', '.join(f'{k} = {bad[k]}' for k in new)}; MLflow cannot chart it, so it is "
                              f"counted in {NONFINITE_METRIC} and kept in {self.local_path or 'no local file'}",
                              RuntimeWarning, stacklevel=2)
        now = int(time.time() * 1000)
        if self.local_path:
            line = {"step": step, "time_ms": now, **clean, **({"nonfinite": bad} if bad else {})}
            if self._sender is not None:
                line["src"] = self.source
            with self.local_path.open("a") as f:
                f.write(json.dumps(line) + "\n")  # one write: a whole line, or none
        if self._sender is not None:
            self._sender.wake()
            return
        from mlflow.entities import Metric

        batch = [Metric(k, v, now, step) for k, v in clean.items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=batch), "log_batch")

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            chunk = items[i:i + 90]
            self._call(lambda: self.client.log_batch(self.run_id, params=chunk), "log_params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for k, v in tags.items():
            self._call(lambda: self.client.set_tag(self.run_id, k, str(v)), "set_tag")

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if self._sender is not None:  # after the metrics logged so far, from the thread
            self._sender.artifacts.append((path, artifact_path))
            self._sender.wake()
            return
        self._call(lambda: self.client.log_artifact(self.run_id, path, artifact_path), "log_artifact")

    def _call(self, fn, what: str) -> None:
        delay = 0.2
        for attempt in range(self.retries):
            try:
                fn()
                return
            except Exception as err:  # tracking must never take training down
                if attempt == self.retries - 1:
                    if not self._reported:
                        warnings.warn(f"MLflow {what} failed after {self.retries} attempts ({err!r}); "
                                      f"training continues, metrics stay in {self.local_path}")
                        self._reported = True
                    return
                time.sleep(delay)
                delay *= 2


class _Sender:
    """The background thread of a :class:`RunTracker`: sends the JSONL lines of its source (then the
    queued artifacts) whenever woken or every ``poll_s``; while MLflow fails it keeps everything and
    retries every ``retry_s`` seconds, saying once that MLflow stopped answering and once that it is
    back. The training thread never waits for it."""

    def __init__(self, tracker: RunTracker, say: Callable[[str], None], poll_s: float = 2.0, retry_s: float = 3.0):
        self.tracker, self.say, self.poll_s, self.retry_s = tracker, say, poll_s, retry_s
        self.artifacts: list[tuple[str, Optional[str]]] = []
        self.down_since: Optional[float] = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._abandon = False  # set by stop() when its time is up
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float) -> int:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abandon = True  # MLflow still down: what is left stays in the JSONL file
            return count_pending(self.tracker.local_path, self.tracker.source)
        return 0

    def _run(self) -> None:
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            done = self._flush()
            if (self._stop.is_set() and done) or self._abandon:
                return
            if not done:  # MLflow failed: keep everything, try again in a while (sooner when stopping)
                if self._stop.is_set():
                    time.sleep(1.0)
                else:
                    self._stop.wait(self.retry_s)

    def _flush(self) -> bool:
        """Send everything pending; False when MLflow failed (nothing is lost: the cursor stays)."""
        path, source = self.tracker.local_path, self.tracker.source
        try:
            send_all(self.tracker.client, self.tracker.run_id, path, source)
            while self.artifacts:
                local, artifact_path = self.artifacts[0]
                self.tracker.client.log_artifact(self.tracker.run_id, local, artifact_path)
                self.artifacts.pop(0)
        except Exception as err:  # tracking must never take training down
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.say(f"MLflow stopped answering ({str(err).splitlines()[0][:160]}); training goes on, metrics "
                         f"wait in {path} and are sent when it answers again")
            return False
        if self.down_since is not None:
            self.say(f"MLflow answers again after {time.monotonic() - self.down_since:.0f} s; the metrics logged "
                     f"meanwhile were sent")
            self.down_since = None
        return True
