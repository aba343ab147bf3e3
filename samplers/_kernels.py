"""Compiled (numba) kernels behind :mod:`samplers.graph` and :mod:`samplers.rwr`.

Nothing here is public API. The kernels share one random number generator: SplitMix64, a
counter-based generator whose whole state is one ``uint64``. Every walk and every graph row
derives its own state from ``(seed, index)``, so results never depend on thread scheduling or
on the order in which rows or walks are processed.

One 64-bit draw feeds two decisions in the walk: the high 32 bits decide restart versus move,
the low 32 bits pick the neighbour (disjoint bit ranges, hence independent). Integers below n
come from 32 bits by multiply-shift, without rejection: the bias is at most n / 2**32 relative
(2e-4 at n = 10^6) and n must be < 2**32 (walk fills and graph ids).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK32 = np.uint64(0xFFFFFFFF)
_U64_1 = np.uint64(1)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_EMPTY = np.int64(-1)


@intrinsic
def _prefetch(typingctx, array, row, col):
    """Hint the CPU to fetch ``array[row, col]`` into cache (LLVM prefetch; no result)."""
    sig = types.void(array, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1], args[2]])
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0i8")
        # read access, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(pointer, byte_pointer), int32(0), int32(3), int32(1)])
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(inline="always")
def _mix(z):
    """SplitMix64 finaliser (a bijection of uint64)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@nb.njit(inline="always")
def _next(state):
    """Advance a SplitMix64 state; returns (new_state, 64 random bits)."""
    state = state + _GAMMA
    return state, _mix(state)


@nb.njit(inline="always")
def _below(bits32, n):
    """Map 32 random bits to an integer in [0, n) (Lemire's multiply-shift), n < 2**32."""
    return np.int64((bits32 * np.uint64(n)) >> _S32)


@nb.njit(inline="always")
def _stream(key, index):
    """Independent generator state for item ``index`` of the stream ``key``."""
    return _mix(key ^ _mix((np.uint64(index) + _U64_1) * _GAMMA))


# --------------------------------------------------------------------------------------------
# Small open-addressing hash set of node ids (linear probing); the table is a caller-owned
# integer array filled with -1 whose length is a power of two >= 2 * (number of inserts), and
# ``shift = 64 - log2(length)`` (multiplicative hashing keeps the top bits).
# --------------------------------------------------------------------------------------------


@nb.njit(inline="always")
def _set_insert(table, shift, node):
    """Insert ``node``; returns True when it was not there yet. O(1) expected."""
    mask = table.shape[0] - 1
    h = np.int64((np.uint64(node) * _GAMMA) >> shift)
    while True:
        cur = table[h]
        if cur == node:
            return False
        if cur == _EMPTY:
            table[h] = node
            return True
        h = (h + 1) & mask


@nb.njit(inline="always")
def _set_insert_row(tables, row, shift, node):
    """:func:`_set_insert` into row ``row`` of a 2-D table (no view is created)."""
    mask = tables.shape[1] - 1
    h = np.int64((np.uint64(node) * _GAMMA) >> shift)
    while True:
        cur = tables[row, h]
        if cur == node:
            return False
        if cur == -1:
            tables[row, h] = node
            return True
        h = (h + 1) & mask


# --------------------------------------------------------------------------------------------
# Random walk with restart
# --------------------------------------------------------------------------------------------


