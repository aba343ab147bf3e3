"""The run's console: a quiet, informative display on the driver.

By default a run prints only what its user needs: one progress display (a live bar on a terminal,
a line per epoch in a log), the epoch's evaluation, graph refreshes, restarts with their cause,
warnings, and the final summary. Ray's and MLflow's internal INFO lines are turned down at their
source (:func:`trainers.progress.quiet_logging`), and a short list of Ray lines known to be
harmless (:data:`HARMLESS`) is dropped from what Ray forwards from worker processes. Anything else a
worker prints, errors and tracebacks included, still reaches the console. ``--verbose`` keeps
everything.

Events come from the workers through a :class:`~trainers.progress.ProgressRelay`; a
:class:`ConsolePump` thread takes them and a :class:`Console` prints them.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

# Lines Ray forwards from worker processes that say nothing a user can act on.
HARMLESS = (
    # Ray-internal actors (Ray Data's map workers, Train's preemption watcher) are created with
    # constructor arguments in the object store; hardbatch's own actors are not
    # (https://github.com/ray-project/ray/issues/53727).
    re.compile(r"core_worker\.cc:\d+: Actor .* has constructor arguments in the object store and max_restarts > 0"),
)
# Whole batches of lines (a traceback) from one Ray-internal actor, dropped when one line matches.
HARMLESS_BATCHES = (
    # Train's placement-group cleaner asks the state API for its controller without an address; with
    # a second Ray instance on the machine (another job, a test head) the lookup raises and the
    # monitor thread ends. Only that watchdog stops; the run's resources are freed when it ends.
    ("PlacementGroupCleaner", re.compile(r"ConnectionError: Found multiple active Ray instances")),
)

# Evaluation metrics shown on the epoch line, in this order, when present.
HEADLINE = ("eval/knn_acc", "eval/accuracy", "eval/ece", "eval/retrieval_acc", "eval/linear_acc",
            "sampler/hardness", "sampler/same_class_rate")


def prefixed(message: str) -> str:
    return f"[hardbatch] {message}"


def say(message: str, stream: Optional[TextIO] = None) -> None:
    """One line of the driver's own, flushed at once."""
    stream = stream or sys.stdout
    stream.write(prefixed(message) + "\n")
    stream.flush()


