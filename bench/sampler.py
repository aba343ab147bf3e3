"""Benchmarks of the sampler core: graph build, random walks, memory.

Every figure is printed next to a baseline measured in the same run:

* graph build (per-node candidate sets, d = 128, k = 100, m = 1000) vs a plain float32 matrix
  product [N, d] x [d, m], vs the per-node gather reference build, and vs exact kNN with faiss
  IndexFlatIP;
* random walk with restart on N = 10^6, k = 100: steps per second per core of one walk, of many
  walks together, and the speed-up of one walk over a plain Python loop;
* memory: bytes per node of the graph and the peak resident memory of the largest build (run in
  a subprocess so that its peak is its own).

Usage::

    .venv/bin/python bench/sampler.py            # full run (N up to 10^6, several minutes)
    .venv/bin/python bench/sampler.py --quick    # smoke run, under a minute
    .venv/bin/python bench/sampler.py --write    # also write bench/results_sampler.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samplers import _kernels  # noqa: E402
from samplers.graph import build_proximity_graph  # noqa: E402
from samplers.rwr import WALK_GROUP, rwr_batch, walk_key  # noqa: E402

D, K, M = 128, 100, 1000


def best_of(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (the box is shared: the minimum is the signal)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bank(n: int, seed: int = 0) -> np.ndarray:
    """Clustered unit embeddings [n, D] (1000 Gaussian clusters), float32, built in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, D)).astype(np.float32)
    x = np.empty((n, D), np.float32)
    for lo in range(0, n, 1 << 16):
        hi = min(lo + (1 << 16), n)
        x[lo:hi] = centres[rng.integers(0, 1000, hi - lo)] + rng.standard_normal((hi - lo, D), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def numpy_gather_build(x: np.ndarray, k: int, m: int, seed: int) -> None:
    """The naive per-node build: fancy-index gather of each node's candidates + einsum.

    (Candidates are drawn with replacement here: only the gather's cost is measured.)
    """
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 64):
        rows = np.arange(lo, min(lo + 64, n))
        cand = rng.integers(0, n - 1, (rows.size, m))
        cand += cand >= rows[:, None]
        scores = np.einsum("bd,bmd->bm", x[rows], x[cand])
        np.argpartition(-scores, k, axis=1)[:, :k]


def bench_build(sizes: list[int], repeats: int, with_reference: bool) -> list[dict]:
    import faiss

    build_proximity_graph(bank(4000), K, M, seed=0)  # load the compiled kernels before timing
    build_proximity_graph(bank(4000), K, M, seed=0, backend="pernode")
    rows = []
    for n in sizes:
        x = bank(n)
        cand_t = np.ascontiguousarray(x[np.random.default_rng(1).choice(n, M, replace=False)].T)
        product = np.empty((n, M), np.float32)  # preallocated: time the product, not page faults
        t_mm = best_of(lambda: np.matmul(x, cand_t, out=product), repeats)
        product = None  # free the N x m output before the builds
        last = {}
        t_pool = best_of(lambda: last.update(graph=build_proximity_graph(x, K, M, seed=0)), 3 if n < 1_000_000 else 2)
        row = {
            "N": n,
            "matmul_s": t_mm,
            "pool_build_s": t_pool,
            "pool_over_matmul": t_pool / t_mm,
            "pool_size": last.pop("graph").pool_size,
        }
        if with_reference and n <= 100_000:
            t_ref = best_of(lambda: build_proximity_graph(x, K, M, seed=0, backend="pernode"), 1)
            row.update(pernode_build_s=t_ref, pernode_over_matmul=t_ref / t_mm, pool_speedup_vs_pernode=t_ref / t_pool)
        if with_reference and n <= 10_000:
            t_np = best_of(lambda: numpy_gather_build(x, K, M, 0), 1)
            row.update(numpy_gather_s=t_np, numpy_gather_over_matmul=t_np / t_mm)
        if n <= 100_000:

            def flat_knn() -> None:
                index = faiss.IndexFlatIP(D)
                index.add(x)
                index.search(x, K + 1)

            t_flat = best_of(flat_knn, 1)
            row.update(faiss_flat_knn_s=t_flat, pool_over_faiss_flat=t_pool / t_flat)
            if n <= 10_000:
                t_exact = best_of(lambda: build_proximity_graph(x, K, n, backend="exact"), 1)
                row.update(exact_knn_s=t_exact, exact_over_faiss_flat=t_exact / t_flat)
        print(json.dumps({"build": row}), flush=True)
        rows.append(row)
    return rows


