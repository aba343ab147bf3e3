"""The GraphRefresher actor: checkpoint -> embeddings -> proximity graph -> sampler swap.

A refresh takes the directory of a reported checkpoint, re-embeds the training split on a Ray Data
actor pool that streams the SampleStore in batches with the evaluation-time decode
(:mod:`pipelines.embed`; nothing of the dataset is collected here, only the ``[N, D]`` embeddings the
graph needs), builds a new proximity graph with faiss
(:mod:`samplers.graph`), persists it as a version under the run's storage path, and hands it to the sampler actor with its
activation step, which the caller fixed in advance (:mod:`samplers.protocol`). A version the sampler
refuses (it comes from an attempt of the run older than the current one) is deleted again.

Cost per refresh: one forward pass over N samples plus the graph build, O(N * m * d) for m candidates
per node; persisted bytes per version: N * (4 k + 8 k + 4 d).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
from ray.util.debug import log_once

from pipelines.datasets import SampleStore
from pipelines.embed import embed_store
from samplers.actor import _maybe_crash
from samplers.graph import ProximityGraph, build_proximity_graph
from trainers.progress import quiet_logging


# Fault injection for the end-to-end tests: a marker file path; the refresher's process dies once, after
# embedding and before building the graph, while this file does not exist (it is created just before).
REFRESHER_FAULT_ENV = "HARDBATCH_REFRESHER_FAULT_ONCE"


def graph_path(graph_dir: str | Path, version: int) -> Path:
    return Path(graph_dir, f"v{version:04d}.npz")


def neighbour_overlap(old: np.ndarray, new: np.ndarray) -> float:
    """Mean fraction of each node's neighbours kept between two graphs. O(N k log k)."""
    k = old.shape[1]
    both = np.concatenate([np.sort(old, axis=1), np.sort(new, axis=1)], axis=1)
    both.sort(axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    return float(shared.mean() / k)


class _Refresher:
    """The refresh procedure. The training store comes with every :meth:`refresh` call and the
    sampler actor by name, not as constructor arguments: a restartable actor must not depend on
    constructor arguments held in the object store (a restart after they are freed would fail; Ray
    warns about it)."""

    def __init__(self, network: dict[str, Any], sampler_cfg: dict[str, Any], refresh_cfg: dict[str, Any],
                 graph_dir: str, sampler_name: str, seed: int):
        self.network = network
        self.sampler_cfg = sampler_cfg
        self.refresh_cfg = refresh_cfg
        self.graph_dir = Path(graph_dir)
        self.graph_dir.mkdir(parents=True, exist_ok=True)
        self.sampler = ray.get_actor(sampler_name)
        self.seed = seed
        self._last: Optional[tuple[np.ndarray, np.ndarray]] = None  # embeddings, neighbours
        self._last_version: Optional[int] = None  # the version _last belongs to
        self.load_latest()
        quiet_logging(ray_data=True)  # Ray Data's execution-plan lines, unless --verbose
        # Ray Data warns "no available CPUs ... will hang" (once per process) whenever it starts
        # while every CPU is held, e.g. while the previous pool's actor is still being released.
        # The pool's CPUs are reserved apart from the train workers' (README: Sizing), so the
        # warning is a false alarm here; mark it as already logged.
        log_once("cpu_warning")
        # Progress bars are off on purpose (the run's console reports refreshes); Ray Data warns
        # once per process that they are.
        log_once("ray_data_progress_manager_disabled")

    def refresh(self, store: SampleStore, checkpoint_dir: str, activate_step: int, snapshot_step: Optional[int] = None,
                seen_since: int = 0, attempt: Optional[int] = None) -> dict:
        """Build a new graph version from the weights in ``checkpoint_dir`` and hand it to the sampler.

        Args:
            store: the training split's store (its ids are the graph's nodes).
            checkpoint_dir: directory holding ``model.pt``.
            activate_step: the step the version becomes active at (fixed by the caller's schedule).
            snapshot_step: the step of the weights (default ``activate_step``).
            seen_since: with ``refresh.scope: seen``, only the ids of the plans of steps
                ``seen_since .. snapshot_step - 1`` are re-embedded; the other rows keep their previous
                embedding (BatchSampler's partial update, ALGORITHMS.md 4.2 step 4).
            attempt: the run's attempt that asked (``None``: always accepted, graph version 0).

        Returns:
            What happened: version, activation step, timings, graph statistics, drift and
            neighbour overlap against the previous version, and the path of the version's manifest;
            ``discarded: True`` (and no manifest) when the sampler refused a stale attempt's version.
        """
        t0 = time.perf_counter()
        snapshot_step = activate_step if snapshot_step is None else snapshot_step
        version = ray.get(self.sampler.next_version.remote())
        if version > 0 and self._last_version != version - 1:  # after a rewind: continue from the kept version
            self.load_version(version - 1)
        ids = None
        if self.refresh_cfg.get("scope", "full") == "seen" and self._last is not None and snapshot_step > seen_since:
            plans = ray.get(self.sampler.plans.remote(seen_since, snapshot_step))
            ids = np.unique(plans)
        fresh = embed_store(store, checkpoint_dir, self.network, ids,
                            pool_size=self.refresh_cfg["pool_size"], num_cpus=self.refresh_cfg["num_cpus"],
                            num_gpus=self.refresh_cfg["num_gpus"], batch_size=self.refresh_cfg["batch_size"])
        _maybe_crash(REFRESHER_FAULT_ENV)  # tests: the refresher dies mid-refresh, once
        if ids is None:
            emb = fresh
        else:
            emb = self._last[0].copy()
            emb[ids] = fresh
        t1 = time.perf_counter()
        graph = build_proximity_graph(emb, k=self.sampler_cfg["k"], m=self.sampler_cfg["m"],
                                      seed=self.seed + version)
        t2 = time.perf_counter()
        path = graph_path(self.graph_dir, version)
        emb_file = self.graph_dir / f"v{version:04d}_embeddings.npy"
        graph.save(path)
        np.save(emb_file, emb)
        step = ray.get(self.sampler.swap_graph.remote(str(path), version, activate_step, snapshot_step, attempt))
        info: dict[str, Any] = {
            "version": version, "activate_step": activate_step, "snapshot_step": snapshot_step,
            "checkpoint": str(checkpoint_dir), "embed_seconds": t1 - t0, "graph_seconds": t2 - t1,
            "embedded_rows": int(len(fresh)), "scope": "seen" if ids is not None else "full",
            "stats": {k: float(v) for k, v in graph.stats().items()},
        }
        if step is None:  # a stale attempt's version: nothing will ever use it
            path.unlink(missing_ok=True)
            emb_file.unlink(missing_ok=True)
            return {**info, "discarded": True}
        if self._last is not None:
            old_emb, old_nbrs = self._last
            info["drift"] = float((old_emb * emb).sum(axis=1).mean())
            info["neighbour_overlap"] = neighbour_overlap(old_nbrs, graph.neighbors)
        self._last, self._last_version = (emb, np.asarray(graph.neighbors)), version
        manifest = path.with_suffix(".json")
        manifest.write_text(json.dumps({**info, "graph": str(path), "build": graph.metadata()}, indent=1,
                                       default=str))
        info["manifest"] = str(manifest)
        return info

    def load_version(self, version: int) -> bool:
        """Make ``version``'s persisted embeddings and neighbours the base of the next refresh (drift,
        ``scope: seen``); False when its files are gone (pruned), and the next refresh starts afresh."""
        path = graph_path(self.graph_dir, version)
        emb_file = path.with_name(path.stem + "_embeddings.npy")
        if not (path.exists() and emb_file.exists()):
            self._last, self._last_version = None, None
            return False
        self._last = (np.load(emb_file), np.asarray(ProximityGraph.load(path).neighbors))
        self._last_version = version
        return True

    def load_latest(self) -> Optional[int]:
        """Re-read the newest persisted version (after a restart), so drift and ``scope: seen``
        continue from it; returns its number, or ``None`` when there is none."""
        existing = sorted(self.graph_dir.glob("v*.npz"))
        if not existing:
            return None
        version = int(existing[-1].stem[1:])
        return version if self.load_version(version) else None


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class GraphRefresher(_Refresher):
    """Ray actor around the refresh procedure above (num_cpus=0: its pool actors hold the CPUs).

    A refresher that dies mid-refresh is restarted and the refresh retried from its weight snapshot
    (still on disk: it goes only once the refresh has landed); a retry whose first try had already
    handed its version over is refused by the sampler, and that version stands."""
