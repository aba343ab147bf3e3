"""The sampler actor and its client: the only Ray-aware part of :mod:`samplers`.

The :class:`~samplers.plans.BatchPlanner` is a pure function of (seed, step, active graph version).
The actor wraps one planner, serves each rank its row of the global plan, and owns the history of
graph versions: which version, snapshotted at which step, becomes active at which step, made by which
attempt of the run. That history is written to a small JSON file on every change, next to the
persisted graph files, so an actor that is killed and restarted (``max_restarts=-1``) re-reads it and
serves exactly the plans the old one would have served.

It carries out the refresh protocol of :mod:`samplers.protocol`: a version comes with its activation
step, fixed in advance; a version from an attempt older than the current one is refused; a rewind
(a restart from a checkpoint) keeps the versions snapshotted at or before the checkpoint's step and
starts a new attempt.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray

from samplers.graph import ProximityGraph
from samplers.plans import BatchPlanner


class _SamplerCore:
    """Plan serving and version bookkeeping, without Ray (so it is unit-testable)."""

    def __init__(self, planner_kwargs: dict[str, Any], state_path: Optional[str] = None, cache_steps: int = 64):
        self.planner_kwargs = dict(planner_kwargs)
        self.planner = BatchPlanner(**planner_kwargs)
        self.world_size = int(planner_kwargs["world_size"])
        self.state_path = Path(state_path) if state_path else None
        self.versions: list[dict[str, Any]] = []
        self.max_served = -1
        self.attempt = 0  # see samplers.protocol: a restart starts a new attempt
        self._cache: OrderedDict[int, tuple[np.ndarray, int]] = OrderedDict()  # step -> (plan, filled)
        self._cache_steps = cache_steps
        self._lock = threading.Lock()
        if self.state_path and self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            for entry in saved["versions"]:
                self._activate(entry, persist=False)
            self.max_served = int(saved.get("max_served", -1))
            self.attempt = int(saved.get("attempt", 0))

    # -- serving ---------------------------------------------------------------------------------
    def plan(self, step: int) -> np.ndarray:
        """The global plan ``[world_size, batch // world_size]`` of ``step``."""
        return self._planned(step)[0]

    def _planned(self, step: int) -> tuple[np.ndarray, int]:
        """The plan of ``step`` and how many of its ids the walk's uniform fill drew."""
        with self._lock:
            if step not in self._cache:
                ids, info = self.planner.plan_with_info(step)
                self._cache[step] = (ids, int(info["n_filled"]))
                while len(self._cache) > self._cache_steps:
                    self._cache.popitem(last=False)
            self.max_served = max(self.max_served, step)
            return self._cache[step]

    def plans(self, start: int, stop: int) -> np.ndarray:
        """Global plans of steps ``start..stop-1`` stacked ``[S, world_size, b]`` (for statistics)."""
        return self.plans_with_fill(start, stop)[0]

    def plans_with_fill(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`plans` and, per step, the number of ids drawn by the uniform fill (int64 ``[S]``):
        a walk that reaches its step cap (a component of the graph smaller than the batch, a
        restart probability near 1) completes its batch uniformly, so these ids are not hard."""
        planned = [self._planned(step) for step in range(start, stop)]
        return np.stack([p[0] for p in planned]), np.array([p[1] for p in planned], np.int64)

    def plan_row(self, rank: int, step: int) -> tuple[np.ndarray, int]:
        """Rank ``rank``'s ids at ``step`` and the graph version they came from."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return self.plan(step)[rank], self.version_at(step)

    def version_at(self, step: int) -> int:
        with self._lock:
            active = [v["version"] for v in self.versions if v["activate_step"] <= step]
        return active[-1] if active else -1

    # -- graph versions --------------------------------------------------------------------------
    def next_version(self) -> int:
        """The number of the next version: one past the newest kept (so a replay after a restart numbers
        its versions as the run that never crashed did)."""
        return max((v["version"] for v in self.versions), default=-1) + 1

    def swap_graph(self, graph_path: str, version: int, activate_step: int, snapshot_step: Optional[int] = None,
                   attempt: Optional[int] = None) -> Optional[int]:
        """Add a persisted graph version, active from ``activate_step``; returns that step, or ``None``
        when the version comes from an attempt older than the current one (refused: see
        :mod:`samplers.protocol`). ``attempt=None`` (graph version 0, built by the driver) is always
        taken. ``snapshot_step``: the step of the weights it was built from (default: ``activate_step``).
        """
        if attempt is not None and int(attempt) != self.attempt:
            return None
        graph = ProximityGraph.load(graph_path)  # read and checked outside the lock: plans keep flowing
        with self._lock:
            if attempt is not None and int(attempt) != self.attempt:  # a rewind came in meanwhile
                return None
            if attempt is not None and any(v.get("snapshot_step") == snapshot_step and v.get("attempt") == self.attempt
                                           for v in self.versions):
                return None  # a retried refresh whose first try already landed: that version stands
            if activate_step <= self.max_served:
                raise ValueError(
                    f"cannot activate graph version {version} at step {activate_step}: plans up to step "
                    f"{self.max_served} were already served with the previous version")
            if self.versions and activate_step < self.versions[-1]["activate_step"]:
                raise ValueError(f"activate_step {activate_step} precedes the newest version's "
                                 f"{self.versions[-1]['activate_step']}")
            snapshot = activate_step if snapshot_step is None else snapshot_step
            self._activate({"version": int(version), "activate_step": int(activate_step), "path": str(graph_path),
                            "snapshot_step": int(snapshot), "attempt": self.attempt}, persist=True, graph=graph)
            for step in [s for s in self._cache if s >= activate_step]:
                del self._cache[step]
            return activate_step

    def rewind(self, step: int) -> dict[str, Any]:
        """Training resumes from a checkpoint taken at ``step``: keep the versions snapshotted at or
        before it (a replay from there reproduces their weights), forget the others and what was served
        from ``step`` on, and start a new attempt (refreshes still running from the old one are refused).

        Returns:
            ``{"attempt": new attempt, "kept": [entries], "dropped": [entries]}``; the caller deletes the
            dropped versions' files (their numbers are given again to the replay's versions).
        """
        with self._lock:
            kept = [v for v in self.versions if v.get("snapshot_step", v["activate_step"]) <= step]
            dropped = [v for v in self.versions if v not in kept]
            self.planner = BatchPlanner(**self.planner_kwargs)
            self.versions = []
            self._cache.clear()
            for entry in kept:
                self._activate(entry, persist=False)
            self.max_served = step - 1
            self.attempt += 1
            self._persist()
            return {"attempt": self.attempt, "kept": list(self.versions), "dropped": dropped}

    def prune(self, floor_step: int) -> list[dict[str, Any]]:
        """Forget the versions that no step >= ``floor_step`` uses (the newest always stays); returns
        their entries (version, activate_step, path) so that their files can be deleted.

        The caller vouches that no plan of a step before ``floor_step`` will be asked for again: no
        checkpoint to resume from, no refresh (``scope: seen``) and no epoch statistics reach back
        that far. O(number of versions).
        """
        with self._lock:
            self.planner.prune(floor_step)  # the planner's rule decides; this list follows it
            kept = set(self.planner.versions())
            dropped = [v for v in self.versions if (v["version"], v["activate_step"]) not in kept]
            if dropped:
                self.versions = [v for v in self.versions if v not in dropped]
                for step in [s for s in self._cache if s < floor_step]:
                    del self._cache[step]
                self._persist()
            return dropped

    def _activate(self, entry: dict[str, Any], persist: bool, graph: Optional[ProximityGraph] = None) -> None:
        graph = graph if graph is not None else ProximityGraph.load(entry["path"])
        self.planner.set_graph(graph.neighbors, version=entry["version"], activate_step=entry["activate_step"])
        self.versions.append(dict(entry))
        if persist:
            self._persist()

    def _persist(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1))
        os.replace(tmp, self.state_path)

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores: the version history and the serving position."""
        return {"versions": list(self.versions), "max_served": int(self.max_served), "attempt": self.attempt}

    def info(self) -> dict[str, Any]:
        return {**self.state(), "steps_per_epoch": self.planner.steps_per_epoch,
                "world_size": self.world_size}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
class SamplerActor(_SamplerCore):
    """Named, restartable Ray actor serving batch plans; see the module docstring.

    Threaded (``max_concurrency``): a version being loaded and checked for a swap does not hold up
    the ranks' plan requests; the core's lock orders what touches the planner.

    Create it with :func:`start_sampler`.
    """

    def ping(self) -> bool:
        return True

    def plan_row(self, rank: int, step: int) -> tuple[np.ndarray, int]:
        _maybe_crash(SAMPLER_FAULT_ENV, step)
        return super().plan_row(rank, step)


# Fault injection for the end-to-end tests: "STEP:MARKER" makes the sampler actor's process die when a
# plan of that step is first asked for, once per marker file (created just before).
SAMPLER_FAULT_ENV = "HARDBATCH_SAMPLER_FAULT_ONCE"


def _maybe_crash(env: str, step: Optional[int] = None) -> None:
    """Die like a killed process when ``$env`` (``[STEP:]MARKER``) names this step and its marker file
    does not exist yet (tests only)."""
    spec = os.environ.get(env)
    if not spec:
        return
    at, _, marker = spec.partition(":") if step is not None else ("", "", spec)
    if (step is None or int(at) == step) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def start_sampler(name: str, planner_kwargs: dict[str, Any], state_path: str, namespace: Optional[str] = None):
    """Start (or, after a driver restart, reattach to) the named sampler actor."""
    return SamplerActor.options(name=name, namespace=namespace, get_if_exists=True).remote(
        planner_kwargs, state_path)


class SamplerClient:
    """A train worker's view of the sampler: its row of each step's plan, requested ahead.

    Keeps up to ``prefetch`` requests in flight so the actor round trip (about 1 ms locally) overlaps
    the training step. ``get(step, horizon)`` never requests a step at or past ``horizon``: the loop
    passes the epoch end when a synchronous refresh is due there.
    """

    def __init__(self, actor, rank: int, prefetch: int = 4):
        self.actor = actor
        self.rank = rank
        self.prefetch = prefetch
        self._pending: dict[int, "ray.ObjectRef"] = {}

    def get(self, step: int, horizon: Optional[int] = None) -> tuple[np.ndarray, int]:
        last = step + self.prefetch if horizon is None else min(step + self.prefetch, horizon)
        for s in range(step, max(last, step + 1)):
            if s not in self._pending:
                self._pending[s] = self.actor.plan_row.remote(self.rank, s)
        for stale in [s for s in self._pending if s < step]:
            del self._pending[stale]
        ids, version = ray.get(self._pending.pop(step))
        return ids, version

    def reset(self) -> None:
        """Forget requests in flight (their answers may predate a graph swap)."""
        self._pending.clear()
