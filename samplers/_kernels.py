"""Compiled (numba) kernels behind :mod:`samplers.graph` and :mod:`samplers.rwr`.

Nothing here is public API. The kernels share one random number generator: SplitMix64, a
counter-based generator whose whole state is one ``uint64``. Every walk and every graph row
derives its own state from ``(seed, index)``, so results never depend on thread scheduling or
on the order in which rows or walks are processed.

One 64-bit draw feeds two decisions in the walk: the high 32 bits decide restart versus move,
the low 32 bits pick the neighbour (disjoint bit ranges, hence independent). Integers below n
come from 32 bits by multiply-shift, without rejection: the bias is at most n / 2**32 relative
(2e-4 at n = 10^6) and n must be < 2**32 (walk fills and graph ids). The generator is
counter-based (draw s of a stream is a function of s alone), which two kernels use: the
overlapped one-walk kernel knows every restart of a walk before reading any row, and the pool
build draws a band's selection decisions in one vectorised loop.

The pool build's compress step uses an LLVM masked compress-store (``vpcompressd`` on AVX-512
machines); without AVX-512 the same positions come from a portable loop.
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


@intrinsic
def _prefetch_1d(typingctx, array, index):
    """Hint the CPU to fetch ``array[index]`` of a 1-D array into cache (no result)."""
    sig = types.void(array, types.intp)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]])
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0i8")
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


_EXCURSION_LANES = 16  # excursions of one walk advanced together by walk_into_overlapped
_EXCURSION_AHEAD = 256  # excursions start at most this many steps after the first uncommitted one


@nb.njit(inline="always")
def _step_bits(key, step):
    """The 64 random bits of step ``step`` (1-based) of the walk with state ``key``: the value
    :func:`walk_into` draws at that step (SplitMix64 is counter-based)."""
    return _mix(key + np.uint64(step) * _GAMMA)


@nb.njit(cache=True)
def walk_into_overlapped(neighbors, start, restart_threshold, max_steps, key, out, table, shift, moves, lanes, ahead):
    """:func:`walk_into` with the memory reads of independent excursions overlapped.

    Gives exactly the ids, fill count and step count of :func:`walk_into` (same arguments).
    Between two restarts the walk is an *excursion* from ``start``: a chain of moves, each
    reading the row of the node the previous move reached, so one excursion is a chain of
    dependent cache misses. But the generator is counter-based, so which steps restart is
    known before any row is read, and excursions can run side by side: up to ``lanes``
    excursions advance one move per round; as soon as a move's node is read, the column of the
    excursion's next move is drawn and its entry prefetched, to be read one round later. Step
    results go to ``moves`` (node reached, or -1 for a restart) and are committed in step
    order, inserting nodes exactly as the sequential walk does, until B distinct ids or
    ``max_steps`` steps. Excursions are only
    started within ``ahead`` steps of the first uncommitted one, which bounds the moves
    computed past the end of the walk. Every active excursion advances once per round and the
    first one holds the commit point, so no computed step is ``ahead`` or more steps past the
    commit point: ``moves`` is a ring of that many slots.

    Args:
        neighbors, start, restart_threshold, max_steps, key, out, table, shift: as
            :func:`walk_into`.
        moves: int64 scratch ring, length a power of two >= ``ahead``.
        lanes: excursions advanced together (>= 1).
        ahead: how far ahead of the commit point excursions may start (>= 1).

    Returns:
        (number of filled ids, number of steps taken), as :func:`walk_into`.

    Complexity: the steps of :func:`walk_into` plus at most about ``ahead + lanes * (mean
    excursion length)`` speculative moves; O(B + lanes + ahead) memory.
    """
    n = neighbors.shape[0]
    k = neighbors.shape[1]
    batch_size = out.shape[0]
    ring = moves.shape[0] - 1
    table[:] = _EMPTY
    _set_insert(table, shift, start)
    out[0] = start
    count = 1
    steps = 0
    cur = np.empty(lanes, np.int64)
    pos = np.empty(lanes, np.int64)
    end = np.empty(lanes, np.int64)
    col = np.empty(lanes, np.int64)
    active = 0
    scanned = 1  # next step not yet assigned to an excursion or marked as a restart
    commit = 1  # next step to commit
    done = batch_size <= 1 or max_steps <= 0
    while not done:
        # Start excursions (in step order) while lanes are free.
        while active < lanes and scanned <= max_steps and scanned - commit < ahead:
            if (_step_bits(key, scanned) >> _S32) < restart_threshold:
                moves[scanned & ring] = -1
                scanned += 1
                continue
            stop = scanned + 1
            while stop <= max_steps and (_step_bits(key, stop) >> _S32) >= restart_threshold:
                stop += 1
            c = _below(_step_bits(key, scanned) & _MASK32, k)
            _prefetch(neighbors, start, c)
            cur[active] = start
            col[active] = c
            pos[active] = scanned
            end[active] = stop
            active += 1
            scanned = stop
        # One move of every active excursion. Each entry read was prefetched when its column
        # became known, one round earlier, so the misses of all excursions overlap.
        kept = 0
        for i in range(active):
            nxt = np.int64(neighbors[cur[i], col[i]])
            step = pos[i]
            moves[step & ring] = nxt
            if step + 1 < end[i]:  # compact in place, keeping the excursions in step order
                c = _below(_step_bits(key, step + 1) & _MASK32, k)
                _prefetch(neighbors, nxt, c)
                cur[kept] = nxt
                col[kept] = c
                pos[kept] = step + 1
                end[kept] = end[i]
                kept += 1
        active = kept
        # Commit every step before the first unfinished one.
        frontier = pos[0] if active > 0 else scanned
        while commit < frontier:
            node = moves[commit & ring]
            if node >= 0 and _set_insert(table, shift, node):
                out[count] = node
                count += 1
            if count >= batch_size or commit >= max_steps:
                steps = commit
                done = True
                break
            commit += 1
    state = key + np.uint64(steps) * _GAMMA
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
    """Allocate and run one walk (:func:`walk_into_overlapped`, which gives exactly the result
    of :func:`walk_into`); returns (ids, n_filled, steps)."""
    size = 16
    while size < 2 * batch_size:
        size *= 2
    shift = np.uint64(64 - int(np.log2(size)))
    table = np.empty(size, np.int64)
    out = np.empty(batch_size, np.int64)
    ring = 1
    while ring < _EXCURSION_AHEAD:
        ring *= 2
    moves = np.empty(ring, np.int64)
    filled, steps = walk_into_overlapped(
        neighbors, start, restart_threshold, max_steps, key, out, table, shift, moves,
        _EXCURSION_LANES, _EXCURSION_AHEAD,
    )
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
    while cut > 0 and above + hist[cut] < k:  # cut > 0 only guards against NaN scores
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


# --------------------------------------------------------------------------------------------
# Candidate-pool build: per-node sequential sampling over a score band (see topk_pool_block).
# --------------------------------------------------------------------------------------------

_F32_NEG_INF = np.float32(-np.inf)
_F32_POS_INF = np.float32(np.inf)
_CROWD_MAX = 32  # a bucket fuller than this (ties, zero rows) sorts the row with np.sort


@intrinsic
def _compress_ge16(typingctx, row, start, tau, out, count):
    """Append to ``out[count:]`` the positions t in [start, start + 16) with row[t] >= tau.

    One 16-lane compare and one masked compress-store (``vpcompressd`` with AVX-512; LLVM
    lowers it to scalar code elsewhere). Returns the new count. ``out`` must have 16 slots to
    spare after ``count``.
    """
    sig = types.intp(row, types.intp, types.float32, out, types.intp)

    def codegen(context, builder, signature, args):
        row_type, _, _, out_type, _ = signature.args
        row_value, start_value, tau_value, out_value, count_value = args
        f32, i32 = ir.FloatType(), ir.IntType(32)
        lanes = 16
        vf, vi = ir.VectorType(f32, lanes), ir.VectorType(i32, lanes)
        zeros = ir.Constant(vi, [0] * lanes)
        row_view = context.make_array(row_type)(context, builder, row_value)
        out_view = context.make_array(out_type)(context, builder, out_value)
        src = cgutils.get_item_pointer(context, builder, row_type, row_view, [start_value])
        dst = cgutils.get_item_pointer(context, builder, out_type, out_view, [count_value])
        values = builder.load(builder.bitcast(src, vf.as_pointer()), align=4)
        tau_splat = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vf, ir.Undefined), tau_value, i32(0)),
            ir.Constant(vf, ir.Undefined),
            zeros,
        )
        mask = builder.fcmp_ordered(">=", values, tau_splat)
        base = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vi, ir.Undefined), builder.trunc(start_value, i32), i32(0)),
            ir.Constant(vi, ir.Undefined),
            zeros,
        )
        positions = builder.add(base, ir.Constant(vi, list(range(lanes))))
        compress = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [vi, i32.as_pointer(), ir.VectorType(ir.IntType(1), lanes)]),
            "llvm.masked.compressstore.v16i32",
        )
        builder.call(compress, [positions, dst, mask])
        i16 = ir.IntType(16)
        popcount = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
        hits = builder.call(popcount, [builder.bitcast(mask, i16)])
        return builder.add(count_value, builder.zext(hits, count_value.type))

    return sig, codegen


def _host_has_avx512() -> bool:
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except Exception:  # pragma: no cover - feature query unavailable: use the portable loop
        return False


_USE_COMPRESS = _host_has_avx512()  # compile-time constant of the kernels below


@nb.njit(inline="always")
def _compact_ge(row, tau, idx, simd):
    """idx[:c] = positions t (increasing) with row[t] >= tau; returns c. ``idx`` needs p + 16
    slots. ``simd`` selects the 16-lane compress-store path (any machine; fast with AVX-512)."""
    p = row.shape[0]
    c = 0
    t = 0
    if simd:
        while t + 16 <= p:
            c = _compress_ge16(row, t, tau, idx, c)
            t += 16
    while t < p:
        idx[c] = t
        c += row[t] >= tau
        t += 1
    return c


@nb.njit(inline="always")
def _compact_between(row, lo, hi, idx):
    """idx[:c] = positions t (increasing) with lo <= row[t] < hi; returns c."""
    c = 0
    for t in range(row.shape[0]):
        value = row[t]
        idx[c] = t
        c += (value >= lo) & (value < hi)
    return c


@nb.njit(fastmath=True, nogil=True, cache=True)
def _count_ge(row, tau):
    """Number of entries >= tau. Summed in float32 (exact below 2**24 entries), which
    vectorises better than an integer sum."""
    c = np.float32(0.0)
    for t in range(row.shape[0]):
        c += np.float32(row[t] >= tau)
    return np.int64(c)


@nb.njit(fastmath=True, nogil=True, cache=True)
def _row_moments(row):
    """(sum, sum of squares) of a float32 row (vectorised; only steers the threshold search)."""
    s = np.float32(0.0)
    s2 = np.float32(0.0)
    for t in range(row.shape[0]):
        value = row[t]
        s += value
        s2 += value * value
    return s, s2


@nb.njit(inline="always")
def _upper_z(q):
    """z with P(Z > z) ~= q for a standard normal (Abramowitz-Stegun 26.2.23, error < 5e-4)."""
    flip = q > 0.5
    if flip:
        q = 1.0 - q
    q = max(q, 1e-12)
    t = np.sqrt(-2.0 * np.log(q))
    numerator = 2.515517 + 0.802853 * t + 0.010328 * t * t
    denominator = 1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t
    z = t - numerator / denominator
    return -z if flip else z


@nb.njit(inline="always")
def _threshold(row, need, need_hi, mu, sd):
    """A value tau with need <= count(row >= tau), aiming at need_hi or fewer; returns (tau, count).

    The first guess assumes normally distributed scores (mean mu, sd sd); later guesses
    interpolate between a bracket of counts. Only the speed depends on the guesses: the
    returned count is always >= need (tau = -inf, count = p, in the worst case).
    """
    p = row.shape[0]
    if need >= p:
        return _F32_NEG_INF, p
    lo_tau = _F32_NEG_INF
    lo_c = p
    hi_tau = _F32_POS_INF
    hi_c = 0
    target = 0.5 * (need + need_hi)
    tau = np.float32(mu + _upper_z(target / p) * sd)
    for it in range(64):
        c = _count_ge(row, tau)
        if c < need:
            hi_tau = tau
            hi_c = c
        elif c > need_hi:
            lo_tau = tau
            lo_c = c
        else:
            return tau, c
        if lo_tau == _F32_NEG_INF:
            tau = np.float32(hi_tau - sd * 2.0 ** min(it, 60))
        elif hi_tau == _F32_POS_INF:
            tau = np.float32(lo_tau + sd * 2.0 ** min(it, 60))
        else:
            frac = (lo_c - target) / max(lo_c - hi_c, 1)
            tau = np.float32(lo_tau + frac * (hi_tau - lo_tau))
            if not (lo_tau < tau < hi_tau):
                tau = np.float32(lo_tau + np.float32(0.5) * (hi_tau - lo_tau))
                if not (lo_tau < tau < hi_tau):
                    break
    return lo_tau, lo_c


@nb.njit(inline="always")
def _min_of(vals, n_vals):
    """min(vals[:n_vals]) with four independent running minima."""
    a = vals[0]
    b = a
    c = a
    d = a
    t = 0
    while t + 4 <= n_vals:
        a = min(a, vals[t])
        b = min(b, vals[t + 1])
        c = min(c, vals[t + 2])
        d = min(d, vals[t + 3])
        t += 4
    while t < n_vals:
        a = min(a, vals[t])
        t += 1
    return min(min(a, b), min(c, d))


@nb.njit(inline="always")
def _sort_desc(row, chosen, vals, h, floor, buckets, keys, hist):
    """keys[:h] = sort keys (value, position) of the positions chosen[:h] (values vals[:h],
    all >= ``floor``; -inf when unknown), in decreasing order.

    Bucket sort: the position s in [0, 1] of a value between the largest and the smallest is
    mapped to bucket s**3 * nb (the values of an upper tail crowd near its lower end, so the
    cube spreads them over the buckets), then an insertion sort fixes the order inside the
    buckets. A bucket holding more than _CROWD_MAX values (ties, zero rows) switches to np.sort.

    Complexity: O(h + nb + inversions), nb ~ h buckets.
    """
    bits = row.view(np.uint32)
    top = _max_of(vals, h)
    span = top - (floor if floor > _F32_NEG_INF else _min_of(vals, h))
    n_buckets = 16
    while n_buckets < h:
        n_buckets *= 2
    inv_span = np.float32(1.0) / span if span > 0 else np.float32(0.0)
    scale = np.float32(n_buckets * 0.999)
    hist[: n_buckets + 1] = 0
    for j in range(h):
        s = (top - vals[j]) * inv_span
        c = np.int32(s * s * s * scale)
        buckets[j] = c
        hist[c + 1] += 1
    crowd = 0
    total = 0
    for j in range(1, n_buckets + 1):
        count = hist[j]
        crowd = max(crowd, count)
        total += count  # running sum in a register, not through memory
        hist[j] = total
    if crowd > _CROWD_MAX:
        for j in range(h):
            t = chosen[j]
            keys[j] = ~_sort_key(bits[t], t)
        keys[:h] = ~np.sort(keys[:h])
        return
    for j in range(h):
        t = chosen[j]
        c = buckets[j]
        keys[hist[c]] = _sort_key(bits[t], t)
        hist[c] += 1
    for j in range(1, h):
        key = keys[j]
        i = j - 1
        while i >= 0 and keys[i] < key:
            keys[i + 1] = keys[i]
            i -= 1
        keys[i + 1] = key


@nb.njit(inline="always")
def _drop_position(idx, c, pos):
    """Remove ``pos`` from the increasing positions idx[:c] if present (the last entry takes its
    place); returns the new count. O(log c)."""
    lo = 0
    hi = c
    while lo < hi:
        mid = (lo + hi) // 2
        if idx[mid] < pos:
            lo = mid + 1
        else:
            hi = mid
    if lo < c and idx[lo] == pos:
        idx[lo] = idx[c - 1]
        return c - 1
    return c


@nb.njit(fastmath=True, nogil=True, cache=True)
def _selection_draws(state, drawn, count, to_visit, out):
    """Draws of visits drawn .. drawn + count - 1 of a node's sequential sampling.

    Visit v uses the low (v even) or high (v odd) 32 bits of draw v // 2 + 1 of the stream
    ``state`` (SplitMix64 is counter-based, so the loop has no carried state and vectorises),
    scaled to [0, to_visit - (v - drawn)) by multiply-shift as in :func:`_below`. The value of
    visit v lands in ``out[v - drawn + (drawn & 1)]`` (``out`` needs count + 2 slots).
    """
    first = drawn >> 1
    lead = drawn & 1
    for w in range((count + lead + 1) >> 1):
        z = _mix(state + np.uint64(first + w + 1) * _GAMMA)
        j = 2 * w - lead  # visit offset of the low half
        out[2 * w] = np.int64(((z & _MASK32) * np.uint64(to_visit - j)) >> _S32)
        out[2 * w + 1] = np.int64(((z >> _S32) * np.uint64(to_visit - j - 1)) >> _S32)


@nb.njit(nogil=True, cache=True)
def topk_pool_block(scores, row_nodes, pool_start, perm, inv_perm, m, k, key, band_z, out_nb, out_sim):
    """Per-node uniform m-subset of a shared candidate pool, then exact top-k of that subset.

    The pool of this block is the circular window ``perm[pool_start : pool_start + p]`` of a
    uniform random permutation ``perm`` of all N nodes (column j of ``scores`` is node
    ``perm[(pool_start + j) % N]``). Row r (node i) removes itself from the pool if present;
    its candidate set is a uniform m-subset of the ``avail`` remaining positions, drawn by
    sequential (selection) sampling with the generator stream ``(key, i)``: the positions are
    visited in a fixed order and each is kept with probability (still to keep) / (still to
    visit), which gives every m-subset the same probability whatever the visiting order, as
    long as the order does not depend on the draws. The window is a uniform p-subset
    independent of i, so the m-subset is marginally a uniform m-subset of the other N - 1 nodes.

    Only the top of the candidate set matters, so the order is chosen to stop early: first the
    positions of a *score band* (the ``band`` highest scores of the row, found by counting
    passes against a threshold), in position order, then, if fewer than k of them were kept
    (probability < 1%), the next band below, and so on. The kept band positions hold the top
    of the candidate set: every kept position above the band's threshold outranks every
    candidate below it. The band is sized so that the number kept in it, a hypergeometric
    variable, reaches k with ``band_z`` standard deviations to spare: about
    (k + band_z sqrt(k (1 - m / p))) p / m positions. The kept ones (about
    k + band_z sqrt(k (1 - m / p))) are then sorted and the k best written. ``band_z`` only
    trades band size against the chance of a second band; the result does not depend on it.

    With m == k (or a pool of only m + 1 positions) the band is the whole pool, visited in
    position order: the candidate set, hence the neighbour set, does not depend on the scores.
    In general the draws are coupled to the scores through the visiting order, so a different
    bank with the same seed gives different (equally distributed) candidate sets.

    Args:
        scores: float32 [b, p] similarities of the block rows with the pool.
        row_nodes: int64 [b] node id of each row.
        pool_start: start of the window in ``perm``.
        perm, inv_perm: int64 [N] permutation and its inverse.
        m: candidates per node (clipped to the available pool).
        k: neighbours to keep (k <= m).
        key: uint64 stream key of the build.
        band_z: margin of the first band, in standard deviations (2.5 in the build).
        out_nb, out_sim: [N, k] outputs written at rows ``row_nodes``.

    Complexity: per row O(p) vectorised work (moments, about one counting pass, one compress
    pass) plus O(k p / m) draws and an O(k) bucket sort; O(p) scratch. Releases the GIL.
    Scores must be finite.
    """
    n = perm.shape[0]
    b, p = scores.shape
    idx = np.empty(p + 16, np.int32)
    draws = np.empty(p + 2, np.int64)
    chosen = np.empty(p, np.int32)
    vals = np.empty(p, np.float32)
    buckets = np.empty(p, np.int32)
    keys = np.empty(p, np.uint64)
    hist = np.empty(2 * p + 17, np.int32)
    for r in range(b):
        if r + 1 < b:
            # The next node's output rows and inverse-permutation entry are random memory;
            # fetch them while this row is processed.
            upcoming = row_nodes[r + 1]
            _prefetch_1d(inv_perm, upcoming)
            for col in range(0, k, 16):
                _prefetch(out_nb, upcoming, col)
                _prefetch(out_sim, upcoming, col)
            _prefetch(out_nb, upcoming, k - 1)
            _prefetch(out_sim, upcoming, k - 1)
        node = row_nodes[r]
        row = scores[r]
        self_pos = (inv_perm[node] - pool_start) % n
        avail = p - 1 if self_pos < p else p
        take = min(m, avail)
        keep_rate = take / avail
        band = int(np.ceil((k + band_z * np.sqrt(k * (1.0 - keep_rate)) + 2.0) / keep_rate))
        need = min(p, max(band, 1) + 1)  # + 1: the node itself may sit in the band
        s, s2 = _row_moments(row)
        mu = s / p
        sd = np.sqrt(max(s2 / p - mu * mu, 1e-12))
        tau, covered = _threshold(row, need, need + need // 8 + 8, mu, sd)
        c = _drop_position(idx, _compact_ge(row, tau, idx, _USE_COMPRESS), self_pos)
        state = _stream(key, node)
        to_keep = take
        to_visit = avail
        h = 0
        while True:
            # Sequential sampling over the band: visit j is kept when its draw, uniform in
            # [0, to_visit), falls below the number still to keep.
            visited = avail - to_visit
            _selection_draws(state, visited, c, to_visit, draws)
            lead = visited & 1
            for j in range(c):
                t = idx[j]
                kept = draws[j + lead] < to_keep
                chosen[h] = t
                vals[h] = row[t]
                h += kept
                to_keep -= kept
            to_visit -= c
            if h >= k or to_visit == 0:
                break
            # Rare: fewer than k kept in the band; visit the next band below it.
            rate = to_keep / to_visit
            more = int(np.ceil((k - h + band_z * np.sqrt((k - h) * (1.0 - rate)) + 8.0) / rate))
            need = min(p, covered + max(more, 1))
            upper = tau
            tau, covered = _threshold(row, need, need + need // 8 + 8, mu, sd)
            c = _drop_position(idx, _compact_between(row, tau, upper, idx), self_pos)
        _sort_desc(row, chosen, vals, h, tau, buckets, keys, hist)
        for j in range(k):
            t = np.int64(keys[j] & _MASK32)
            q = pool_start + t
            if q >= n:
                q -= n
            out_sim[node, j] = row[t]
            out_nb[node, j] = perm[q]


_GATHER_AHEAD = 8  # rows prefetched ahead by gather_unit_rows


@nb.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def _squared_norm(x, i):
    """(sum_t x[i, t]**2 in float64, a value that is NaN iff row i holds a NaN or an inf).

    Reassociation (no other fast-math flag) lets the loop vectorise; v * 0 is 0 for finite v
    and NaN for NaN or +-inf, so the second sum checks finiteness in the same pass.
    """
    total = 0.0
    check = 0.0
    for t in range(x.shape[1]):
        value = np.float64(x[i, t])
        total += value * value
        check += value * 0.0
    return total, check


@nb.njit(inline="always")
def _unit_row_scaled(x, i, out_row):
    """out_row = x[i] / ||x[i]|| for a finite row of extreme scale (zeros for a zero row)."""
    peak = 0.0
    for t in range(x.shape[1]):
        peak = max(peak, abs(np.float64(x[i, t])))
    if peak == 0.0:
        out_row[:] = 0.0
        return
    total = 0.0
    for t in range(x.shape[1]):
        value = np.float64(x[i, t]) / peak
        total += value * value
    scale = 1.0 / np.sqrt(total)
    for t in range(x.shape[1]):
        out_row[t] = np.float32(np.float64(x[i, t]) / peak * scale)


@nb.njit(nogil=True, cache=True)
def gather_unit_rows(x, order, start, count, out):
    """out[q] = x[order[(start + q) % N]] / its norm, as float32 (zero rows stay zero).

    Rows are read in random order, so the rows ``_GATHER_AHEAD`` ahead are prefetched. A row
    holding a NaN or an inf is written as zeros and counted (the caller raises). A finite row
    whose float64 sum of squares overflows or loses precision to underflow (entries beyond
    about 1e145 or below about 1e-145) is redone after division by its largest absolute value.

    Returns:
        The number of non-finite rows met.

    Complexity: O(count * d) time, memory-bound. Releases the GIL.
    """
    n = order.shape[0]
    d = x.shape[1]
    bad = 0
    for q in range(count):
        if q + _GATHER_AHEAD < count:
            ahead = start + q + _GATHER_AHEAD
            if ahead >= n:
                ahead -= n
            nxt = order[ahead]
            for col in range(0, d, 16):
                _prefetch(x, nxt, col)
        pos = start + q
        if pos >= n:
            pos -= n
        i = order[pos]
        total, check = _squared_norm(x, i)
        if check != 0.0:
            bad += 1
            out[q, :] = 0.0
            continue
        if 1e-290 < total < 1e290:
            scale = 1.0 / np.sqrt(total)
            for t in range(d):
                out[q, t] = np.float32(x[i, t] * scale)
        else:
            _unit_row_scaled(x, i, out[q])
    return bad



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
