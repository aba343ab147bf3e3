"""Tests of samplers.rwr: semantics, termination guard, determinism, reference agreement."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from samplers import _kernels
from samplers.graph import build_proximity_graph
from samplers.plans import BatchPlanner
from samplers.rwr import random_walk_with_restart, rwr_batch, rwr_batches


def reference_walk(neighbors: np.ndarray, start: int, batch_size: int, restart_prob: float, rng) -> list[int]:
    """Plain-Python random walk with restart, written from ALGORITHMS.md 4.2 step 3."""
    batch = [start]
    seen = {start}
    cur = start
    while len(batch) < batch_size:
        if rng.random() < restart_prob:
            cur = start
            continue
        cur = int(neighbors[cur, rng.integers(neighbors.shape[1])])
        if cur not in seen:
            seen.add(cur)
            batch.append(cur)
    return batch


def position_counts(batches: np.ndarray, n: int) -> np.ndarray:
    """[B, N] how often node j sits at position b of a batch."""
    counts = np.zeros((batches.shape[1], n))
    for pos in range(batches.shape[1]):
        counts[pos] = np.bincount(batches[:, pos], minlength=n)
    return counts


def star_graph(leaves: int, others: int) -> np.ndarray:
    """Node 0 points to the leaves 1..leaves, every leaf only to 0; other nodes form a ring."""
    n = 1 + leaves + others
    nb = np.zeros((n, leaves), np.int64)
    nb[0] = np.arange(1, leaves + 1)
    ring = np.arange(1 + leaves, n)
    nb[ring] = np.roll(ring, -1)[:, None]
    return nb


def test_compiled_walk_agrees_with_python_reference_in_distribution():
    rng = np.random.default_rng(0)
    n, k, size, walks = 20, 3, 6, 6000
    nb = rng.integers(0, n, size=(n, k))
    nb[nb == np.arange(n)[:, None]] = (nb[nb == np.arange(n)[:, None]] + 1) % n
    ref_rng = np.random.default_rng(1)
    for alpha in (0.0, 0.4):
        compiled, filled = rwr_batches(nb, np.zeros(walks, np.int64), size, alpha, list(range(walks)))
        assert filled.sum() == 0
        reference = np.array([reference_walk(nb, 0, size, alpha, ref_rng) for _ in range(walks)])
        c, r = position_counts(compiled, n) / walks, position_counts(reference, n) / walks
        # Per (position, node) frequencies agree within ~4 binomial standard deviations.
        sd = np.sqrt(np.maximum(r * (1 - r), 1e-4) * 2 / walks)
        assert np.all(np.abs(c - r) < 4.5 * sd + 1e-3), np.abs(c - r).max()
        if alpha == 0.4:
            # Power check: the same comparison tells alpha = 0.4 from alpha = 0.
            plain, _ = rwr_batches(nb, np.zeros(walks, np.int64), size, 0.0, list(range(walks)))
            p = position_counts(plain, n) / walks
            assert np.any(np.abs(p - r) > 4.5 * sd + 1e-3)


def test_walk_returns_distinct_ids_starting_with_start():
    nb = build_proximity_graph(np.random.default_rng(0).normal(size=(300, 5)), k=6, m=40).neighbors
    ids, filled = rwr_batch(nb, 17, 64, 0.2, seed=5)
    assert ids.dtype == np.int64 and ids.shape == (64,)
    assert ids[0] == 17 and len(np.unique(ids)) == 64
    assert ids.min() >= 0 and ids.max() < 300
    np.testing.assert_array_equal(ids, random_walk_with_restart(nb, 17, 64, 0.2, seed=5))


def test_restart_on_star_graph_stays_in_centre_and_leaves():
    nb = star_graph(leaves=12, others=40)
    for seed in range(20):
        ids, filled = rwr_batch(nb, 0, 10, 0.999, seed=seed, max_steps=10**7)
        assert filled == 0
        assert set(ids.tolist()) <= set(range(13))


def test_restart_adds_nothing_on_a_chain():
    """0 -> 1 -> 2 -> ...: restarts go back to 0 and re-walk, so the batch is 0..B-1 in order."""
    n = 50
    nb = np.minimum(np.arange(n) + 1, n - 1)[:, None]
    for alpha in (0.0, 0.3, 0.6):
        ids, filled = rwr_batch(nb, 0, 8, alpha, seed=3, max_steps=10**6)
        assert filled == 0
        np.testing.assert_array_equal(ids, np.arange(8))


def test_termination_guard_fills_from_unvisited_nodes():
    n = 100
    nb = np.random.default_rng(0).integers(3, n, size=(n, 2))
    nb[:3] = [[1, 2], [2, 0], [0, 1]]  # a closed 3-node component
    ids, filled = rwr_batch(nb, 0, 8, 0.1, seed=0)
    assert filled == 5
    assert set(ids[:3].tolist()) == {0, 1, 2} and len(np.unique(ids)) == 8
    many, many_filled = rwr_batches(nb, [0, 1, 2, 50], 8, 0.1, [0, 1, 2, 3])
    assert list(many_filled[:3]) == [5, 5, 5] and many_filled[3] == 0
    assert all(len(np.unique(row)) == 8 for row in many)
    # The batch may even cover every node.
    full, full_filled = rwr_batch(nb, 0, n, 0.1, seed=1, max_steps=50)
    assert sorted(full.tolist()) == list(range(n)) and full_filled > 0


def test_walks_are_deterministic_and_seeded():
    nb = build_proximity_graph(np.random.default_rng(1).normal(size=(500, 8)), k=10, m=80).neighbors
    a = random_walk_with_restart(nb, 3, 50, 0.1, seed=42)
    b = random_walk_with_restart(nb, 3, 50, 0.1, seed=42)
    c = random_walk_with_restart(nb, 3, 50, 0.1, seed=43)
    d = random_walk_with_restart(nb, 3, 50, 0.1, seed=(42, 0, 7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    starts = np.arange(40) * 7
    seeds = [(9, s) for s in range(40)]
    many, _ = rwr_batches(nb, starts, 50, 0.1, seeds)
    for w in (0, 17, 39):
        np.testing.assert_array_equal(many[w], random_walk_with_restart(nb, int(starts[w]), 50, 0.1, seeds[w]))
    np.testing.assert_array_equal(many, rwr_batches(nb, starts, 50, 0.1, seeds)[0])
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(many, rwr_batches(nb, starts, 50, 0.1, seeds)[0])
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(
        random_walk_with_restart(nb.astype(np.int32), 3, 50, 0.1, seed=42), a
    )


@pytest.mark.parametrize("alpha", [1.0, -0.1, float("nan"), 2])
def test_restart_prob_outside_unit_interval_raises(alpha):
    nb = np.zeros((5, 1), np.int64)
    with pytest.raises(ValueError, match="restart_prob"):
        random_walk_with_restart(nb, 0, 3, alpha, seed=0)
    with pytest.raises(ValueError, match="restart_prob"):
        rwr_batches(nb, [0], 3, alpha, [0])


def test_invalid_walk_arguments_raise():
    nb = np.zeros((5, 1), np.int64)
    with pytest.raises(ValueError, match="batch_size"):
        random_walk_with_restart(nb, 0, 6, 0.1, seed=0)
    with pytest.raises(ValueError, match="start"):
        random_walk_with_restart(nb, 5, 3, 0.1, seed=0)
    with pytest.raises(ValueError, match="neighbors"):
        random_walk_with_restart(np.zeros((5, 1)), 0, 3, 0.1, seed=0)
    with pytest.raises(ValueError, match="seeds"):
        rwr_batches(nb, [0, 1], 3, 0.1, [0])
    for start in (2.7, True, "1"):  # no silent truncation of a fractional start
        with pytest.raises(ValueError, match="start must be an integer node id"):
            random_walk_with_restart(nb, start, 3, 0.1, seed=0)
    for seed in (1.5, -1, (0, -2), True):
        with pytest.raises(ValueError, match="seed"):
            random_walk_with_restart(nb, 0, 3, 0.1, seed=seed)
    with pytest.raises(ValueError, match="restart_prob"):
        random_walk_with_restart(nb, 0, 3, False, seed=0)
    assert random_walk_with_restart(nb, np.int32(2), 3, np.float32(0.1), seed=np.uint64(4))[0] == 2


def test_two_cluster_purity(two_clusters):
    x, cluster = two_clusters
    n, size = len(x), 64
    knn = build_proximity_graph(x, k=10, m=n, seed=0)
    assert np.all(cluster[knn.neighbors] == cluster[:, None])  # no cross edges
    planner = BatchPlanner(n, size, 1, 0, "rwr", graph=knn)
    plans, filled = planner.plan_many(range(3 * planner.steps_per_epoch))
    assert filled.sum() == 0
    purity = np.array([np.mean(cluster[p.ravel()] == cluster[p.ravel()[0]]) for p in plans])
    assert np.all(purity == 1.0)
    walks, _ = rwr_batches(knn.neighbors, np.arange(0, n, 7), size, 0.1, list(range(len(range(0, n, 7)))))
    assert np.all(cluster[walks] == cluster[walks[:, :1]])

    uniform_graph = build_proximity_graph(x, k=10, m=10, seed=0)
    planner = BatchPlanner(n, size, 1, 0, "rwr", graph=uniform_graph)
    plans, _ = planner.plan_many(range(5 * planner.steps_per_epoch))
    share = np.array([np.mean(cluster[p.ravel()]) for p in plans])
    assert abs(share.mean() - 0.5) < 0.05
    assert np.mean(np.abs(share - 0.5)) < 0.1


def _sequential_walk(nb: np.ndarray, start: int, size: int, threshold: np.uint64, max_steps: int, key: np.uint64):
    """The plain one-chain kernel (walk_into), the reference of the overlapped one."""
    table_size = 16
    while table_size < 2 * size:
        table_size *= 2
    shift = np.uint64(64 - int(np.log2(table_size)))
    out = np.empty(size, np.int64)
    filled, steps = _kernels.walk_into(nb, np.int64(start), threshold, max_steps, key, out, np.empty(table_size, np.int64), shift)
    return out, filled, steps, shift, table_size


def test_overlapped_walk_equals_sequential_walk():
    """walk_one overlaps the excursions of one walk; ids, fill counts and steps must be those of
    the one-chain kernel, whatever the lanes and look-ahead (trapped walks and step caps too)."""
    rng = np.random.default_rng(3)
    for trial in range(400):
        n = int(rng.integers(2, 150))
        k = int(rng.integers(1, 9))
        nb = rng.integers(0, n, size=(n, k))
        if trial % 3 == 0 and n >= 3:
            nb[:3] = rng.integers(0, 3, size=(3, k))  # a closed component
        nb = nb.astype(np.int32 if trial % 2 else np.int64)
        size = int(rng.integers(1, n + 1))
        alpha = float(rng.choice([0.0, 0.1, 0.5, 0.95]))
        threshold = np.uint64(int(alpha * 2**32))
        max_steps = int(rng.choice([0, 3, 40, 100 * size]))
        key = np.uint64(rng.integers(0, 2**63))
        start = int(rng.integers(0, n))
        ref, ref_filled, ref_steps, shift, table_size = _sequential_walk(nb, start, size, threshold, max_steps, key)
        ids, filled, steps = _kernels.walk_one(nb, np.int64(start), size, threshold, max_steps, key)
        np.testing.assert_array_equal(ids, ref)
        assert (filled, steps) == (ref_filled, ref_steps)
        lanes, ahead = int(rng.integers(1, 6)), int(rng.choice([1, 2, 3, 8, 64]))
        ring = 1 << int(np.ceil(np.log2(ahead)))
        out = np.empty(size, np.int64)
        got = _kernels.walk_into_overlapped(
            nb, np.int64(start), threshold, max_steps, key, out, np.empty(table_size, np.int64), shift,
            np.empty(ring, np.int64), lanes, ahead,
        )
        np.testing.assert_array_equal(out, ref)
        assert got == (ref_filled, ref_steps)
