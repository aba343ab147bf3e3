"""What a run tells its user while it trains: events from the workers, printed by the driver.

Ray forwards every worker's stdout to the driver with a ``(RayTrainWorker pid=...)`` prefix and
interleaves it with Ray's own lines. Instead, rank 0 (and the refresher) *post* small events to a
:class:`ProgressRelay` actor owned by the driver, and the driver alone prints them
(:mod:`pipelines.console`): one progress display, the epoch's evaluation, refresh events, restarts
and warnings, whatever Ray prints.

An event is a plain dict with a ``kind`` and its fields:

===========  ===============================================================================
``window``   a logging window of training: ``epoch``, ``step`` (steps done), ``steps`` and
             ``seconds`` (the window's length), ``loss``, ``samples_per_s``, ``version`` (the
             active graph version, -1 for none)
``epoch``    an epoch ended: ``epoch`` (0-based), ``step``, ``metrics`` (the evaluation)
``refresh``  a graph version landed: ``version``, ``activate_step``, ``embed_seconds``,
             ``graph_seconds``, ``stall_seconds``
``start``    the worker group (re)started: ``epoch``, the first epoch it trains (> 0: resumed from
             the checkpoint of the epoch before)
``failure``  workers failed (posted by the Train controller's callback): ``errors``, rank ->
             ``"ExceptionType: first line"``
``warning``  something the user should know: ``message``
===========  ===============================================================================

Posting never blocks and never raises: progress display must not take training down.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Optional

import ray


@ray.remote(num_cpus=0)
class ProgressRelay:
    """A mailbox of events: workers :meth:`post`, the driver :meth:`take` s them in order."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def take(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


class ProgressPoster:
    """Fire-and-forget posting to the named relay; a no-op when ``enabled`` is false (ranks > 0)
    or when no relay is named (unit tests, tools).

    Args:
        relay_name: the relay actor's name in the job's namespace, or ``None``.
        enabled: whether this process posts at all.
    """

    def __init__(self, relay_name: Optional[str], enabled: bool = True):
        self._relay = None
        if enabled and relay_name:
            try:
                self._relay = ray.get_actor(relay_name)
            except ValueError:  # the driver is gone or never made one: post nothing
                self._relay = None

    def post(self, kind: str, **fields: Any) -> None:
        if self._relay is None:
            return
        try:
            self._relay.post.remote({"kind": kind, **fields})
        except Exception:  # noqa: BLE001 - a display problem must never stop training
            self._relay = None


VERBOSE_ENV = "HARDBATCH_VERBOSE"  # "1": keep Ray's and MLflow's INFO lines (``--verbose``)

# Loggers whose INFO lines are Ray's or MLflow's internals (dataset execution plans, worker-group
# start-up, per-report checkpoint lines, database migrations), not the run's progress.
_CHATTY = ("ray", "ray.train", "mlflow")


def is_verbose() -> bool:
    """Whether this process (or the driver that started it) was asked for ``--verbose``."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_logging(verbose: Optional[bool] = None, ray_data: bool = False) -> None:
    """Turn the INFO lines of Ray's and MLflow's loggers down to WARNING in this process, unless
    ``verbose`` (default: :func:`is_verbose`). Warnings and errors still show.

    MLflow reads ``MLFLOW_LOGGING_LEVEL`` when it is imported, so that is set too. Ray Data
    configures its ``ray.data`` logger when it is imported (DEBUG, with a console handler at INFO
    and a file handler): ``ray_data`` imports it and turns only the console handler down, so the
    session's ``ray-data.log`` keeps everything. A few Ray Train modules log through loggers named
    by their file path (``logging.getLogger(__file__)``), outside the ``ray`` hierarchy; those
    already created are turned down as well.
    """
    if is_verbose() if verbose is None else verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # each failed attempt of an MLflow call while its server is down (the tracker reports the outage once)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    if ray_data:
        importlib.import_module("ray.data")  # configures the 'ray.data' logger on first import

        for handler in logging.getLogger("ray.data").handlers:
            if handler.name == "console":
                handler.setLevel(logging.WARNING)
    ray_dir = os.path.dirname(ray.__file__)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(ray_dir) and name.endswith(".py"):
            logging.getLogger(name).setLevel(logging.WARNING)