@nb.njit(cache=True)
def walk_into(neighbors, start, restart_threshold, max_steps, key, out, table, shift):
    """One random walk with restart writing ``out.shape[0]`` distinct ids into ``out``.

    Args:
        neighbors: int32/int64 [N, k] adjacency (every entry a valid node id).
        start: start node; ``out[0] = start``.
        restart_threshold: ``uint64(restart_prob * 2**32)``; restart when the high 32 bits of
            a draw fall below it.
        max_steps: step cap; afterwards the batch is filled with uniform unvisited nodes.
        key: uint64 generator state of this walk.
        out: int64 [B] output.
        table: int64 scratch hash table, length a power of two >= 2 B; reset here.
        shift: hash shift matching ``table``.

    Returns:
        (number of filled ids, number of steps taken).

    Complexity: O(B / (1 - restart_prob)) expected steps when the walk is not trapped, at most
    ``max_steps`` plus O(B * N / (N - B)) expected draws for the fill; O(B) memory.
    """
    n = neighbors.shape[0]
    k = neighbors.shape[1]
    batch_size = out.shape[0]
    table[:] = _EMPTY
    _set_insert(table, shift, start)
    out[0] = start
    count = 1
    cur = start
    steps = 0
    state = key
    while count < batch_size and steps < max_steps:
        steps += 1
        state, z = _next(state)
        if (z >> _S32) < restart_threshold:
            cur = start
            continue
        cur = np.int64(neighbors[cur, _below(z & _MASK32, k)])
        if _set_insert(table, shift, cur):
            out[count] = cur
            count += 1
    filled = 0
    while count < batch_size:
        state, z = _next(state)
        node = _below(z & _MASK32, n)
        if _set_insert(table, shift, node):
            out[count] = node
            count += 1
            filled += 1
    return filled, steps


@nb.njit(cache=True)
def walk_one(neighbors, start, batch_size, restart_threshold, max_steps, key):
    """Allocate and run one walk (see :func:`walk_into`); returns (ids, n_filled, steps)."""
    size = 16
    while size < 2 * batch_size:
        size *= 2
    shift = np.uint64(64 - int(np.log2(size)))
    table = np.empty(size, np.int64)
    out = np.empty(batch_size, np.int64)
    filled, steps = walk_into(neighbors, start, restart_threshold, max_steps, key, out, table, shift)
    return out, filled, steps


@nb.njit(parallel=True, cache=True)
def walk_many(neighbors, starts, batch_size, restart_threshold, max_steps, keys, group):
    """Many independent walks; walk w equals ``walk_one(..., starts[w], ..., keys[w])``.

    Walks are processed in groups of ``group`` per thread, groups in parallel over the numba
    threads. Within a group every round has two passes over the walks still running: the
    first draws each walk's random number and prefetches the neighbour-table entry it will
    read (prefetches retire at once, so the cache misses of all walks overlap), the second
    reads the entries and does the restart/insert bookkeeping. Each walk consumes exactly the draws of
    :func:`walk_into`, so the result does not depend on ``group`` or on the threads.

    Returns:
        (ids int64 [W, B], n_filled int64 [W], steps int64 [W]).

    Complexity: O(W * B / (1 - restart_prob)) expected steps, O(W * B) memory.
    """
    n = neighbors.shape[0]
    k = neighbors.shape[1]
    n_walks = starts.shape[0]
    size = 16
    while size < 2 * batch_size:
        size *= 2
    shift = np.uint64(64 - int(np.log2(size)))
    out = np.empty((n_walks, batch_size), np.int64)
    filled = np.zeros(n_walks, np.int64)
    steps = np.zeros(n_walks, np.int64)
    n_groups = (n_walks + group - 1) // group
    for g in nb.prange(n_groups):
        lo = g * group
        width = min(lo + group, n_walks) - lo
        tables = np.full((width, size), -1, neighbors.dtype)
        cur = np.empty(width, np.int64)
        col = np.empty(width, np.int64)
        moved = np.empty(width, np.bool_)
        count = np.ones(width, np.int64)
        state = np.empty(width, np.uint64)
        running = np.empty(width, np.int64)
        n_running = 0
        for j in range(width):
            w = lo + j
            s = np.int64(starts[w])
            _set_insert_row(tables, j, shift, s)
            out[w, 0] = s
            cur[j] = s
            state[j] = keys[w]
            if batch_size > 1 and max_steps > 0:
                running[n_running] = j
                n_running += 1
        while n_running > 0:
            for r in range(n_running):
                j = running[r]
                st, z = _next(state[j])
                state[j] = st
                move = (z >> _S32) >= restart_threshold
                moved[j] = move
                if move:
                    col[j] = _below(z & _MASK32, k)
                    _prefetch(neighbors, cur[j], col[j])
            r = 0
            while r < n_running:
                j = running[r]
                w = lo + j
                steps[w] += 1
                if moved[j]:
                    nxt = np.int64(neighbors[cur[j], col[j]])
                    cur[j] = nxt
                    if _set_insert_row(tables, j, shift, nxt):
                        out[w, count[j]] = nxt
                        count[j] += 1
                else:
                    cur[j] = starts[w]
                if count[j] >= batch_size or steps[w] >= max_steps:
                    n_running -= 1
                    running[r] = running[n_running]
                else:
                    r += 1
        for j in range(width):
            w = lo + j
            st = state[j]
            while count[j] < batch_size:
                st, z = _next(st)
                node = _below(z & _MASK32, n)
                if _set_insert_row(tables, j, shift, node):
                    out[w, count[j]] = node
                    count[j] += 1
                    filled[w] += 1
    return out, filled, steps


