"""Ray Data embedding throughput against a bare torch inference loop, measured in the same run.

    python bench/embed.py [--quick] [--rows N]

Prints rows/s of (a) a plain ``torch.no_grad`` loop over the same array and model, single process,
all cores; (b) ``pipelines.embed.embed_store_x`` on a Ray Data actor pool of 1 and of 2 actors, pool
start-up included (what a refresh pays). Ratios are against (a); the target is >= 0.8x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import ray
import torch
import torch.nn.functional as F

from pipelines.embed import embed_store_x
from trainers.models import build_model, save_weights

MODEL_CFG = {"width": 32, "embed_dim": 128, "proj_hidden": 256, "proj_dim": 64}


def bare_loop(model, x: np.ndarray, batch: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(F.normalize(model(torch.from_numpy(x[i:i + batch]))[1], dim=1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = 10_000 if args.quick else args.rows
    cpus = os.cpu_count() or 1
    x = np.random.default_rng(0).random((rows, 1, 8, 8), dtype=np.float32)
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, in_channels=1).eval()
    with tempfile.TemporaryDirectory() as ckpt:
        save_weights(model, os.path.join(ckpt, "model.pt"))
        t0 = time.perf_counter()
        ref = bare_loop(model, x, 1024)
        bare = rows / (time.perf_counter() - t0)
        ray.init(address="local", num_cpus=cpus, object_store_memory=1 << 30, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        results = {}
        for pool in (1, 2):
            per_actor = cpus / pool
            t0 = time.perf_counter()
            emb = embed_store_x(x, ckpt, MODEL_CFG, pool_size=pool, num_cpus=per_actor, batch_size=1024)
            results[pool] = rows / (time.perf_counter() - t0)
            assert np.allclose(emb, ref, atol=1e-4)
        ray.shutdown()
    print(f"rows={rows} cores={cpus}")
    print(f"{'path':34s} {'rows/s':>10s} {'vs bare':>8s}")
    print(f"{'bare torch loop (1 process)':34s} {bare:10.0f} {1.0:8.2f}")
    for pool, rate in results.items():
        print(f"{f'Ray Data actor pool, {pool} actor(s)':34s} {rate:10.0f} {rate / bare:8.2f}")
    print(f"scaling 1 -> 2 actors: {results[2] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
