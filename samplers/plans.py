"""Batch plans: which ids every rank trains on at every global step.

A plan is a pure function of (seed, global step, active graph version) (ARCHITECTURE.md,
principle 1): ``BatchPlanner.plan(step)`` returns an int64 array [world_size, global_batch //
world_size]; rank r trains on row r. Rows are disjoint and their union is the global batch.
Every random choice is drawn from a generator keyed by (seed, purpose, epoch or version, step),
never from a shared stateful generator, so ``plan(7)`` is the same whether or not ``plan(0..6)``
were computed, and a planner rebuilt with :meth:`BatchPlanner.from_state` serves identical plans.

Epochs: ``steps_per_epoch = num_nodes // global_batch``; step s is position
``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``.

Strategies:

* ``"uniform"``: a seeded permutation of all nodes per epoch, chopped into global batches; the
  last incomplete batch is dropped.
* ``"knn"`` (the kNN Sampler baseline): the start node followed by its neighbours in graph order
  (nearest first). When k < B - 1 the batch keeps growing breadth-first: neighbours of the
  neighbours, in the same order, skipping repeats; if the reachable set is exhausted it is
  filled with uniformly drawn unused nodes (seeded by step), counted in ``n_filled``.
* ``"rwr"``: one random walk with restart of length B from the start node
  (:mod:`samplers.rwr`).

For "knn" and "rwr" the start node of step s is entry ``s % steps_per_epoch`` of a seeded
per-epoch permutation of all nodes, so the starts of an epoch are distinct and the walks spread
over the dataset. (The reference code picks starts among nodes not yet used in the epoch; that
makes step s depend on all earlier steps and graph versions, which a pure plan cannot.)

Warm-up: during the first ``warmup_epochs`` epochs every strategy serves uniform plans.

Restart decay (ALGORITHMS.md 4.2 step 6, optional): ``alpha(epoch) = max(restart_prob -
restart_decay_per_epoch * epoch, min(restart_floor, restart_prob))`` with the absolute epoch
index; the defaults 0.02 and 0.05 are the reference code's values.

Graph versions: :meth:`BatchPlanner.set_graph` installs version v, active from step
``activate_step`` on; ``plan(step)`` uses the newest version whose activate_step <= step.
Versions must be added with increasing version numbers and non-decreasing activate steps.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from samplers import _kernels
from samplers._checks import is_int
from samplers.graph import ProximityGraph
from samplers.rwr import DEFAULT_STEPS_PER_NODE, WALK_GROUP, walk_key

STRATEGIES = ("uniform", "knn", "rwr")
_TAG_UNIFORM = 1
_TAG_STARTS = 2
_TAG_WALK = 3
_TAG_FILL = 4


class NoActiveGraphError(RuntimeError):
    """A graph-based plan was requested for a step before any graph version is active."""


@dataclass(frozen=True)
class GraphVersion:
    """One installed graph version: neighbour table, its version number, activation step."""

    version: int
    activate_step: int
    neighbors: np.ndarray
    checksum: int


def neighbors_checksum(neighbors: np.ndarray) -> int:
    """CRC32 of the neighbour ids (identifies a version on restore). O(N k).

    The ids are hashed as little-endian int32 (int64 from 2**31 nodes on), so one table held in
    any integer dtype or byte order has one checksum; int32 tables, what the build returns, are
    hashed without a copy.
    """
    dtype = "<i4" if neighbors.shape[0] < 2**31 else "<i8"
    return zlib.crc32(np.ascontiguousarray(neighbors, dtype=dtype).view(np.uint8).data)


def _as_neighbors(graph: ProximityGraph | np.ndarray, num_nodes: int) -> np.ndarray:
    """Validated contiguous int32/int64 [num_nodes, k] neighbour table. O(N k)."""
    neighbors = graph.neighbors if isinstance(graph, ProximityGraph) else graph
    if not isinstance(neighbors, np.ndarray) or neighbors.ndim != 2:
        raise ValueError(f"graph must be a ProximityGraph or a 2-D int array [N, k], got {type(graph).__name__}")
    if not np.issubdtype(neighbors.dtype, np.integer):
        raise ValueError(f"graph neighbours must have an integer dtype, got {neighbors.dtype}")
    if neighbors.shape[0] != num_nodes or neighbors.shape[1] < 1:
        raise ValueError(f"graph must have shape [num_nodes={num_nodes}, k>=1], got {neighbors.shape}")
    lo, hi = int(neighbors.min()), int(neighbors.max())
    if lo < 0 or hi >= num_nodes:
        raise ValueError(f"graph neighbour ids must lie in [0, {num_nodes}), got values in [{lo}, {hi}]")
    if neighbors.dtype not in (np.int32, np.int64):
        neighbors = neighbors.astype(np.int64)
    return np.ascontiguousarray(neighbors)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchPlanner:
    """Pure, seeded batch plans for data-parallel contrastive training.

    Args:
        num_nodes: N, the dataset size.
        global_batch: B, ids per global step (1 <= B <= N).
        world_size: W ranks; B % W must be 0.
        seed: base seed of every random choice.
        strategy: "uniform", "knn" or "rwr".
        graph: optional initial graph (ProximityGraph or int [N, k] array), version 0 active
            from step 0.
        restart_prob: alpha of the walk, in [0, 1).
        warmup_epochs: epochs of uniform plans before the graph strategies start.
        restart_decay: apply the restart schedule of 4.2 step 6.
        restart_decay_per_epoch: alpha decrease per epoch when decaying.
        restart_floor: lowest alpha reached by the decay.
        max_steps: walk step cap before the uniform fill; default 100 * B.

    Raises:
        ValueError: on invalid arguments.
    """

    def __init__(
        self,
        num_nodes: int,
        global_batch: int,
        world_size: int,
        seed: int,
        strategy: str,
        graph: ProximityGraph | np.ndarray | None = None,
        restart_prob: float = 0.1,
        warmup_epochs: int = 0,
        restart_decay: bool = False,
        restart_decay_per_epoch: float = 0.02,
        restart_floor: float = 0.05,
        max_steps: int | None = None,
    ) -> None:
        self.num_nodes = _check_int("num_nodes", num_nodes, 2)
        self.global_batch = _check_int("global_batch", global_batch, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
        if self.global_batch > self.num_nodes:
            raise ValueError(f"global_batch must be <= num_nodes={self.num_nodes}, got {self.global_batch}")
        if self.global_batch % self.world_size:
            raise ValueError(
                f"global_batch must be divisible by world_size, got global_batch={self.global_batch}, "
                f"world_size={self.world_size}"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        for name, value in (("restart_prob", restart_prob), ("restart_floor", restart_floor)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not float(restart_decay_per_epoch) >= 0.0:
            raise ValueError(f"restart_decay_per_epoch must be >= 0, got {restart_decay_per_epoch!r}")
        self.restart_prob = float(restart_prob)
        self.restart_decay = bool(restart_decay)
        self.restart_decay_per_epoch = float(restart_decay_per_epoch)
        self.restart_floor = float(restart_floor)
        self.max_steps = (
            DEFAULT_STEPS_PER_NODE * self.global_batch if max_steps is None else _check_int("max_steps", max_steps, 0)
        )
        self.local_batch = self.global_batch // self.world_size
        self.steps_per_epoch = self.num_nodes // self.global_batch
        self._versions: list[GraphVersion] = []
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self._permutations_lock = threading.Lock()
        if graph is not None:
            self.set_graph(graph, version=0, activate_step=0)

    # ---------------------------------------------------------------- graph versions

    def set_graph(self, neighbors: ProximityGraph | np.ndarray, version: int, activate_step: int) -> None:
        """Install graph ``version``, used by every step >= ``activate_step`` (until a newer one).

        Args:
            neighbors: ProximityGraph or int [N, k] table (rows ordered nearest first for knn).
            version: version number, larger than every installed one.
            activate_step: first step that uses it, >= the activate step of the newest version.

        Complexity: O(N k) (validation and checksum).
        """
        version = _check_int("version", version, 0)
        activate_step = _check_int("activate_step", activate_step, 0)
        if self._versions:
            last = self._versions[-1]
            if version <= last.version:
                raise ValueError(f"version must be > newest installed version {last.version}, got {version}")
            if activate_step < last.activate_step:
                raise ValueError(
                    f"activate_step must be >= {last.activate_step} (activate step of version "
                    f"{last.version}), got {activate_step}"
                )
        table = _as_neighbors(neighbors, self.num_nodes)
        self._versions.append(GraphVersion(version, activate_step, table, neighbors_checksum(table)))

    def active_version(self, step: int) -> int | None:
        """Version used at ``step`` (None when no version is active yet). O(number of versions)."""
        entry = self._active_entry(step)
        return None if entry is None else entry.version

    def versions(self) -> list[tuple[int, int]]:
        """Installed (version, activate_step) pairs, oldest first."""
        return [(v.version, v.activate_step) for v in self._versions]

    def prune(self, before_step: int) -> None:
        """Forget versions that no step >= ``before_step`` can use (frees their tables)."""
        keep = [v for i, v in enumerate(self._versions)
                if i + 1 == len(self._versions) or self._versions[i + 1].activate_step > before_step]
        self._versions = keep

    def _active_entry(self, step: int) -> GraphVersion | None:
        active = None
        for entry in self._versions:
            if entry.activate_step <= step:
                active = entry
        return active

    # ---------------------------------------------------------------- schedule

    def epoch(self, step: int) -> int:
        """Epoch of ``step``."""
        return step // self.steps_per_epoch

    def restart_prob_at(self, step: int) -> float:
        """Restart probability used at ``step`` (constant unless ``restart_decay``)."""
        if not self.restart_decay:
            return self.restart_prob
        floor = min(self.restart_floor, self.restart_prob)
        return max(self.restart_prob - self.restart_decay_per_epoch * self.epoch(step), floor)

    def strategy_at(self, step: int) -> str:
        """Strategy used at ``step``: "uniform" during warm-up, else the configured one."""
        return "uniform" if self.epoch(step) < self.warmup_epochs else self.strategy

    # ---------------------------------------------------------------- plans

    def plan(self, step: int) -> np.ndarray:
        """The plan of global step ``step``.

        Returns:
            int64 [world_size, global_batch // world_size]; row r is rank r's batch.

        Raises:
            NoActiveGraphError: a graph strategy is due and no graph version is active.

        Complexity: O(N) for the epoch's permutation (cached, so once per epoch), then uniform
        O(B), knn O(B k), rwr O(B / (1 - alpha)) expected walk steps.
        """
        return self.plan_with_info(step)[0]

    def plan_with_info(self, step: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Plan of ``step`` and a dict: strategy, version, restart_prob, start, n_filled."""
        step = _check_int("step", step, 0)
        strategy = self.strategy_at(step)
        info: dict[str, Any] = {"step": step, "strategy": strategy, "version": None, "n_filled": 0}
        if strategy == "uniform":
            ids = self._uniform_batch(step)
        else:
            entry = self._require_graph(step)
            start = int(self._starts(self.epoch(step))[step % self.steps_per_epoch])
            info.update(version=entry.version, start=start)
            if strategy == "knn":
                ids, filled = self._knn_batch(entry, start, step)
            else:
                alpha = self.restart_prob_at(step)
                key = walk_key((self.seed, _TAG_WALK, entry.version, step))
                ids, filled, _ = _kernels.walk_one(
                    entry.neighbors, np.int64(start), self.global_batch, self._threshold(alpha), self.max_steps, key
                )
                info["restart_prob"] = alpha
            info["n_filled"] = int(filled)
        return ids.reshape(self.world_size, self.local_batch), info

    def plan_many(self, steps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Plans of several steps at once; ``plans[i]`` equals ``plan(steps[i])``.

        Walk steps are generated together with the vectorised kernel (for prefetching).

        Returns:
            (plans int64 [S, world_size, local_batch], n_filled int64 [S]).

        Complexity: as :meth:`plan` per step; the walks run in parallel.
        """
        steps = [_check_int("step", s, 0) for s in steps]
        plans = np.empty((len(steps), self.world_size, self.local_batch), np.int64)
        filled = np.zeros(len(steps), np.int64)
        walks: dict[tuple[int, float], list[tuple[int, int, np.uint64]]] = {}
        for i, step in enumerate(steps):
            if self.strategy_at(step) != "rwr":
                plans[i], info = self.plan_with_info(step)
                filled[i] = info["n_filled"]
                continue
            entry = self._require_graph(step)
            start = int(self._starts(self.epoch(step))[step % self.steps_per_epoch])
            key = walk_key((self.seed, _TAG_WALK, entry.version, step))
            walks.setdefault((entry.version, self.restart_prob_at(step)), []).append((i, start, key))
        for (version, alpha), items in walks.items():
            entry = next(v for v in self._versions if v.version == version)
            rows = np.array([it[0] for it in items])
            starts = np.array([it[1] for it in items], np.int64)
            keys = np.array([it[2] for it in items], np.uint64)
            ids, n_filled, _ = _kernels.walk_many(
                entry.neighbors, starts, self.global_batch, self._threshold(alpha), self.max_steps, keys, WALK_GROUP
            )
            plans[rows] = ids.reshape(len(items), self.world_size, self.local_batch)
            filled[rows] = n_filled
        return plans, filled

    def _require_graph(self, step: int) -> GraphVersion:
        entry = self._active_entry(step)
        if entry is None:
            raise NoActiveGraphError(
                f"strategy {self.strategy!r} needs a graph at step {step} (epoch {self.epoch(step)}, "
                f"warmup_epochs={self.warmup_epochs}) but no graph version is active; installed "
                f"(version, activate_step): {self.versions()}. Call set_graph(...) first."
            )
        return entry

    @staticmethod
    def _threshold(alpha: float) -> np.uint64:
        return np.uint64(int(alpha * 2**32))

    def _permutation(self, tag: int, epoch: int) -> np.ndarray:
        """Seeded permutation of all nodes for (tag, epoch); the last few are cached. O(N)."""
        cache_key = (tag, epoch)
        with self._permutations_lock:
            perm = self._permutations.get(cache_key)
            if perm is None:
                perm = np.random.default_rng([self.seed, tag, epoch]).permutation(self.num_nodes)
                if len(self._permutations) >= 4:
                    self._permutations.pop(next(iter(self._permutations)))
                self._permutations[cache_key] = perm
        return perm

    def _uniform_batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self._permutation(_TAG_UNIFORM, epoch)
        return perm[pos * self.global_batch : (pos + 1) * self.global_batch].astype(np.int64)

    def _starts(self, epoch: int) -> np.ndarray:
        return self._permutation(_TAG_STARTS, epoch)

    def _knn_batch(self, entry: GraphVersion, start: int, step: int) -> tuple[np.ndarray, int]:
        """Start, then breadth-first over the graph (nearest first), then uniform fill."""
        batch = [start]
        seen = {start}
        frontier = [start]
        while frontier and len(batch) < self.global_batch:
            next_frontier = []
            for node in frontier:
                for nb in entry.neighbors[node].tolist():
                    if nb not in seen:
                        seen.add(nb)
                        batch.append(nb)
                        next_frontier.append(nb)
                        if len(batch) == self.global_batch:
                            return np.array(batch, np.int64), 0
            frontier = next_frontier
        filled = self.global_batch - len(batch)
        rng = np.random.default_rng([self.seed, _TAG_FILL, entry.version, step])
        unused = np.setdiff1d(np.arange(self.num_nodes), np.array(batch), assume_unique=True)
        batch.extend(rng.choice(unused, filled, replace=False).tolist())
        return np.array(batch, np.int64), filled

    # ---------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        """Small JSON-serialisable description: config, seed, versions and their checksums."""
        return {
            "num_nodes": self.num_nodes,
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "seed": self.seed,
            "strategy": self.strategy,
            "restart_prob": self.restart_prob,
            "warmup_epochs": self.warmup_epochs,
            "restart_decay": self.restart_decay,
            "restart_decay_per_epoch": self.restart_decay_per_epoch,
            "restart_floor": self.restart_floor,
            "max_steps": self.max_steps,
            "versions": [
                {"version": v.version, "activate_step": v.activate_step, "checksum": v.checksum}
                for v in self._versions
            ],
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], graphs: Mapping[int, ProximityGraph | np.ndarray]
    ) -> "BatchPlanner":
        """Rebuild a planner from :meth:`state` and the tables of its versions.

        Args:
            state: output of :meth:`state`.
            graphs: version -> ProximityGraph or neighbour table, for every version in state.

        Raises:
            ValueError: a version is missing or its table does not match the stored checksum.
        """
        config = {key: value for key, value in state.items() if key != "versions"}
        planner = cls(**config)
        for item in state["versions"]:
            version = int(item["version"])
            if version not in graphs:
                raise ValueError(f"graphs is missing version {version} (have {sorted(graphs)})")
            planner.set_graph(graphs[version], version=version, activate_step=int(item["activate_step"]))
            if planner._versions[-1].checksum != int(item["checksum"]):
                raise ValueError(f"graph of version {version} does not match the checksum stored in state")
        return planner