def clock(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def drop_harmless_worker_lines() -> bool:
    """Filter :data:`HARMLESS` lines (and :data:`HARMLESS_BATCHES`) out of what Ray forwards from
    workers to this driver.

    Ray prints worker output through a handler named ``ray_print_logs`` on its stdstream dispatcher
    (``ray._private.ray_logging``, Ray 2.60); this wraps that handler. Returns whether the filter
    is in place (``False`` when Ray forwards nothing, or its internals changed: then every line
    is printed, as with ``--verbose``).
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    handlers = dict(dispatcher.handlers)
    original = handlers.get("ray_print_logs")
    if original is None or getattr(original, "hardbatch_filter", False):
        return original is not None

    def filtered(data: dict[str, Any]) -> None:
        lines = data.get("lines", ())
        for actor, pattern in HARMLESS_BATCHES:
            if data.get("actor_name") == actor and any(pattern.search(line) for line in lines):
                return
        lines = [line for line in lines if not any(p.search(line) for p in HARMLESS)]
        if lines:
            original({**data, "lines": lines})

    filtered.hardbatch_filter = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)
    return True


class Console:
    """Formats the events of one run (:mod:`trainers.progress`) as console lines.

    Args:
        epochs: epochs of the run.
        steps_per_epoch: steps of one epoch.
        batch_size: global batch (samples per step).
        stream: where lines go (default stdout).
        live: redraw one progress bar in place (default: when ``stream`` is a terminal); otherwise
            one line per epoch.
        now: the clock (tests pass a fake one).
    """

    BAR = 24

    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, stream: Optional[TextIO] = None,
                 live: Optional[bool] = None, now: Callable[[], float] = time.monotonic):
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.total = epochs * steps_per_epoch
        self.batch_size = batch_size
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.now = now
        self.started: Optional[float] = None
        self.first_step = 0  # a resumed run starts counting its speed here
        self._epoch_windows: list[dict[str, Any]] = []
        self._drawn = False  # a live bar is on the current line
        self._failed = False  # a worker failure was reported

    # -- events ------------------------------------------------------------------------------------
    def handle(self, event: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event.get('kind')}", None)
        if handler is not None:
            handler(event)

    def _on_window(self, event: dict[str, Any]) -> None:
        self._start(event["step"] - event.get("steps", 1), event.get("seconds", 0.0))
        self._epoch_windows.append(event)
        if self.live:
            self._draw(self._status(event["epoch"], event["step"], self._mean_loss(), event["samples_per_s"],
                                    event["version"], bar=True))

    def _on_epoch(self, event: dict[str, Any]) -> None:
        self._start(event["step"] - self.steps_per_epoch, 0.0)
        windows, self._epoch_windows = self._epoch_windows, []
        loss = self._mean_loss(windows)
        speed = sum(w["samples_per_s"] for w in windows) / len(windows) if windows else None
        version = windows[-1]["version"] if windows else None
        self._line(self._status(event["epoch"], event["step"], loss, speed, version, bar=False))
        shown = [f"{key} {event['metrics'][key]:.4f}" for key in HEADLINE if key in event.get("metrics", {})]
        if shown:
            self._line("  " + "  ".join(shown))

    def _on_refresh(self, event: dict[str, Any]) -> None:
        text = (f"graph v{event['version']} ready: embedding {event['embed_seconds']:.1f} s, "
                f"build {event['graph_seconds']:.2f} s; ")
        if event["activate_step"] >= self.total:
            text += "it landed after the last step (kept on disk, not used)"
        else:
            text += f"active from step {event['activate_step']}"
        if event.get("stall_seconds") is not None:
            text += f" (training stalled {event['stall_seconds']:.2f} s)"
        self._line(text)

    def _on_start(self, event: dict[str, Any]) -> None:
        self.started, self.first_step = None, event["epoch"] * self.steps_per_epoch
        self._epoch_windows = []
        if event["epoch"] > 0:
            self._line(f"resuming from the checkpoint of epoch {event['epoch']}: training epochs "
                       f"{event['epoch'] + 1}..{self.epochs}")
        elif self._failed:
            self._line("restarting from the first epoch: no checkpoint had been saved yet")

    def _on_failure(self, event: dict[str, Any]) -> None:
        self._failed = True
        # a dead process is the cause; the other ranks' collective errors ("connection reset") follow
        died = ("ActorDiedError", "WorkerHealthCheckFailedError")
        errors = sorted(event["errors"].items(), key=lambda item: (not item[1].startswith(died), int(item[0])))
        self._line("worker failure: " + "; ".join(f"rank {rank} {error}" for rank, error in errors)
                   + " (Ray Train restarts the worker group from the last checkpoint while train.max_failures allows)")

    def _on_warning(self, event: dict[str, Any]) -> None:
        self._line(f"warning: {event['message']}")

    # -- formatting --------------------------------------------------------------------------------
    def _start(self, step: int, seconds: float) -> None:
        """Start the clock at the first event: ``step`` steps were done ``seconds`` before it."""
        if self.started is None:
            self.started, self.first_step = self.now() - seconds, max(step, 0)

    def _mean_loss(self, windows: Optional[list[dict[str, Any]]] = None) -> Optional[float]:
        windows = self._epoch_windows if windows is None else windows
        steps = sum(w.get("steps", 1) for w in windows)
        return sum(w["loss"] * w.get("steps", 1) for w in windows) / steps if steps else None

    def _status(self, epoch: int, step: int, loss: Optional[float], speed: Optional[float],
                version: Optional[int], bar: bool) -> str:
        elapsed = self.now() - (self.started if self.started is not None else self.now())
        done = step - self.first_step
        eta = elapsed / done * (self.total - step) if done > 0 else None
        width = len(str(self.total))
        parts = [f"epoch {epoch + 1:>{len(str(self.epochs))}}/{self.epochs}"]
        if bar:
            filled = int(self.BAR * step / self.total) if self.total else self.BAR
            parts.append("[" + "#" * filled + "." * (self.BAR - filled) + "]")
        parts.append(f"step {step:>{width}}/{self.total}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if speed is not None:
            parts.append(f"{speed:.0f} samples/s")
        if version is not None:
            parts.append(f"graph v{version}" if version >= 0 else "no graph")
        parts.append(f"{clock(elapsed)} elapsed")
        if eta is not None and step < self.total:
            parts.append(f"ETA {clock(eta)}")
        return "  ".join(parts)

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + prefixed(text) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def _line(self, text: str) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
        say(text, self.stream)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class ConsolePump:
    """A daemon thread that takes the relay's events every ``period`` seconds and hands them to a
    :class:`Console`; :meth:`stop` takes the last ones.

    Args:
        relay: a :class:`~trainers.progress.ProgressRelay` handle.
        console: the console that prints them.
        period: seconds between polls.
    """

    def __init__(self, relay, console: Console, period: float = 0.5):
        self.relay = relay
        self.console = console
        self.period = period
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hardbatch-console", daemon=True)

    def start(self) -> "ConsolePump":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.drain()

    def drain(self) -> None:
        import ray

        with self._lock:
            try:
                events = ray.get(self.relay.take.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the relay died with the run: nothing more to show
                return
            for event in events:
                self.console.handle(event)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.drain()
        self.console.close()