# --------------------------------------------------------------------------------------------
# Top-k selection, two variants.
# * Threshold buffer (exact kNN rows, k << row length): values above the running threshold go
#   to a buffer of 4k slots; a full buffer is cut back to its k largest by quickselect and the
#   threshold raised to the k-th value. Almost every value costs one well-predicted comparison.
# * Histogram cut (candidate subsets, k ~ m / 10): see _topk_masked.
# --------------------------------------------------------------------------------------------


@nb.njit(inline="always")
def _select_top(bv, bi, count, k):
    """Quickselect: move the k largest of bv[:count] (with ids bi) to the front. O(count)."""
    lo = 0
    hi = count - 1
    target = k - 1
    while lo < hi:
        mid = (lo + hi) // 2
        pivot = bv[mid]
        i = lo
        j = hi
        while i <= j:
            while bv[i] > pivot:
                i += 1
            while bv[j] < pivot:
                j -= 1
            if i <= j:
                bv[i], bv[j] = bv[j], bv[i]
                bi[i], bi[j] = bi[j], bi[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return


@nb.njit(inline="always")
def _finish(bv, bi, count, k, out_v, out_i):
    """Write the k largest of the buffer to out_v/out_i, sorted by decreasing value."""
    if count > k:
        _select_top(bv, bi, count, k)
    order = np.argsort(-bv[:k], kind="mergesort")
    for t in range(k):
        out_v[t] = bv[order[t]]
        out_i[t] = bi[order[t]]


_N_BUCKETS = 2048
_SIGN32 = np.uint32(0x80000000)
_SORT_IN_PLACE_MAX = 1024  # longer runs (values crowded into few buckets) use np.sort


@nb.njit(inline="always")
def _sort_key(value_bits, ident):
    """uint64 whose order is the order of the float32 (given by its bits), ties by ident."""
    if value_bits & _SIGN32:
        ordered = ~value_bits
    else:
        ordered = value_bits | _SIGN32
    return (np.uint64(ordered) << _S32) | np.uint64(ident)


@nb.njit(inline="always")
def _bucket(value, scale, top):
    """Bucket of a cosine in [-1, 1] (values rounded slightly outside are clamped)."""
    return max(0, min(np.int64((value + np.float32(1.0)) * scale), top))


@nb.njit(inline="always")
def _max_of(vals, n_vals):
    """max(vals[:n_vals]) with four independent running maxima (breaks the latency chain)."""
    a = vals[0]
    b = a
    c = a
    d = a
    t = 0
    while t + 4 <= n_vals:
        a = max(a, vals[t])
        b = max(b, vals[t + 1])
        c = max(c, vals[t + 2])
        d = max(d, vals[t + 3])
        t += 4
    while t < n_vals:
        a = max(a, vals[t])
        t += 1
    return max(max(a, b), max(c, d))


@nb.njit(inline="always")
def _topk_masked(vals, keep, n_vals, k, hist, keys, out_v, out_i):
    """Top-k of the cosines vals[t] with keep[t] == 1 (t < n_vals), sorted descending.

    One pass fills a histogram of ``hist.shape[0]`` equal-width buckets over [-1, 1] with the
    kept values; the bucket holding the k-th largest is found from the largest value down; a
    second pass scatters the kept values of that bucket or above into ``keys`` grouped by
    bucket (descending), so an insertion sort only orders values inside a bucket. Writes the k values
    to ``out_v`` and their positions t to ``out_i``. Needs at least k kept values; ``keys`` is
    uint64 scratch of length >= n_vals.

    Complexity: O(n_vals + buckets + k * values per bucket); O(n log n) when values crowd
    into one bucket (e.g. a zero embedding, all cosines 0).
    """
    top = hist.shape[0] - 1
    scale = np.float32(hist.shape[0] / 2.0)
    bits = vals.view(np.uint32)
    hist[:] = 0
    for t in range(n_vals):
        hist[_bucket(vals[t], scale, top)] += keep[t]
    hi = _max_of(vals, n_vals)
    cut = _bucket(hi, scale, top)
    above = 0
    while above + hist[cut] < k:
        above += hist[cut]
        cut -= 1
    total = 0
    for c in range(_bucket(hi, scale, top), cut - 1, -1):
        count = hist[c]
        hist[c] = total
        total += count
    # Values below the cut bucket's lower edge (minus rounding slack) are skipped with one
    # comparison; the bucket is recomputed, exactly as above, only for the few others.
    edge = np.float32(cut / scale - 1.0 - 1e-6)
    for t in range(n_vals):
        if vals[t] >= edge and keep[t]:
            c = _bucket(vals[t], scale, top)
            if c >= cut:
                keys[hist[c]] = _sort_key(bits[t], t)
                hist[c] += 1
    if total <= _SORT_IN_PLACE_MAX:
        for t in range(1, total):
            key = keys[t]
            j = t - 1
            while j >= 0 and keys[j] < key:
                keys[j + 1] = keys[j]
                j -= 1
            keys[j + 1] = key
    else:
        keys[:total] = np.sort(keys[:total])[::-1]
    out_bits = out_v.view(np.uint32)
    for t in range(k):
        key = keys[t]
        ordered = np.uint32(key >> _S32)
        if ordered & _SIGN32:
            out_bits[t] = ordered & ~_SIGN32
        else:
            out_bits[t] = ~ordered
        out_i[t] = np.int64(key & _MASK32)


@nb.njit(nogil=True, cache=True)
def topk_all_block(scores, row_nodes, col_start, k, out_nb, out_sim):
    """Exact top-k per row of a dense score block, excluding each row's own node.

    Args:
        scores: float32 [b, c]; column j is node ``col_start + j``.
        row_nodes: int64 [b] node id of each row.
        col_start: id of the node in column 0.
        k: neighbours to keep (k <= c - 1).
        out_nb, out_sim: [N, k] outputs written at rows ``row_nodes``.

    Complexity: O(b * c) expected. Releases the GIL (callers run blocks in threads).
    """
    b, c = scores.shape
    cap = 4 * k
    bv = np.empty(cap, np.float32)
    bi = np.empty(cap, np.int64)
    for r in range(b):
        node = row_nodes[r]
        count = 0
        threshold = np.float32(-np.inf)
        for j in range(c):
            value = scores[r, j]
            if (value > threshold or count < k) and col_start + j != node:
                bv[count] = value
                bi[count] = col_start + j
                count += 1
                if count == cap:
                    _select_top(bv, bi, count, k)
                    count = k
                    threshold = bv[0]
                    for t in range(1, k):
                        threshold = min(threshold, bv[t])
        _finish(bv, bi, count, k, out_sim[node], out_nb[node])


@nb.njit(nogil=True, cache=True, fastmath=True)
def topk_pool_block(scores, row_nodes, pool_start, perm, inv_perm, m, k, key, out_nb, out_sim):
    """Per-node uniform m-subset of a shared candidate pool, then exact top-k of that subset.

    The pool of this block is the circular window ``perm[pool_start : pool_start + p]`` of a
    uniform random permutation ``perm`` of all N nodes (column j of ``scores`` is node
    ``perm[(pool_start + j) % N]``). Row r (node i) removes itself from the pool if present and
    draws its own m of the remaining ``avail`` positions uniformly without replacement, with the
    generator stream ``(key, i)``: a partial Fisher-Yates shuffle picks the m kept positions, or
    the ``avail - m`` dropped ones when that is fewer (the complement of a uniform subset is
    uniform). The window is a uniform p-subset independent of i, so the m-subset is marginally
    a uniform m-subset of the other N - 1 nodes.

    Args:
        scores: float32 [b, p] similarities of the block rows with the pool.
        row_nodes: int64 [b] node id of each row.
        pool_start: start of the window in ``perm``.
        perm, inv_perm: int64 [N] permutation and its inverse.
        m: candidates per node (clipped to the available pool).
        k: neighbours to keep (k <= m).
        key: uint64 stream key of the build.
        out_nb, out_sim: [N, k] outputs written at rows ``row_nodes``.

    Complexity: O(b * (p + min(m, p - m) + k)) time, O(p) scratch. Releases the GIL.
    Scores must be cosines in [-1, 1] (see :func:`_topk_masked`).
    """
    n = perm.shape[0]
    b, p = scores.shape
    pos = np.empty(p, np.int64)
    keep = np.empty(p, np.uint8)
    keys = np.empty(p, np.uint64)
    hist = np.empty(_N_BUCKETS, np.int32)
    top_v = np.empty(k, np.float32)
    top_i = np.empty(k, np.int64)
    for r in range(b):
        node = row_nodes[r]
        for t in range(p):
            pos[t] = t
        self_pos = (inv_perm[node] - pool_start) % n
        avail = p
        if self_pos < p:
            pos[self_pos] = p - 1
            pos[p - 1] = self_pos
            avail = p - 1
        take = min(m, avail)
        draws = min(take, avail - take)
        mark = np.uint8(1) if draws == take else np.uint8(0)
        keep[:] = 1 - mark
        if self_pos < p:
            keep[self_pos] = 0
        state = _stream(key, node)
        for t in range(draws):
            state, z = _next(state)
            j = t + _below(z & _MASK32, avail - t)
            chosen = pos[j]
            pos[j] = pos[t]
            pos[t] = chosen
            keep[chosen] = mark
        _topk_masked(scores[r], keep, p, k, hist, keys, top_v, top_i)
        for t in range(k):
            q = pool_start + top_i[t]
            if q >= n:
                q -= n
            out_sim[node, t] = top_v[t]
            out_nb[node, t] = perm[q]


@nb.njit(parallel=True, cache=True)
def topk_independent(emb, m, k, key, out_nb, out_sim):
    """Reference build: independent uniform m-subset per node, gathered row by row.

    Node i draws m distinct candidates from {0..N-1} \\ {i} with its own generator stream
    (rejection into a hash set) and scores them one dot product at a time.

    Complexity: O(N * m * d) time with random row reads (memory-bound), O(m) scratch per row.
    """
    n, d = emb.shape
    size = 16
    while size < 2 * m:
        size *= 2
    shift = np.uint64(64 - int(np.log2(size)))
    for i in nb.prange(n):
        table = np.full(size, _EMPTY, np.int64)
        state = _stream(key, i)
        vals = np.empty(m, np.float32)
        ids = np.empty(m, np.int64)
        got = 0
        while got < m:
            state, z = _next(state)
            c = _below(z & _MASK32, n - 1)
            if c >= i:
                c += 1
            if not _set_insert(table, shift, c):
                continue
            acc = np.float32(0.0)
            for t in range(d):
                acc += emb[i, t] * emb[c, t]
            vals[got] = acc
            ids[got] = c
            got += 1
        hist = np.empty(_N_BUCKETS, np.int32)
        keys = np.empty(m, np.uint64)
        keep = np.ones(m, np.uint8)
        top_v = np.empty(k, np.float32)
        top_i = np.empty(k, np.int64)
        _topk_masked(vals, keep, m, k, hist, keys, top_v, top_i)
        for t in range(k):
            out_sim[i, t] = top_v[t]
            out_nb[i, t] = ids[top_i[t]]
