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
pool is the smallest such multiple >= max(pool_factor * m, m + 1).

Per-node draw and top-k (:func:`samplers._kernels.topk_pool_block`). A node's m-subset of its
pool is drawn by sequential (selection) sampling: the pool positions are visited in a fixed
order and each is kept with probability (still to keep) / (still to visit), which makes every
m-subset equally likely whatever the order, provided the order does not depend on the draws.
The order used visits the highest scores first, in bands found by counting passes against a
threshold, so a node stops after about k p / m visits instead of drawing all of its m
candidates; the kept ones of the band are the top of its candidate set and are bucket-sorted.
The law of the result is exactly that of "uniform m-subset, then top k" (a test checks the
exact per-pair probabilities). With ``m == k`` the band is the whole pool in position order,
so the neighbour sets do not depend on the embeddings for a given seed; with ``m > k`` the
visiting order depends on the scores, so two different banks with the same seed get
different (equally distributed) candidate sets.

Threads: chunks of consecutive blocks run on ``num_threads`` Python threads (guided
scheduling: long chunks first, short ones at the end). A thread gathers
(and normalises) its chunk's pool rows once from the raw bank through the permutation, then per
block gathers the block's rows, runs one single-threaded BLAS product into its own score
buffer and one GIL-free numba kernel (BLAS threads spinning next to numba threads cost more
than they gave on a 2-core box). The bank itself is never copied. Results do not depend on the
number of threads.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from samplers import _kernels
from samplers._checks import is_int

BACKENDS = ("auto", "exact", "pernode", "ivf", "hnsw")
EXACT_KNN_MAX_NODES = 50_000
_CHUNK_BLOCKS = 16  # most consecutive blocks sharing one gathered pool window (pool build)
_BAND_Z = 2.5  # first score band of a node holds k kept candidates with ~2.5 sd to spare (speed only)
_STREAM_TAG_BUILD = 0x6B4E4E  # separates the build's random streams from other users of a seed
_NOT_FINITE = "embeddings must be finite, found NaN or inf values"
_SAFE_NORM_LOW, _SAFE_NORM_HIGH = 1e-15, 1e15  # float32 norms computed exactly enough in float32


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


