"""Proximity graph of BatchSampler (ALGORITHMS.md section 4.2 step 2).

For every node i, M candidates are drawn uniformly *without replacement* from the other N - 1
nodes, scored by cosine similarity with i, and the K most similar are kept as the directed
neighbour list N(i). ``m >= N - 1`` gives the exact kNN graph (self excluded); ``m == k`` gives
a graph that does not depend on the embeddings at all (the Uniform Sampler limit, 4.3).

Backends (``backend=``):

* ``"exact"``: exact top-k over each node's candidate set. With ``m >= N - 1`` it is a blocked
  matrix product over all pairs, O(N^2 d). With ``m < N - 1`` it uses *candidate pools*
  (below), O(N p d) with p ~ pool_factor * m.
* ``"pernode"``: the plain reference for ``m < N - 1``: every node draws its own candidates
  independently of every other node and gathers them row by row, O(N m d) but memory-bound
  (random row reads), several times slower than ``"exact"``.
* ``"ivf"`` / ``"hnsw"``: approximate kNN with faiss for the exact-kNN case ``m >= N - 1`` and
  large N (recall is measured against ``"exact"`` in the tests). They are rejected for
  ``m < N - 1``: a node's candidate set is then small and the exact search over it is cheap.
* ``"auto"``: ``"exact"`` when ``m < N - 1`` or N <= ``EXACT_KNN_MAX_NODES``, else ``"hnsw"``.

Candidate pools. Drawing an independent m-subset per node and gathering its rows is
memory-bound, while one candidate set shared by a large block of nodes piles edges onto hub
nodes (the walk then becomes nearly uniform). The pool build keeps per-node candidate sets but
makes the scoring a dense matrix product: nodes are processed in blocks of about ``block_size``
random nodes; block j scores its rows against a pool of p >= pool_factor * m nodes, a circular
window of one uniform random permutation of all nodes, and each node then draws its *own*
uniform m-subset of the pool (itself removed). Because the window is a uniform p-subset
independent of the node, each node's candidate set is still marginally a uniform m-subset of the
other N - 1 nodes. The windows tile the permutation so that every node lies in exactly the same
number of pools and is offered as a candidate about m times, as in the independent build.
Nodes of one block share pool members, so their candidate sets overlap (m^2 / p expected
common candidates instead of m^2 / N): the candidate sets are exact marginally, correlated
jointly. The tests check that the in-degree distribution, neighbour similarity and walk batch
statistics match the independent reference within noise (also with small blocks whose pools
are only 1.55 m). Pool sizes are multiples of the block stride (about ``block_size``), so the
pool is the smallest such multiple >= pool_factor * m.

Threads: blocks run on ``num_threads`` Python threads, each doing one single-threaded BLAS
product and one GIL-free numba kernel (BLAS threads spinning next to numba threads cost more
than they gave on a 2-core box). Results do not depend on the number of threads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from samplers import _kernels

BACKENDS = ("auto", "exact", "pernode", "ivf", "hnsw")
EXACT_KNN_MAX_NODES = 50_000
_STREAM_TAG_BUILD = 0x6B4E4E  # separates the build's random streams from other users of a seed


@dataclass(frozen=True)
class ProximityGraph:
    """An immutable proximity graph version.

    Attributes:
        neighbors: int32 (int64 when N >= 2**31) [N, k] neighbour ids, row i sorted by
            decreasing similarity to node i; never contains i.
        similarities: float32 [N, k] cosine similarities matching ``neighbors``.
        k: out-degree.
        m: candidates per node after clipping to N - 1.
        seed: seed of the candidate draws.
        backend: backend that built the graph ("exact", "pernode", "ivf", "hnsw").
        build_seconds: wall-clock build time.
        num_nodes: N.
        candidates: "all" (m = N - 1), "pool" or "independent".
        pool_size: p of the pool build (0 otherwise).
        extra: free-form metadata (JSON-serialisable), e.g. the checkpoint it came from.
    """

    neighbors: np.ndarray
    similarities: np.ndarray
    k: int
    m: int
    seed: int
    backend: str
    build_seconds: float
    num_nodes: int
    candidates: str = "all"
    pool_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """All fields except the arrays, JSON-serialisable."""
        return {
            "k": int(self.k),
            "m": int(self.m),
            "seed": int(self.seed),
            "backend": self.backend,
            "build_seconds": float(self.build_seconds),
            "num_nodes": int(self.num_nodes),
            "candidates": self.candidates,
            "pool_size": int(self.pool_size),
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write the graph to an uncompressed ``.npz`` (arrays + JSON metadata).

        Returns:
            The path written (numpy appends ``.npz`` when missing).

        Complexity: O(N k) time and bytes.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        np.savez(
            path,
            neighbors=self.neighbors,
            similarities=self.similarities,
            metadata=np.array(json.dumps(self.metadata())),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProximityGraph":
        """Read a graph written by :meth:`save`. O(N k)."""
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["metadata"]))
            return cls(neighbors=data["neighbors"], similarities=data["similarities"], **meta)

    def in_degrees(self) -> np.ndarray:
        """int64 [N] number of rows listing each node. O(N k)."""
        return np.bincount(self.neighbors.ravel(), minlength=self.num_nodes)

    def stats(self) -> dict[str, float]:
        """Summary statistics of the graph (for logging).

        Returns:
            Dict with num_nodes, k, m, mean/min neighbour similarity, mean similarity of the
            first and of the k-th neighbour, in-degree mean/std/max, fraction of nodes with
            in-degree 0, fraction of edges that are reciprocated, bytes per node.

        Complexity: O(N k log k) time (the reciprocity check sorts), O(N k) memory.
        """
        indeg = self.in_degrees()
        n, k = self.neighbors.shape
        src = np.repeat(np.arange(n, dtype=np.int64), k)
        dst = self.neighbors.ravel().astype(np.int64)
        forward = np.sort(src * n + dst)
        reverse = dst * n + src
        idx = np.searchsorted(forward, reverse)
        idx[idx == forward.size] = 0
        reciprocal = float(np.mean(forward[idx] == reverse)) if forward.size else 0.0
        return {
            "num_nodes": int(n),
            "k": int(k),
            "m": int(self.m),
            "mean_neighbor_similarity": float(self.similarities.mean()),
            "min_neighbor_similarity": float(self.similarities.min()),
            "mean_first_neighbor_similarity": float(self.similarities[:, 0].mean()),
            "mean_kth_neighbor_similarity": float(self.similarities[:, -1].mean()),
            "in_degree_mean": float(indeg.mean()),
            "in_degree_std": float(indeg.std()),
            "in_degree_max": int(indeg.max()),
            "frac_in_degree_zero": float(np.mean(indeg == 0)),
            "frac_reciprocal_edges": reciprocal,
            "bytes_per_node": float((self.neighbors.nbytes + self.similarities.nbytes) / n),
        }


def _validate(embeddings: Any, k: Any, m: Any, backend: str) -> tuple[np.ndarray, int, int]:
    """Check the arguments of :func:`build_proximity_graph`; returns (array, k, clipped m)."""
    if not isinstance(embeddings, np.ndarray):
        raise ValueError(f"embeddings must be a numpy array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, d], got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"embeddings must have a float dtype, got {embeddings.dtype}")
    n, d = embeddings.shape
    if n < 2 or d < 1:
        raise ValueError(f"embeddings must have N >= 2 rows and d >= 1 columns, got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings must be finite, found NaN or inf values")
    for name, value in (("k", k), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    k, m = int(k), int(m)
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k >= n:
        raise ValueError(f"k must be < N (number of nodes, here {n}), got k={k}")
    m = min(m, n - 1)
    if m < k:
        raise ValueError(f"m must be >= k (candidates per node; m >= N-1 means exact kNN), got m={m}, k={k}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("ivf", "hnsw") and m < n - 1:
        raise ValueError(
            f"backend={backend!r} builds approximate exact-kNN graphs and needs m >= N-1 "
            f"(here m={m}, N={n}); use backend='exact' for per-node candidate sets"
        )
    return embeddings, k, m


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy of ``x`` with unit-norm rows; zero rows stay zero. O(N d)."""
    out = np.asarray(x, dtype=np.float32).copy()
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _id_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def _build_key(seed: int) -> np.uint64:
    return np.random.SeedSequence([_STREAM_TAG_BUILD, int(seed)]).generate_state(1, np.uint64)[0]


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_blocks(n_blocks: int, work: Callable[[int], None], num_threads: int) -> None:
    """Run ``work(j)`` for every block j on ``num_threads`` threads, BLAS single-threaded.

    Each block does one matrix product and one GIL-free compiled kernel; running blocks side
    by side keeps every core busy without BLAS threads spinning against numba threads.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        if num_threads <= 1 or n_blocks == 1:
            for j in range(n_blocks):
                work(j)
            return
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            for future in [pool.submit(work, j) for j in range(n_blocks)]:
                future.result()


def _exact_knn(emb: np.ndarray, k: int, num_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN (self excluded) by blocked matrix products.

    Complexity: O(N^2 d) time, O(threads * 2**24) scratch floats.
    """
    n = emb.shape[0]
    rows_per_block = int(max(1, min(n, (1 << 24) // n)))
    neighbors = np.empty((n, k), _id_dtype(n))
    sims = np.empty((n, k), np.float32)

    def work(j: int) -> None:
        lo, hi = j * rows_per_block, min((j + 1) * rows_per_block, n)
        scores = emb[lo:hi] @ emb.T
        _kernels.topk_all_block(scores, np.arange(lo, hi, dtype=np.int64), 0, k, neighbors, sims)

    _run_blocks(-(-n // rows_per_block), work, num_threads)
    return neighbors, sims


def _pool_build(
    x: np.ndarray, k: int, m: int, seed: int, pool_factor: float, block_size: int, num_threads: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate-pool build (module docstring).

    The N nodes (in random order) are cut into nb = ceil(N / block_size) blocks at the bounds
    floor(j N / nb); the pool of block j is the circular window of the candidate permutation
    from bound j to bound j + r, with r = ceil(pool_factor * m / (N / nb)). Every position of
    the permutation therefore lies in exactly r windows, so every node is offered as a
    candidate about m times, as in the independent build.

    The raw bank ``x`` is normalised on the fly: one permuted, normalised float32 copy holds
    the pools, and each block normalises its own rows.

    Returns:
        (neighbors, similarities, largest pool size).

    Complexity: O(N p d) time, O(N d + threads * block_size * p) extra memory.
    """
    n, d = x.shape
    norms = np.linalg.norm(x, axis=1)
    inv_norms = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
    n_blocks = -(-n // block_size)
    bounds = np.arange(n_blocks + 1, dtype=np.int64) * n // n_blocks
    reach = int(np.ceil(pool_factor * m * n_blocks / n))
    rng = np.random.default_rng([_STREAM_TAG_BUILD, int(seed), 1])
    row_order = rng.permutation(n)
    perm = rng.permutation(n)
    inv_perm = np.empty(n, np.int64)
    inv_perm[perm] = np.arange(n)
    if reach >= n_blocks:
        window_ends = bounds[:-1] + n
    else:
        ahead = np.arange(n_blocks) + reach
        window_ends = np.where(ahead <= n_blocks, bounds[np.minimum(ahead, n_blocks)], n + bounds[ahead % n_blocks])
    pool_sizes = window_ends - bounds[:-1]
    p_max = int(pool_sizes.max())
    pool_emb = np.empty((n + p_max, d), np.float32)
    for lo in range(0, n, 1 << 16):
        ids = perm[lo : lo + (1 << 16)]
        pool_emb[lo : lo + ids.size] = x[ids] * inv_norms[ids, None]
    pool_emb[n:] = pool_emb[:p_max]
    key = _build_key(seed)
    neighbors = np.empty((n, k), _id_dtype(n))
    sims = np.empty((n, k), np.float32)

    def work(j: int) -> None:
        rows = row_order[bounds[j] : bounds[j + 1]]
        lo, hi = int(bounds[j]), int(window_ends[j])
        block = (x[rows] * inv_norms[rows, None]).astype(np.float32, copy=False)
        scores = block @ pool_emb[lo:hi].T
        _kernels.topk_pool_block(scores, rows, lo, perm, inv_perm, m, k, key, neighbors, sims)

    _run_blocks(n_blocks, work, num_threads)
    return neighbors, sims, p_max


def _faiss_knn(emb: np.ndarray, k: int, backend: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate kNN with faiss (inner product on unit rows), self removed.

    Rows where the index returned fewer than k valid non-self ids are recomputed exactly.
    IVF: nlist ~ 4 sqrt(N) lists, trained on <= 64 nlist points, nprobe = 32; build
    O(N d nlist / ...) and search O(N nprobe (N / nlist) d). HNSW: M = 32, efConstruction 80,
    efSearch max(2k, 128); O(N log N d) build and search. faiss threads make HNSW construction
    non-deterministic.
    """
    import faiss

    n, d = emb.shape
    if backend == "ivf":
        nlist = int(max(1, min(n // 39, 4 * np.sqrt(n))))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng([_STREAM_TAG_BUILD, int(seed), 2])
        n_train = min(n, 64 * nlist)
        index.cp.seed = int(seed) % (2**31)
        index.train(emb[rng.choice(n, n_train, replace=False)])
        index.add(emb)
        index.nprobe = min(nlist, 32)
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(emb)
        index.hnsw.efSearch = max(2 * k, 128)
    sims_raw, ids_raw = index.search(emb, k + 1)
    neighbors = np.empty((n, k), _id_dtype(n))
    sims = np.empty((n, k), np.float32)
    is_self = ids_raw == np.arange(n)[:, None]
    valid = (ids_raw >= 0) & ~is_self
    # Keep the first k valid entries of each row (faiss returns them sorted by score).
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    neighbors[:] = np.take_along_axis(ids_raw, order, axis=1)
    sims[:] = np.take_along_axis(sims_raw, order, axis=1)
    bad = np.flatnonzero(valid.sum(axis=1) < k)
    if bad.size:
        for lo in range(0, bad.size, 1024):
            rows = bad[lo : lo + 1024].astype(np.int64)
            _kernels.topk_all_block(emb[rows] @ emb.T, rows, 0, k, neighbors, sims)
    return neighbors, sims


def build_proximity_graph(
    embeddings: np.ndarray,
    k: int,
    m: int,
    seed: int = 0,
    backend: str = "auto",
    *,
    pool_factor: float = 1.5,
    block_size: int = 512,
    num_threads: int | None = None,
) -> ProximityGraph:
    """Build the BatchSampler proximity graph.

    Args:
        embeddings: float [N, d] embedding bank (finite; normalised to unit rows inside, zero
            rows are allowed and have similarity 0 with everything).
        k: out-degree, 1 <= k < N.
        m: candidates per node, k <= m; values >= N - 1 are clipped to N - 1 (exact kNN).
            m == k keeps every candidate: the graph then ignores the embeddings.
        seed: seed of the candidate draws; same (seed, N, k, m, backend) give the same
            candidate sets whatever the embeddings.
        backend: "auto", "exact", "pernode", "ivf" or "hnsw" (module docstring).
        pool_factor: pool size p >= pool_factor * m of the candidate-pool build (>= 1; 1.5
            keeps the matrix product at 1.5x the flops of an [N, d] x [d, m] product).
        block_size: nodes per block of the pool build (rows of one matrix product).
        num_threads: threads of the build (default: the CPUs this process may use).

    Returns:
        A :class:`ProximityGraph`.

    Raises:
        ValueError: on invalid arguments (message names the argument, its value and what is
            allowed).

    Complexity:
        m < N - 1, "exact": O(N p d) time (dense matrix products) + O(N (p + k)) for the
        per-node draws and top-k; O(N d + N k) memory (one normalised permuted copy of the
        bank plus the [N, k] outputs).
        m < N - 1, "pernode": O(N m d) time with random row reads.
        m >= N - 1, "exact": O(N^2 d) time, O(threads * 2**24) scratch floats.
        "ivf"/"hnsw": see :func:`_faiss_knn`.
    """
    t0 = time.perf_counter()
    embeddings, k, m = _validate(embeddings, k, m, backend)
    if not pool_factor >= 1.0:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    num_threads = _default_threads() if num_threads is None else max(1, int(num_threads))
    n = embeddings.shape[0]
    exact_knn = m >= n - 1
    if backend == "auto":
        backend = "exact" if (not exact_knn or n <= EXACT_KNN_MAX_NODES) else "hnsw"
    if backend == "pernode" and exact_knn:
        backend = "exact"
    pool_size = 0
    if backend in ("ivf", "hnsw"):
        neighbors, sims = _faiss_knn(normalize_rows(embeddings), k, backend, seed)
        candidates = "all"
    elif exact_knn:
        neighbors, sims = _exact_knn(normalize_rows(embeddings), k, num_threads)
        candidates = "all"
    elif backend == "pernode":
        neighbors = np.empty((n, k), _id_dtype(n))
        sims = np.empty((n, k), np.float32)
        _kernels.topk_independent(normalize_rows(embeddings), m, k, _build_key(seed), neighbors, sims)
        candidates = "independent"
    else:
        neighbors, sims, pool_size = _pool_build(embeddings, k, m, seed, pool_factor, int(block_size), num_threads)
        candidates = "pool"
    return ProximityGraph(
        neighbors=neighbors,
        similarities=sims,
        k=k,
        m=m,
        seed=int(seed),
        backend=backend,
        build_seconds=time.perf_counter() - t0,
        num_nodes=n,
        candidates=candidates,
        pool_size=pool_size,
    )
