"""Tests of samplers.graph: exactness, candidate semantics, pool build vs reference, backends."""

from __future__ import annotations

import numpy as np
import pytest

from samplers.graph import ProximityGraph, build_proximity_graph
from samplers.plans import BatchPlanner
from samplers.stats import batch_stats

EPS32 = float(np.finfo(np.float32).eps)


def cosine_tol(d: int) -> float:
    """Bound on the error of a float32 cosine of d-dimensional rows (normalise, then a d-term dot
    product: (d + 2) u with u = eps / 2), doubled: two float32 evaluations differ by at most this."""
    return (d + 2) * EPS32


def brute_force_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy top-k cosine neighbours, self excluded, sorted by decreasing similarity."""
    e = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, axis=1)


def rwr_stats(graph: ProximityGraph, x: np.ndarray, y: np.ndarray, seed: int, steps: int = 100) -> dict:
    planner = BatchPlanner(len(x), 128, 1, seed, "rwr", graph=graph)
    plans, _ = planner.plan_many(range(steps))
    return batch_stats(plans, x, y)


@pytest.mark.parametrize("m", [599, 10_000])
def test_exact_knn_at_m_ge_n_minus_1_matches_brute_force(random_bank, m):
    k = 12
    graph = build_proximity_graph(random_bank, k=k, m=m, seed=3)
    ids, sims = brute_force_knn(random_bank.astype(np.float64), k + 1)
    assert graph.m == len(random_bank) - 1
    assert graph.candidates == "all"
    # float32 cosines are within tol of these float64 ones, so the k-th largest values are too
    tol = cosine_tol(random_bank.shape[1])
    np.testing.assert_allclose(graph.similarities, sims[:, :k], rtol=0, atol=tol)
    # every neighbour's true cosine is the value of its rank: the right node, or a near-tie of it
    x = random_bank.astype(np.float64)
    e = x / np.linalg.norm(x, axis=1, keepdims=True)
    true = np.einsum("id,ikd->ik", e, e[graph.neighbors])
    np.testing.assert_allclose(true, sims[:, :k], rtol=0, atol=2 * tol)
    # the same ids wherever rounding cannot reorder them (this bank has gaps of 1.2e-7 < tol)
    gaps = -np.diff(sims, axis=1)
    clear = np.hstack([gaps[:, :1], np.minimum(gaps[:, 1:], gaps[:, :-1])]) > 2 * tol
    np.testing.assert_array_equal(graph.neighbors[clear], ids[:, :k][clear])
    assert clear.mean() > 0.99
    assert graph.similarities.dtype == np.float32
    assert np.all(np.diff(graph.similarities, axis=1) <= 0)
    assert not np.any(graph.neighbors == np.arange(len(random_bank))[:, None])


@pytest.mark.parametrize("backend", ["exact", "pernode"])
def test_graph_independent_of_embeddings_when_m_equals_k(backend):
    rng = np.random.default_rng(0)
    bank_a = rng.normal(size=(400, 8)).astype(np.float32)
    bank_b = rng.uniform(-5, 1, size=(400, 32))
    graph_a = build_proximity_graph(bank_a, k=7, m=7, seed=11, backend=backend)
    graph_b = build_proximity_graph(bank_b, k=7, m=7, seed=11, backend=backend)
    np.testing.assert_array_equal(np.sort(graph_a.neighbors, axis=1), np.sort(graph_b.neighbors, axis=1))
    # The rows are sorted by similarity, which does depend on the bank.
    assert not np.array_equal(graph_a.neighbors, graph_b.neighbors)
    graph_c = build_proximity_graph(bank_a, k=7, m=7, seed=12, backend=backend)
    assert not np.array_equal(np.sort(graph_a.neighbors, axis=1), np.sort(graph_c.neighbors, axis=1))


def test_pool_candidate_sets_are_uniform_subsets_excluding_self():
    """At m = k the neighbour set is the candidate set: check its law over many seeds.

    Small blocks and pools (several windows of a permutation) exercise the pool build; the
    per-node subset must be uniform: every other node equally likely, self never, and every
    pair of other nodes equally likely to appear together.
    """
    n, m, seeds = 48, 4, 1500
    bank = np.random.default_rng(5).normal(size=(n, 6)).astype(np.float32)
    single = np.zeros((n, n))
    pairs_of_0 = np.zeros((n, n))
    overlap = []
    for seed in range(seeds):
        graph = build_proximity_graph(bank, k=m, m=m, seed=seed, block_size=6, pool_factor=2.0, num_threads=1)
        assert graph.candidates == "pool" and graph.pool_size < n
        nb = graph.neighbors
        np.add.at(single, (np.repeat(np.arange(n), m), nb.ravel()), 1)
        a, b = np.meshgrid(nb[0], nb[0])
        np.add.at(pairs_of_0, (a.ravel(), b.ravel()), 1)
        overlap.append(len(np.intersect1d(nb[1], nb[2])))
    assert np.all(np.diag(single) == 0)
    # Each count is Binomial(seeds, q): the normalised squared deviations average 1.
    q = m / (n - 1)
    off = single[~np.eye(n, dtype=bool)]
    chi2 = np.mean((off - seeds * q) ** 2 / (seeds * q * (1 - q)))
    assert 0.88 < chi2 < 1.12, chi2
    upper = np.triu(pairs_of_0, 1)[1:, 1:][np.triu_indices(n - 1, 1)]
    q_pair = m * (m - 1) / ((n - 1) * (n - 2))
    chi2_pair = np.mean((upper - seeds * q_pair) ** 2 / (seeds * q_pair * (1 - q_pair)))
    assert 0.82 < chi2_pair < 1.18, chi2_pair
    # Two nodes draw their own subsets: they share a candidate now and then, not always.
    assert 0.0 < np.mean(overlap) < 1.5


@pytest.mark.parametrize("block_size", [512, 64])
def test_pool_build_matches_per_node_reference_in_distribution(digits, block_size):
    """In-degree law, neighbour similarity and walk batch statistics agree within noise.

    block_size 512 gives 4 blocks with pools of 2.25 m; 64 gives 29 blocks whose pools (1.55 m)
    are shared more tightly. A build where every node shares one candidate set is the negative
    control: the same checks must reject it.
    """
    x, y = digits
    stats = {"exact": [], "pernode": []}
    in_degrees = {"exact": [], "pernode": []}
    for backend in stats:
        for seed in range(4):
            graph = build_proximity_graph(x, k=10, m=200, seed=seed, backend=backend, block_size=block_size)
            if backend == "exact":
                assert graph.pool_size == {512: 450, 64: 310}[block_size]
            assert graph.candidates == ("pool" if backend == "exact" else "independent")
            g = graph.stats()
            b = rwr_stats(graph, x, y, seed)
            stats[backend].append(
                [g["mean_neighbor_similarity"], g["in_degree_std"], g["in_degree_max"], b["hardness"], b["same_class_rate"]]
            )
            in_degrees[backend].append(graph.in_degrees())
    pool, ref = np.array(stats["exact"]), np.array(stats["pernode"])
    tolerance = np.array([0.004, 0.25, 6.0, 0.03, 0.04])
    assert np.all(np.abs(pool.mean(0) - ref.mean(0)) < tolerance), (pool.mean(0), ref.mean(0))

    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    gap = np.quantile(np.concatenate(in_degrees["exact"]), quantiles) - np.quantile(np.concatenate(in_degrees["pernode"]), quantiles)
    assert np.all(np.abs(gap) <= 2), gap

    shared = _shared_candidate_graph(x, k=10, m=200, seed=0)
    g = shared.stats()
    b = rwr_stats(shared, x, y, 0)
    control = np.array([g["mean_neighbor_similarity"], g["in_degree_std"], g["in_degree_max"], b["hardness"], b["same_class_rate"]])
    assert np.sum(np.abs(control - ref.mean(0)) >= tolerance) >= 3, control


def _shared_candidate_graph(x: np.ndarray, k: int, m: int, seed: int) -> ProximityGraph:
    """Negative control: one candidate set of m + 1 nodes shared by every node."""
    e = x / np.linalg.norm(x, axis=1, keepdims=True)
    cand = np.random.default_rng(seed).choice(len(x), m + 1, replace=False)
    s = e @ e[cand].T
    s[cand, np.arange(m + 1)] = -np.inf
    order = np.argsort(-s, axis=1)[:, :k]
    return ProximityGraph(
        neighbors=cand[order], similarities=np.take_along_axis(s, order, 1).astype(np.float32),
        k=k, m=m, seed=seed, backend="shared", build_seconds=0.0, num_nodes=len(x),
    )


def test_pool_build_is_deterministic_and_seeded(random_bank):
    a = build_proximity_graph(random_bank, k=5, m=50, seed=1, block_size=64)
    b = build_proximity_graph(random_bank, k=5, m=50, seed=1, block_size=64, num_threads=1)
    c = build_proximity_graph(random_bank, k=5, m=50, seed=2, block_size=64)
    # whatever the number of threads: each block is the same single-threaded product, so bitwise equal
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    np.testing.assert_array_equal(a.similarities, b.similarities)
    assert not np.array_equal(a.neighbors, c.neighbors)
    assert a.neighbors.shape == (600, 5) and a.neighbors.dtype in (np.int32, np.int64)
    assert np.all(np.diff(a.similarities, axis=1) <= 0)
    assert not np.any(a.neighbors == np.arange(600)[:, None])
    assert np.all([len(set(row)) == 5 for row in a.neighbors.tolist()])


def test_candidate_restricted_neighbours_are_the_best_of_a_subset(random_bank):
    """With m < N - 1 each row's neighbours must be at least as good as k random others would be,
    and the exact kNN must dominate them in similarity."""
    exact = build_proximity_graph(random_bank, k=8, m=599)
    sampled = build_proximity_graph(random_bank, k=8, m=60, seed=4)
    # two float32 builds (one product of all rows, one per block) of the same cosines
    assert np.all(exact.similarities[:, 0] >= sampled.similarities[:, 0] - cosine_tol(random_bank.shape[1]))
    assert exact.similarities.mean() > sampled.similarities.mean() > 0.0


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_approximate_backend_recall(backend):
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(50, 32))
    x = (centres[rng.integers(0, 50, 6000)] + 0.6 * rng.normal(size=(6000, 32))).astype(np.float32)
    k = 10
    exact = build_proximity_graph(x, k=k, m=len(x), backend="exact")
    approx = build_proximity_graph(x, k=k, m=len(x), backend=backend)
    assert approx.backend == backend
    hits = [len(np.intersect1d(a, b)) for a, b in zip(exact.neighbors, approx.neighbors)]
    recall = np.sum(hits) / exact.neighbors.size
    assert recall >= 0.9, recall
    assert not np.any(approx.neighbors == np.arange(len(x))[:, None])
    assert np.all(np.diff(approx.similarities, axis=1) <= 0)  # faiss sorts by the very values it returns


def test_auto_backend_choice(random_bank):
    assert build_proximity_graph(random_bank, k=5, m=50).backend == "exact"
    assert build_proximity_graph(random_bank, k=5, m=10_000).backend == "exact"


def test_zero_rows_do_not_crash():
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    x[:10] = 0.0
    for m in (30, 99):
        graph = build_proximity_graph(x, k=5, m=m)
        assert np.isfinite(graph.similarities).all()
        assert np.all(graph.similarities[:10] == 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embeddings": np.ones(10), "k": 2, "m": 5}, "2-D"),
        ({"embeddings": np.ones((10, 3), dtype=int), "k": 2, "m": 5}, "float"),
        ({"embeddings": np.full((10, 3), np.nan), "k": 2, "m": 5}, "finite"),
        ({"embeddings": np.ones((10, 3)), "k": 0, "m": 5}, "k must be >= 1"),
        ({"embeddings": np.ones((10, 3)), "k": 10, "m": 9}, "k must be < N"),
        ({"embeddings": np.ones((10, 3)), "k": 5, "m": 4}, "m must be >= k"),
        ({"embeddings": np.ones((10, 3)), "k": 2, "m": 5, "backend": "annoy"}, "backend"),
        ({"embeddings": np.ones((10, 3)), "k": 2, "m": 5, "backend": "hnsw"}, "m >= N-1"),
        ({"embeddings": [[1.0, 2.0]], "k": 1, "m": 1}, "numpy array"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_proximity_graph(**kwargs)


def test_save_load_roundtrip_and_stats(tmp_path, random_bank):
    graph = build_proximity_graph(random_bank, k=6, m=40, seed=9)
    path = graph.save(tmp_path / "graph_v3")
    loaded = ProximityGraph.load(path)
    np.testing.assert_array_equal(loaded.neighbors, graph.neighbors)
    np.testing.assert_array_equal(loaded.similarities, graph.similarities)
    assert loaded.metadata() == graph.metadata()
    stats = graph.stats()
    assert stats["in_degree_mean"] == pytest.approx(6.0)
    assert stats["in_degree_max"] >= 6 and stats["in_degree_std"] > 0
    assert 0.0 <= stats["frac_in_degree_zero"] < 0.2
    assert stats["mean_neighbor_similarity"] == pytest.approx(float(graph.similarities.mean()))
    assert stats["bytes_per_node"] == 6 * 8


@pytest.mark.parametrize("band_z", [2.5, -3.0])
def test_pool_neighbour_law_matches_uniform_candidate_sets(monkeypatch, band_z):
    """With m > k the neighbour set is the top k of a uniform m-subset of the other nodes.

    For node i, let r be the number of other nodes (j excluded) more similar to i than j.
    Then P(j in N(i)) = m / (N - 1) * P(H <= k - 1) with H ~ Hypergeometric(N - 2, r, m - 1)
    (j is a candidate, and at most k - 1 of the other m - 1 candidates beat it). The pool
    build visits candidates in score bands; band_z = -3 makes the first band too small almost
    always, so the later-band path is checked against the same law.
    """
    from scipy.stats import hypergeom

    import samplers.graph as graph_module

    monkeypatch.setattr(graph_module, "_BAND_Z", band_z)
    n, k, m, seeds = 40, 3, 10, 1500
    bank = np.random.default_rng(8).normal(size=(n, 5))
    e = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sim = e @ e.T
    expected = np.zeros((n, n))
    for i in range(n):
        others = np.delete(np.arange(n), i)
        for j in others:
            r = int(np.sum(sim[i, others] > sim[i, j]))
            expected[i, j] = m / (n - 1) * hypergeom.cdf(k - 1, n - 2, r, m - 1)
    counts = np.zeros((n, n))
    for seed in range(seeds):
        graph = build_proximity_graph(bank, k=k, m=m, seed=seed, block_size=5, pool_factor=2.0, num_threads=1)
        assert graph.candidates == "pool" and graph.pool_size == 20
        np.add.at(counts, (np.repeat(np.arange(n), k), graph.neighbors.ravel()), 1)
    assert np.all(np.diag(counts) == 0)
    # sums of 39 float64 hypergeometric probabilities (each good to ~1e-15): ~1e-14 from k
    np.testing.assert_allclose(expected.sum(axis=1), k, rtol=1e-9)
    mean = seeds * expected
    big = mean >= 5
    chi2 = np.mean((counts[big] - mean[big]) ** 2 / (mean[big] * (1 - expected[big])))
    assert big.sum() > 300
    assert 0.85 < chi2 < 1.15, chi2
    assert counts[expected == 0].sum() == 0  # nodes that can never be in the top k never are


def test_pool_build_accepts_other_float_dtypes(random_bank):
    a = build_proximity_graph(random_bank, k=5, m=50, seed=1)
    b = build_proximity_graph(random_bank.astype(np.float64), k=5, m=50, seed=1)
    c = build_proximity_graph(random_bank.astype(np.float16), k=5, m=50, seed=1)
    assert np.mean(a.neighbors == b.neighbors) > 0.99
    assert c.neighbors.shape == (600, 5) and np.isfinite(c.similarities).all()
    assert not np.any(c.neighbors == np.arange(600)[:, None])


@pytest.mark.parametrize("simd", [True, False])
def test_band_compaction_matches_numpy(simd):
    """The compress step of the pool kernel (16-lane compress-store or portable loop) returns
    the positions of the entries >= tau in increasing order, for any row length."""
    from samplers import _kernels

    rng = np.random.default_rng(2)
    for p in (1, 15, 16, 17, 100, 1531):
        row = rng.normal(size=p).astype(np.float32)
        row[rng.integers(0, p, 3)] = 0.25  # ties with the threshold are kept
        for tau in (np.float32(-np.inf), np.float32(0.25), np.float32(1.0), np.float32(np.inf)):
            idx = np.full(p + 16, -7, np.int32)
            c = _kernels._compact_ge(row, tau, idx, simd)
            np.testing.assert_array_equal(idx[:c], np.flatnonzero(row >= tau))


@pytest.mark.parametrize("m", [40, 599])
def test_non_finite_row_raises_on_every_path(random_bank, m):
    """The pool build checks finiteness while it gathers rows (no separate pass); the exact
    path checks up front. Either way a single inf or NaN anywhere raises."""
    for bad in (np.inf, -np.inf, np.nan):
        x = random_bank.copy()
        x[417, 3] = bad
        with pytest.raises(ValueError, match="finite"):
            build_proximity_graph(x, k=5, m=m, seed=1)


@pytest.mark.parametrize("backend, m", [("exact", 40), ("exact", 599), ("pernode", 40), ("hnsw", 599), ("ivf", 599)])
def test_graph_ignores_the_scale_of_rows(random_bank, backend, m):
    """Cosine ignores scale, so rescaling rows by any finite factor leaves the graph unchanged:
    also where a float32 sum of squares over- or underflows (|x| ~ 1e20, 1e-25), where a float64
    one does (1e200, 1e-300, 1e160), and beyond float32's range in a float64 bank."""
    rows = [3, 17, 101, 250, 333, 598]
    base = build_proximity_graph(random_bank, k=5, m=m, seed=1, backend=backend)
    scaled32 = random_bank.copy()
    scaled32[rows[:2]] *= np.array([[1e20], [1e-25]], np.float32)
    scaled64 = random_bank.astype(np.float64)
    scaled64[rows] *= np.array([1e20, 1e-25, 1e200, 1e-300, 1e160, 1e-160])[:, None]
    for bank in (scaled32, scaled64):
        graph = build_proximity_graph(bank, k=5, m=m, seed=1, backend=backend)
        assert np.isfinite(graph.similarities).all()
        # equal up to rounding: unit rows may differ in the last bit, which can reorder near ties
        assert np.mean(graph.neighbors == base.neighbors) > 0.98, backend
        same = np.all(graph.neighbors == base.neighbors, axis=1)
        tol = cosine_tol(bank.shape[1])  # two float32 builds of the same cosines
        np.testing.assert_allclose(graph.similarities[same], base.similarities[same], rtol=0, atol=tol)
        # these rows' top-6 cosines are >= 1.2e-3 apart, far above float32 rounding (4e-6): no reordering
        assert np.all(same[rows[:2]]) and (bank is scaled32 or np.all(same[rows]))


def test_seed_must_be_a_non_negative_integer(random_bank):
    for seed in (-1, 1.5, True, "0"):
        for m in (40, 599):
            with pytest.raises(ValueError, match="seed must be a non-negative integer"):
                build_proximity_graph(random_bank, k=5, m=m, seed=seed)
