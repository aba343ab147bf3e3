"""Ray Train callbacks. They run in the Train controller, which loads this module to unpickle them:
it imports Ray Train and the progress relay only, so the controller never imports torch, torchvision
or the training code for them (seconds of CPU and hundreds of MB per run on a small machine)."""

from __future__ import annotations

from typing import Optional

import ray.train

from trainers.progress import ProgressPoster


class FailureReporter(ray.train.UserCallback):
    """Posts each worker failure and its cause to the run's progress relay, so the console shows
    why the worker group restarts (or why the run ends)."""

    def __init__(self, relay_name: Optional[str]):
        self.relay_name = relay_name

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        errors = {int(rank): f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                  for rank, err in worker_exceptions.items()}
        ProgressPoster(self.relay_name).post("failure", errors=errors)
