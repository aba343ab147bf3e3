"""MLflow logging from rank 0 only, that never kills training.

Every metric is appended to a local JSONL file first (the run's own record), then sent to MLflow.
A failed MLflow call is retried with back-off; if it still fails, the problem is reported once and
training goes on; the JSONL file keeps everything.

A non-finite value (NaN, +-inf) is never dropped silently: it is kept in the JSONL line (as the
string ``"nan"``, ``"inf"`` or ``"-inf"``, under ``"nonfinite"``), the first one of each metric is
reported in a warning naming the metric, its value and step, and the running count of them is
logged as the metric ``tracking/nonfinite_metrics`` (absent while there are none).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

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


class RunTracker:
    """Logs to one MLflow run; a no-op when ``enabled`` is false (every rank but 0).

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: the run created by the driver.
        local_path: JSONL file that receives every metric, whatever MLflow does.
        enabled: whether this process logs at all.
        retries: attempts per MLflow call before giving up on that call.
    """

    def __init__(self, tracking_uri: str, run_id: str, local_path: Optional[str] = None,
                 enabled: bool = True, retries: int = 3):
        self.enabled = enabled
        self.run_id = run_id
        self.retries = retries
        self.local_path = Path(local_path) if local_path else None
        self._client = None
        self._uri = tracking_uri
        self._reported = False
        self.nonfinite = 0  # non-finite values seen so far (logged as NONFINITE_METRIC)
        self._nonfinite_keys: set[str] = set()  # the metrics already warned about
        if enabled and self.local_path:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
        if enabled:
            # MLflow's own HTTP retries default to 7 with exponential back-off (minutes of stall);
            # this class retries itself, so keep each attempt short unless the user chose otherwise.
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

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
            with self.local_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
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
