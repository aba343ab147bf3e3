"""The graph-refresh protocol: when a version is made, when it becomes active, what a restart keeps.

A pure core (no Ray, no clock); the Ray shells are the trainer's refresh caller
(:class:`trainers.loop._RefreshCaller`), the refresher actor (:mod:`pipelines.refresh`) and the sampler
actor (:mod:`samplers.actor`), which only carry out what this module decides.

The rules (README "Graph refresh"):

1. **Snapshot steps** (:meth:`RefreshSchedule.boundaries`): every refresh *period* (``refresh.every_steps``,
   else ``refresh.every_epochs`` epochs) rank 0 saves the weights and asks for a new version built
   from them. A refresh whose version could never be used (activation at or after the last step) is
   not started.
2. **Activation steps** (:meth:`RefreshSchedule.activation`), fixed in advance: the version snapshotted
   at step ``s`` becomes active at step ``s`` in ``sync`` mode and at ``s + lag`` in ``async`` mode
   (``refresh.lag_steps``, default one period: a refresh normally has a whole period of training to
   land in). When it is late the trainer waits at the activation step and logs the wait as stall.
   No plan of a step at or past a pending activation is requested before the version is in
   (:meth:`RefreshSchedule.horizon`). So the version in use at every step, hence every batch, depends
   only on (seed, config), in both modes.
3. **Attempts**: the sampler numbers the attempts of a run (each restart of the worker group, each
   resume of the driver, starts a new one). A refresh carries the attempt that started it; the
   sampler refuses a version from an older attempt (a refresh still running from before a crash, built
   from weights the replay may never reach), and the refresher deletes its files.
4. **Restart** at step ``r`` (a checkpoint's step): versions snapshotted at steps ``<= r`` stay (their
   weights are the ones the replay reproduces, whatever their activation step); later ones go. A
   refresh snapshotted at ``b <= r`` whose version did not land before the crash and is still to be
   activated (``r < activation(b)``) is started again (:meth:`RefreshSchedule.to_restart`), from its
   weight snapshot if it survived, else from the checkpoint's weights when ``b == r``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import Optional


@dataclass(frozen=True)
class RefreshSchedule:
    """When graph versions are snapshotted and activated in a run of ``epochs`` x ``steps_per_epoch`` steps.

    Args:
        steps_per_epoch, epochs: the run's length.
        every_epochs, every_steps: the refresh period (``every_steps`` wins when > 0; both 0: no refresh).
        mode: ``sync`` or ``async``.
        lag_steps: async only: steps between a snapshot and its activation (default: the period).
    """

    steps_per_epoch: int
    epochs: int
    every_epochs: int = 0
    every_steps: int = 0
    mode: str = "async"
    lag_steps: Optional[int] = None

    def __post_init__(self):
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if self.lag_steps is not None and self.lag_steps < 1:
            raise ValueError(f"lag_steps must be >= 1, got {self.lag_steps}")

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def period(self) -> int:
        """Steps between snapshots (0: no refresh)."""
        return self.every_steps if self.every_steps > 0 else self.every_epochs * self.steps_per_epoch

    @property
    def lag(self) -> int:
        """Steps between a snapshot and its activation: 0 in sync mode."""
        if self.mode == "sync":
            return 0
        return self.lag_steps if self.lag_steps is not None else self.period

    def activation(self, boundary: int) -> int:
        """The step from which the version snapshotted at ``boundary`` is used."""
        return boundary + self.lag

    @cached_property
    def _boundaries(self) -> tuple[int, ...]:
        if self.period <= 0:
            return ()
        return tuple(b for b in range(self.period, self.total, self.period) if self.activation(b) < self.total)

    def boundaries(self) -> list[int]:
        """Snapshot steps, ascending: multiples of the period whose version activates before the end."""
        return list(self._boundaries)

    def activations(self) -> list[int]:
        return [self.activation(b) for b in self._boundaries]

    def horizon(self, step: int) -> Optional[int]:
        """The first activation step after ``step`` (plans from there on wait for its version), or ``None``.
        O(log n): the trainer asks at every step."""
        i = bisect.bisect_right(self._boundaries, step - self.lag)
        return self.activation(self._boundaries[i]) if i < len(self._boundaries) else None

    def last_boundary(self, step: int) -> int:
        """The newest snapshot step at or before ``step`` (0 before the first): where a ``scope: seen``
        refresh's window of plans starts."""
        return max([b for b in self.boundaries() if b <= step], default=0)

    def to_restart(self, resume_step: int, landed: set[int]) -> list[int]:
        """Snapshot steps whose refresh a restart at ``resume_step`` must start again: snapshotted at or
        before it, activated after it, and without a version among ``landed`` (the snapshot steps of
        the versions the sampler kept)."""
        return [b for b in self.boundaries() if b <= resume_step < self.activation(b) and b not in landed]