def _validate(
    embeddings: Any, k: Any, m: Any, backend: str, check_finite: bool = True
) -> tuple[np.ndarray, int, int]:
    """Check the arguments of :func:`build_proximity_graph`; returns (array, k, clipped m).

    ``check_finite=False`` leaves the NaN / inf check to the caller (the pool build does it
    while it reads the rows, which saves a pass over the bank).
    """
    if not isinstance(embeddings, np.ndarray):
        raise ValueError(f"embeddings must be a numpy array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, d], got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"embeddings must have a float dtype, got {embeddings.dtype}")
    n, d = embeddings.shape
    if n < 2 or d < 1:
        raise ValueError(f"embeddings must have N >= 2 rows and d >= 1 columns, got shape {embeddings.shape}")
    if check_finite:
        _check_finite(embeddings)
    for name, value in (("k", k), ("m", m)):
        if not is_int(value):
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


def _check_finite(embeddings: np.ndarray) -> None:
    if not np.isfinite(embeddings).all():
        raise ValueError(_NOT_FINITE)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy of finite ``x`` with unit-norm rows; zero rows stay zero. O(N d).

    Norms are taken in float32, whose sum of squares overflows above about 1e19 and underflows
    below about 1e-19. Rows whose float32 norm falls outside [1e-15, 1e15] (tiny, huge, or
    beyond float32's range in a float64 input) are redone in float64 after division by their
    largest absolute value, so a row's direction survives any finite scale.
    """
    src = np.asarray(x)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        out = src.astype(np.float32)  # always a copy: src may hold other dtypes or be read-only
        norms = np.linalg.norm(out, axis=1, keepdims=True)
    safe = (norms >= _SAFE_NORM_LOW) & (norms <= _SAFE_NORM_HIGH)
    np.divide(out, norms, out=out, where=safe)
    risky = np.flatnonzero(~safe[:, 0])
    if risky.size:
        rows = src[risky].astype(np.float64)
        peak = np.abs(rows).max(axis=1, keepdims=True)
        np.divide(rows, peak, out=rows, where=peak > 0)
        length = np.linalg.norm(rows, axis=1, keepdims=True)
        np.divide(rows, length, out=rows, where=length > 0)
        out[risky] = rows
    return out


def _id_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def _build_key(seed: int) -> np.uint64:
    return np.random.SeedSequence([_STREAM_TAG_BUILD, int(seed)]).generate_state(1, np.uint64)[0]


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_guided(
    n_blocks: int,
    max_chunk: int,
    make_state: Callable[[], Any],
    work: Callable[[int, int, Any], None],
    num_threads: int,
) -> None:
    """Run ``work(first, last, state)`` over chunks of consecutive blocks covering
    ``range(n_blocks)``, on ``num_threads`` threads with BLAS single-threaded.

    Each block does one matrix product and one GIL-free compiled kernel; running blocks side by
    side keeps every core busy without BLAS threads spinning against numba threads. Guided
    scheduling: a thread takes the next ``min(max_chunk, remaining / (2 threads))``
    blocks, so chunks are long (a chunk shares one gathered pool window) while much work is
    left and short at the end (the threads finish together). Each thread builds its scratch
    ``state`` once, so no block allocates (or page-faults) its own buffers.
    """
    workers = max(1, min(num_threads, n_blocks))
    lock = threading.Lock()
    claimed = [0]

    def worker() -> None:
        state = make_state()
        while True:
            with lock:
                first = claimed[0]
                size = max(1, min(max_chunk, (n_blocks - first) // (2 * workers)))
                claimed[0] = min(n_blocks, first + size)
            if first >= n_blocks:
                return
            work(first, min(n_blocks, first + size), state)

    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1:
            worker()
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(worker) for _ in range(workers)]:
                future.result()


def _exact_knn(emb: np.ndarray, k: int, num_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN (self excluded) by blocked matrix products.

    Complexity: O(N^2 d) time, O(threads * 2**24) scratch floats.
    """
    n = emb.shape[0]
    rows_per_block = int(max(1, min(n, (1 << 24) // n)))
    neighbors = np.empty((n, k), _id_dtype(n))
    sims = np.empty((n, k), np.float32)

    def work(first: int, last: int, _state: None) -> None:
        lo, hi = first * rows_per_block, min(last * rows_per_block, n)
        scores = emb[lo:hi] @ emb.T
        _kernels.topk_all_block(scores, np.arange(lo, hi, dtype=np.int64), 0, k, neighbors, sims)

    _run_guided(-(-n // rows_per_block), 1, lambda: None, work, num_threads)  # one block at a time
    return neighbors, sims


def _pool_reach(bounds: np.ndarray, n: int, min_pool: float) -> int:
    """Smallest number r of blocks such that every window of r consecutive blocks (circular)
    holds at least ``min_pool`` nodes; the whole permutation when no r < number of blocks does."""
    n_blocks = bounds.size - 1
    sizes = np.diff(bounds)
    reach = max(1, int(np.ceil(min_pool * n_blocks / n)))
    while reach < n_blocks:
        window = np.convolve(np.concatenate([sizes, sizes[: reach - 1]]), np.ones(reach, np.int64), "valid")
        if window.min() >= min_pool:
            break
        reach += 1
    return reach


def _pool_build(
    x: np.ndarray, k: int, m: int, seed: int, pool_factor: float, block_size: int, num_threads: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate-pool build (module docstring).

    The N nodes (in random order) are cut into nb = ceil(N / block_size) blocks at the bounds
    floor(j N / nb); the pool of block j is the circular window of the candidate permutation
    from bound j to bound j + r, with r the smallest count of blocks whose windows all hold at
    least max(pool_factor * m, m + 1) nodes. Every position of the permutation therefore lies
    in exactly r windows, so every node is offered as a candidate about m times, as in the
    independent build.

    Consecutive blocks are grouped in chunks (at most _CHUNK_BLOCKS, shorter towards the end:
    :func:`_run_guided`); a thread gathers the union of its chunk's pool windows once
    (normalised float32 rows, read from the raw bank ``x`` through the permutation) and each
    block's pool is then a contiguous slice of it. Each block gathers and normalises its own
    rows, multiplies them by its pool (one single-threaded BLAS product into a per-thread
    buffer) and runs :func:`_kernels.topk_pool_block`.

    Returns:
        (neighbors, similarities, largest pool size).

    Raises:
        ValueError: when a row holds a NaN or an inf (found while gathering the rows; the
            non-finite rows are zeroed so the kernels stay safe until then).

    Complexity: O(N p d) time for the products, O(N (p + k p / m)) for the per-node draws and
    top-k, about 1 + p / (16 block_size) gathered bank rows per node; O(N + N k) memory
    plus, per thread, O((p + 16 block_size) d + block_size * p) scratch.
    """
    n, d = x.shape
    n_blocks = -(-n // block_size)
    bounds = np.arange(n_blocks + 1, dtype=np.int64) * n // n_blocks
    reach = _pool_reach(bounds, n, max(pool_factor * m, m + 1))
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
    b_max = int(np.diff(bounds).max())
    # Longest union of the pool windows of the longest chunk (see _run_guided).
    max_chunk = max(1, min(_CHUNK_BLOCKS, n_blocks // (2 * max(1, min(num_threads, n_blocks)))))
    chunk_ends = window_ends[np.minimum(np.arange(n_blocks) + max_chunk, n_blocks) - 1]
    span_max = int((chunk_ends - bounds[:-1]).max())
    key = _build_key(seed)
    neighbors = np.empty((n, k), _id_dtype(n))
    sims = np.empty((n, k), np.float32)

    def make_state() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.empty((span_max, d), np.float32),
            np.empty((b_max, d), np.float32),
            np.empty(b_max * p_max, np.float32),
        )

    not_finite = []

    def work(first: int, last: int, state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        pool_rows, block_rows, score_buf = state
        lo = int(bounds[first])
        if _kernels.gather_unit_rows(x, perm, lo, int(window_ends[last - 1]) - lo, pool_rows):
            not_finite.append(first)  # every row is gathered at least once, as a block row
        for j in range(first, last):
            offset, p = int(bounds[j]) - lo, int(pool_sizes[j])
            rows = row_order[bounds[j] : bounds[j + 1]]
            b = rows.size
            if _kernels.gather_unit_rows(x, row_order, int(bounds[j]), b, block_rows):
                not_finite.append(j)
            scores = score_buf[: b * p].reshape(b, p)
            np.matmul(block_rows[:b], pool_rows[offset : offset + p].T, out=scores)
            _kernels.topk_pool_block(
                scores, rows, int(bounds[j]), perm, inv_perm, m, k, key, _BAND_Z, neighbors, sims
            )

    _run_guided(n_blocks, max_chunk, make_state, work, num_threads)
    if not_finite:
        raise ValueError(_NOT_FINITE)
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
        seed: seed of the candidate draws; same (seed, embeddings, k, m, backend,
            pool_factor, block_size) give the same graph whatever the number of threads. The
            candidate sets do not depend on the embeddings for "pernode", or for "exact" with
            m == k; the pool build with m > k couples its draws to the score order (module
            docstring), so there only their law is embedding-free.
        backend: "auto", "exact", "pernode", "ivf" or "hnsw" (module docstring).
        pool_factor: pool size p >= pool_factor * m (and >= m + 1) of the candidate-pool
            build (>= 1; 1.5 keeps the matrix product at 1.5x the flops of an [N, d] x [d, m]
            product).
        block_size: nodes per block of the pool build (rows of one matrix product).
        num_threads: threads of the build (default: the CPUs this process may use).

    Returns:
        A :class:`ProximityGraph`.

    Raises:
        ValueError: on invalid arguments (message names the argument, its value and what is
            allowed).

    Complexity:
        m < N - 1, "exact": O(N p d) time (dense matrix products) + O(N p) vectorised work and
        O(N k p / m) draws for the per-node draws and top-k, about 2 gathered bank rows per
        node; O(N k) memory (the [N, k] outputs and two permutations) plus per-thread scratch
        of O((p + 16 block_size) d + block_size p) floats.
        m < N - 1, "pernode": O(N m d) time with random row reads.
        m >= N - 1, "exact": O(N^2 d) time, O(threads * 2**24) scratch floats.
        "ivf"/"hnsw": see :func:`_faiss_knn`.
    """
    t0 = time.perf_counter()
    embeddings, k, m = _validate(embeddings, k, m, backend, check_finite=False)
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not pool_factor >= 1.0:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    num_threads = _default_threads() if num_threads is None else max(1, int(num_threads))
    n = embeddings.shape[0]
    exact_knn = m >= n - 1
    if backend == "auto":
        backend = "exact" if (not exact_knn or n <= EXACT_KNN_MAX_NODES) else "hnsw"
    if backend == "pernode" and exact_knn:
        backend = "exact"
    pool_size = 0
    if backend in ("ivf", "hnsw") or exact_knn or backend == "pernode":
        _check_finite(embeddings)  # the pool build checks the rows as it gathers them
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
        x = embeddings
        if x.dtype not in (np.float32, np.float64) or not x.dtype.isnative:
            x = x.astype(np.float32)  # the compiled gather reads float32 or float64
        neighbors, sims, pool_size = _pool_build(x, k, m, seed, pool_factor, int(block_size), num_threads)
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