def python_walk(neighbors: np.ndarray, start: int, batch_size: int, alpha: float, seed: int) -> int:
    """Plain Python loop in the style of the reference code (random.random / random.choice over
    the numpy row); returns the steps taken."""
    rnd = random.Random(seed)
    batch, seen, cur, steps = [start], {start}, start, 0
    while len(batch) < batch_size:
        steps += 1
        if rnd.random() < alpha:
            cur = start
            continue
        cur = rnd.choice(neighbors[cur])
        if cur not in seen:
            seen.add(cur)
            batch.append(cur)
    return steps


def python_walk_tight(neighbors: np.ndarray, start: int, batch_size: int, alpha: float, seed: int) -> int:
    """A tighter plain Python loop (one random index, int conversion); returns the steps taken."""
    rnd = random.Random(seed)
    k = neighbors.shape[1]
    batch, seen, cur, steps = [start], {start}, start, 0
    while len(batch) < batch_size:
        steps += 1
        if rnd.random() < alpha:
            cur = start
            continue
        cur = int(neighbors[cur, int(rnd.random() * k)])
        if cur not in seen:
            seen.add(cur)
            batch.append(cur)
    return steps


def bench_walks(n: int, batch_sizes: list[int], alpha: float, walks_one: int, steps_many: int) -> list[dict]:
    import numba

    neighbors = np.random.default_rng(0).integers(0, n, size=(n, K), dtype=np.int32)
    threshold = np.uint64(int(alpha * 2**32))
    threads = numba.get_num_threads()
    rows = []
    for size in batch_sizes:
        _kernels.walk_one(neighbors, np.int64(0), size, threshold, 100 * size, np.uint64(0))
        walks_many = max(64, steps_many // size)
        starts = np.random.default_rng(size).integers(0, n, max(walks_one, walks_many))

        def one_walks() -> int:
            steps = 0
            for i in range(walks_one):
                steps += _kernels.walk_one(neighbors, np.int64(starts[i]), size, threshold, 100 * size, walk_key(i))[2]
            return steps

        steps = one_walks()
        t_one = best_of(one_walks, 3)
        t_api = best_of(lambda: [rwr_batch(neighbors, int(starts[i]), size, alpha, i) for i in range(walks_one)], 3)
        n_py = max(2, walks_one // 20)
        t0 = time.perf_counter()
        py_steps = sum(python_walk(neighbors, int(starts[i]), size, alpha, i) for i in range(n_py))
        t_py = time.perf_counter() - t0
        t0 = time.perf_counter()
        tight_steps = sum(python_walk_tight(neighbors, int(starts[i]), size, alpha, i) for i in range(n_py))
        t_tight = time.perf_counter() - t0
        keys = np.array([walk_key(i) for i in range(walks_many)], np.uint64)
        many_starts = starts[:walks_many].astype(np.int64)
        per_core = {}
        for t in sorted({1, threads}):
            numba.set_num_threads(t)
            _kernels.walk_many(neighbors, many_starts[:64], size, threshold, 100 * size, keys[:64], WALK_GROUP)
            many_steps = []
            t_many = best_of(
                lambda: many_steps.append(
                    _kernels.walk_many(neighbors, many_starts, size, threshold, 100 * size, keys, WALK_GROUP)[2].sum()
                ),
                3,
            )
            per_core[t] = (many_steps[-1] / t_many / t, t_many)
        numba.set_num_threads(threads)
        one_rate, py_rate = steps / t_one, py_steps / t_py
        row = {
            "N": n,
            "B": size,
            "one_walk_steps_per_s": one_rate,
            "one_walk_api_steps_per_s": steps / t_api,
            "python_steps_per_s": py_rate,
            "speedup_vs_python": one_rate / py_rate,
            "python_tight_steps_per_s": tight_steps / t_tight,
            "speedup_vs_python_tight": one_rate * t_tight / tight_steps,
            "many_walks": walks_many,
            "many_steps_per_s_per_core_1_thread": per_core[1][0],
            f"many_steps_per_s_per_core_{threads}_threads": per_core[threads][0],
            "many_total_steps_per_s": per_core[threads][0] * threads,
        }
        print(json.dumps({"walk": row}), flush=True)
        rows.append(row)
    return rows


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (VmHWM; unlike ru_maxrss it is not
    inherited from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_peak(n: int) -> dict:
    """Child process: peak memory of one build (numpy allocations traced, and process RSS)."""
    x = bank(n)
    build_proximity_graph(bank(4000), K, M, seed=0)  # load the compiled kernels first
    rss_before = peak_rss_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    graph = build_proximity_graph(x, K, M, seed=0)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = peak_rss_bytes()
    return {
        "N": n,
        "build_s": seconds,
        "embeddings_bytes": x.nbytes,
        "rss_before_build_bytes": rss_before,
        "peak_rss_bytes": rss_peak,
        "build_traced_peak_bytes": traced_peak,
        "graph_bytes_per_node": (graph.neighbors.nbytes + graph.similarities.nbytes) / n,
        "neighbors_bytes_per_node": graph.neighbors.nbytes / n,
    }


def run_child_peak(n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-child", str(n)], check=True, capture_output=True, text=True
    ).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"memory": row}), flush=True)
    return row


