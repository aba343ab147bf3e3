"""Ray Train callbacks. They run in the Train controller, which loads this module to unpickle them:
it imports Ray Train and the progress relay only, so the controller never imports torch, torchvision
or the training code for them (seconds of CPU and hundreds of MB per run on a small machine)."""

from __future__ import annotations

from typing import Optional

import ray.train

from trainers.progress import ProgressPoster


def error_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it): how the console and a
    failed run's summary name an error."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:limit] if text else ''}"


class FailureReporter(ray.train.UserCallback):
    """Posts each worker failure and its cause to the run's progress relay, so the console shows
    why the worker group restarts (or why the run ends)."""

    def __init__(self, relay_name: Optional[str]):
        self.relay_name = relay_name

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        errors = {int(rank): error_line(err) for rank, err in worker_exceptions.items()}
        ProgressPoster(self.relay_name).post("failure", errors=errors)
