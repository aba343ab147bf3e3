"""Random walk with restart on a proximity graph (ALGORITHMS.md section 4.2 step 3).

One batch: ``batch = [start]``, ``cur = start``; until ``len(batch) == batch_size``: with
probability ``restart_prob`` go back to ``start`` and add nothing; otherwise move to a uniformly
chosen entry of ``neighbors[cur]`` and add it if it is new. The walk is unweighted.

Termination guard (4.5): when fewer than ``batch_size`` distinct nodes are reachable the loop
would never end, so after ``max_steps`` steps (default ``100 * batch_size``; a restart counts as
a step) the batch is filled with nodes drawn uniformly among the not yet collected ones. The
number of filled nodes is returned by :func:`rwr_batch` / :func:`rwr_batches` (the planner
reports it per step, see ``BatchPlanner.plan_with_info``); :func:`random_walk_with_restart`
returns the ids only.

Randomness: every walk has its own SplitMix64 stream derived from its ``seed`` (an int or a
tuple of ints such as ``(seed, version, step)``), so the same arguments give the same batch,
whatever else was computed before and however many threads run.

Speed: one walk on a large graph is a chain of dependent cache misses (each move reads the
row of the node the previous move reached). :func:`rwr_batch` runs the stretches between
restarts (excursions, all starting from ``start``) side by side, which the counter-based
generator allows because every restart is known before any row is read; the batch is exactly
the one-move-at-a-time walk's. :func:`rwr_batches` overlaps whole walks instead.

Walks read ``neighbors`` without checking every entry (that would cost O(N k) per walk); the
entries must be valid node ids in [0, N). :class:`samplers.plans.BatchPlanner` validates a graph
once when it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

from samplers import _kernels
from samplers._checks import is_int

Seed = Union[int, Sequence[int]]
_STREAM_TAG_WALK = 0x525752  # separates walk streams from other users of the same seed
DEFAULT_STEPS_PER_NODE = 100
WALK_GROUP = 32  # walks advanced together by one thread in rwr_batches (overlaps their cache misses)
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64 finaliser on Python ints (a bijection of [0, 2**64))."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_WALK_KEY_START = _mix64(_STREAM_TAG_WALK)


def walk_key(seed: Seed) -> np.uint64:
    """Generator state of the walk with this seed (an int or a tuple of non-negative ints).

    The ints are absorbed one by one through the SplitMix64 finaliser; O(len(seed)).
    """
    if isinstance(seed, (int, np.integer)):
        entropy = (seed,)  # fast path: one walk costs a few microseconds, so this matters
    else:
        entropy = (seed,) if np.ndim(seed) == 0 else tuple(seed)
    key = _WALK_KEY_START
    for value in entropy:
        if not is_int(value) or value < 0:
            raise ValueError(f"seed must be non-negative integers, got {seed!r}")
        value = int(value)
        key = _mix64((key ^ _mix64((value + 0x9E3779B97F4A7C15) & _MASK64)) & _MASK64)
    return np.uint64(key)


def _check_neighbors(neighbors: np.ndarray) -> np.ndarray:
    if not isinstance(neighbors, np.ndarray) or neighbors.ndim != 2:
        raise ValueError(
            f"neighbors must be a 2-D integer array [N, k], got {type(neighbors).__name__} "
            f"with shape {getattr(neighbors, 'shape', None)}"
        )
    if not np.issubdtype(neighbors.dtype, np.integer):
        raise ValueError(f"neighbors must have an integer dtype, got {neighbors.dtype}")
    if neighbors.shape[0] < 1 or neighbors.shape[1] < 1:
        raise ValueError(f"neighbors must have N >= 1 rows and k >= 1 columns, got shape {neighbors.shape}")
    if neighbors.dtype not in (np.int32, np.int64):
        neighbors = neighbors.astype(np.int64)
    return np.ascontiguousarray(neighbors)


def _check_walk_args(
    num_nodes: int, batch_size: int, restart_prob: float, max_steps: int | None
) -> tuple[int, np.uint64, int]:
    if not is_int(batch_size):
        raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
    if not 1 <= batch_size <= num_nodes:
        raise ValueError(f"batch_size must be in [1, N={num_nodes}], got {batch_size}")
    if isinstance(restart_prob, bool) or not (
        isinstance(restart_prob, (int, float, np.floating, np.integer)) and 0.0 <= restart_prob < 1.0
    ):
        raise ValueError(f"restart_prob must be in [0, 1) (1 never terminates), got {restart_prob!r}")
    if max_steps is None:
        max_steps = DEFAULT_STEPS_PER_NODE * int(batch_size)
    elif not is_int(max_steps) or max_steps < 0:
        raise ValueError(f"max_steps must be a non-negative integer or None, got {max_steps!r}")
    threshold = np.uint64(int(float(restart_prob) * 2**32))
    return int(batch_size), threshold, int(max_steps)


def rwr_batch(
    neighbors: np.ndarray,
    start: int,
    batch_size: int,
    restart_prob: float,
    seed: Seed,
    max_steps: int | None = None,
) -> tuple[np.ndarray, int]:
    """One random-walk-with-restart batch and the number of nodes filled in by the guard.

    Args:
        neighbors: int [N, k] adjacency (entries in [0, N)).
        start: start node, the first id of the batch.
        batch_size: B, 1 <= B <= N.
        restart_prob: alpha in [0, 1).
        seed: int or tuple of ints; same arguments give the same batch.
        max_steps: step cap before the uniform fill; default 100 * B.

    Returns:
        (ids, n_filled): int64 [B] distinct ids with ``ids[0] == start``; ``n_filled`` > 0 when
        the walk hit ``max_steps`` and the last ``n_filled`` ids were drawn uniformly.

    Complexity: O(B / (1 - alpha)) expected steps (compiled, O(1) each), at most ``max_steps``;
    the excursions run side by side, so a few hundred moves past the end of the walk may be
    computed and discarded; O(B) memory.
    """
    neighbors = _check_neighbors(neighbors)
    n = neighbors.shape[0]
    batch_size, threshold, max_steps = _check_walk_args(n, batch_size, restart_prob, max_steps)
    if not is_int(start) or not 0 <= start < n:
        raise ValueError(f"start must be an integer node id in [0, {n}), got {start!r}")
    ids, filled, _ = _kernels.walk_one(neighbors, np.int64(start), batch_size, threshold, max_steps, walk_key(seed))
    return ids, int(filled)


def random_walk_with_restart(
    neighbors: np.ndarray,
    start: int,
    batch_size: int,
    restart_prob: float,
    seed: Seed,
    max_steps: int | None = None,
) -> np.ndarray:
    """Ids of one random-walk-with-restart batch (see :func:`rwr_batch` for everything).

    Returns:
        int64 [batch_size] distinct ids, ``ids[0] == start``.

    Complexity: O(B / (1 - alpha)) expected steps, O(B) memory.
    """
    return rwr_batch(neighbors, start, batch_size, restart_prob, seed, max_steps)[0]


def rwr_batches(
    neighbors: np.ndarray,
    starts: Sequence[int] | np.ndarray,
    batch_size: int,
    restart_prob: float,
    seeds: Sequence[Seed] | np.ndarray,
    max_steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Many walks at once; walk w equals ``rwr_batch(neighbors, starts[w], ..., seeds[w])``.

    The walks run in a compiled kernel, in groups of ``WALK_GROUP`` advanced in lock-step per
    thread (their random memory reads overlap) and groups in parallel over numba threads.

    Args:
        neighbors: int [N, k] adjacency.
        starts: [W] start nodes.
        batch_size: B.
        restart_prob: alpha in [0, 1).
        seeds: W seeds (ints, tuples of ints, or an int array [W] / [W, L]).
        max_steps: per-walk step cap; default 100 * B.

    Returns:
        (ids int64 [W, B], n_filled int64 [W]).

    Complexity: O(W B / (1 - alpha)) expected steps, O(W B) memory.
    """
    neighbors = _check_neighbors(neighbors)
    n = neighbors.shape[0]
    batch_size, threshold, max_steps = _check_walk_args(n, batch_size, restart_prob, max_steps)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if starts.size and (starts.min() < 0 or starts.max() >= n):
        raise ValueError(f"starts must be node ids in [0, {n}), got values in [{starts.min()}, {starts.max()}]")
    if len(seeds) != starts.size:
        raise ValueError(f"seeds must have one entry per start ({starts.size}), got {len(seeds)}")
    keys = np.array([walk_key(s) for s in seeds], dtype=np.uint64)
    ids, filled, _ = _kernels.walk_many(neighbors, starts, batch_size, threshold, max_steps, keys, WALK_GROUP)
    return ids, filled