def markdown(builds: list[dict], walks: list[dict], memory: dict | None, quick: bool, seconds: float) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## Sampler core ({time.strftime('%Y-%m-%d')}, {'--quick' if quick else 'full run'})",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), numpy {np.__version__}, Python {platform.python_version()}; "
        f"the box was shared with other jobs, so every time is the best of a few repeats. Run time {seconds:.0f} s.",
        "",
        f"### Graph build (d = {D}, k = {K}, m = {M}, per-node candidate sets, default pool build)",
        "",
        "| N | matmul [N,d]x[d,m] s | pool build s (pool size) | / matmul | per-node gather s | / matmul | numpy gather / matmul | faiss FlatIP kNN s | pool / faiss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in builds:
        lines.append(
            f"| {r['N']:.0e} | {r['matmul_s']:.3f} | {r['pool_build_s']:.3f} ({r['pool_size']}) | {r['pool_over_matmul']:.2f}x | "
            f"{r.get('pernode_build_s', float('nan')):.2f} | {r.get('pernode_over_matmul', float('nan')):.1f}x | "
            f"{r.get('numpy_gather_over_matmul', float('nan')):.1f}x | {r.get('faiss_flat_knn_s', float('nan')):.2f} | "
            f"{r.get('pool_over_faiss_flat', float('nan')):.3f} |"
        )
    exact = [r for r in builds if "exact_knn_s" in r]
    if exact:
        r = exact[0]
        lines += ["", f"Exact kNN backend (m = N - 1) at N = {r['N']:.0e}: {r['exact_knn_s']:.2f} s, "
                  f"{r['exact_over_faiss_flat']:.2f}x faiss IndexFlatIP."]
    lines += [
        "",
        f"### Random walk with restart (random graph N = {walks[0]['N']:.0e}, k = {K}, alpha = 0.1)",
        "",
        "| B | one walk steps/s (kernel) | one walk via rwr_batch | Python loop steps/s (reference style / tight) | speed-up (vs reference style / tight) | many walks steps/s/core (1 thread) | many walks steps/s/core (all threads) | many walks total steps/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in walks:
        all_key = next(key for key in r if key.startswith("many_steps_per_s_per_core_") and not key.endswith("_1_thread"))
        lines.append(
            f"| {r['B']} | {r['one_walk_steps_per_s']:.2e} | {r['one_walk_api_steps_per_s']:.2e} | "
            f"{r['python_steps_per_s']:.2e} / {r['python_tight_steps_per_s']:.2e} | "
            f"{r['speedup_vs_python']:.0f}x / {r['speedup_vs_python_tight']:.1f}x | "
            f"{r['many_steps_per_s_per_core_1_thread']:.2e} | {r[all_key]:.2e} | {r['many_total_steps_per_s']:.2e} |"
        )
    if memory:
        lines += [
            "",
            f"### Memory (N = {memory['N']:.0e}, build in a child process)",
            "",
            f"* graph: {memory['graph_bytes_per_node']:.0f} bytes per node (neighbours "
            f"{memory['neighbors_bytes_per_node']:.0f} + similarities); the planner keeps only the neighbours.",
            f"* embeddings: {memory['embeddings_bytes'] / 2**20:.0f} MiB; numpy memory allocated by the build at its "
            f"peak (tracemalloc): {memory['build_traced_peak_bytes'] / 2**20:.0f} MiB (normalised permuted copy of "
            f"the bank + [N, k] outputs + permutations + per-thread score blocks); process peak RSS "
            f"{memory['peak_rss_bytes'] / 2**20:.0f} MiB (before the build: {memory['rss_before_build_bytes'] / 2**20:.0f} MiB). "
            f"Build time in that process: {memory['build_s']:.1f} s.",
        ]
    lines += ["", "### Against the targets", ""]
    for r in builds:
        lines.append(f"* build N = {r['N']:.0e}: {r['pool_over_matmul']:.1f}x the matmul (target <= 3x): "
                     f"{'met' if r['pool_over_matmul'] <= 3 else 'not met'}.")
    for r in walks:
        all_key = next(key for key in r if key.startswith("many_steps_per_s_per_core_") and not key.endswith("_1_thread"))
        best_many = max(r["many_steps_per_s_per_core_1_thread"], r[all_key])
        lines.append(
            f"* walks B = {r['B']}: one walk {r['one_walk_steps_per_s']:.1e} steps/s (target >= 5e6: "
            f"{'met' if r['one_walk_steps_per_s'] >= 5e6 else 'not met'}); many walks {best_many:.1e} steps/s/core "
            f"(target >= 2e7: {'met' if best_many >= 2e7 else 'not met'}); speed-up over the Python loop "
            f"{r['speedup_vs_python']:.0f}x (target >= 10x: {'met' if r['speedup_vs_python'] >= 10 else 'not met'})."
        )
    lines += [
        "",
        "Baselines: *matmul* is one float32 `np.matmul(x, cand.T, out=...)` into a preallocated output",
        "(multi-threaded BLAS); *per-node gather* is the",
        "`backend=\"pernode\"` reference (compiled, independent candidate sets, row-by-row dot products);",
        "*numpy gather* is fancy-index gathering of [64, m, d] candidate blocks + einsum; *faiss FlatIP kNN* is",
        "`IndexFlatIP.search(x, k + 1)` over all points (the exact kNN graph, m = N - 1). The walk graph is a",
        "uniformly random [N, k] int32 table (worst case for caches). Per-core walk rates divide by the numba",
        "threads used; with other jobs on the box, the 1-thread figure is the cleaner one.",
        "",
        "Reading: the pool build's matrix product is 1.5x the baseline's flops; the rest is the per-node",
        "work (draw the node's own m-subset of its pool, top-k of m = 1000 with k = 100, sorted), about",
        "5 us of CPU per node against about 1 us per node for the whole baseline product, which is why the",
        "build stays above 3x a compute-bound matmul. One walk at N = 10^6 is a chain of dependent DRAM",
        "misses (a random row of a 400 MB table per move, ~130 ns); a Python loop pays the same misses plus",
        "the interpreter, so the one-walk speed-up is ~4-5x here (it is >= 10x when the table is cache",
        "resident, e.g. N = 10^5 in --quick); many walks overlap their misses with software prefetches.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--write", action="store_true", help="write bench/results_sampler.md")
    parser.add_argument("--peak-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child is not None:
        print(json.dumps(build_peak(args.peak_child)))
        return
    t0 = time.perf_counter()
    if args.quick:
        builds = bench_build([10_000], repeats=2, with_reference=True)
        walks = bench_walks(100_000, [256], alpha=0.1, walks_one=200, steps_many=2**20)
        memory = None
    else:
        builds = bench_build([10_000, 100_000, 1_000_000], repeats=3, with_reference=True)
        walks = bench_walks(1_000_000, [256, 4096], alpha=0.1, walks_one=400, steps_many=2**22)
        memory = run_child_peak(1_000_000)
    text = markdown(builds, walks, memory, args.quick, time.perf_counter() - t0)
    print(text)
    if args.write:
        path = Path(__file__).with_name("results_sampler.md")
        path.write_text("# Sampler benchmarks\n\n" + text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
