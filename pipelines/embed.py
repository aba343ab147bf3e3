"""Re-embed the whole training split with a checkpoint's weights, on a Ray Data actor pool.

Each pool actor loads the weights once from a checkpoint *path* (never an ObjectRef: a restarted
actor must be able to rebuild itself, see RAY_NOTES 2.1) and maps batches of ``{id, x}`` to
``{id, embedding}``. The result is assembled by the explicit ``id`` column, not by execution order.

Cost: one forward pass over N samples, O(N) memory for the ``[N, proj_dim]`` result, plus the pool's
start-up (a few seconds per pass on CPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import torch
import torch.nn.functional as F

from pipelines.datasets import ID, collect_by_id, to_dataset
from trainers.models import build_network, load_weights, network_spec

WEIGHTS_FILE = "model.pt"


def as_network_spec(network: dict[str, Any], x_shape: tuple[int, ...]) -> dict[str, Any]:
    """A network spec as is, or a bare ``model:`` section read as a Siamese network on ``x_shape``."""
    return network if "kind" in network else network_spec("siamese", network, x_shape)


class Embedder:
    """Callable class for ``map_batches``: L2-normalised graph embeddings of a batch.

    What is embedded is the network's ``graph_embedding`` (:mod:`trainers.models`): for a Siamese
    network the projector output, the space the loss compares samples in, so the proximity graph
    measures hardness where the loss feels it.
    """

    def __init__(self, checkpoint_dir: str, network: dict[str, Any], device: str = "auto",
                 crash_once_marker: Optional[str] = None):
        self.crash_once_marker = crash_once_marker  # fault injection for tests: see __call__
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = build_network(network)
        load_weights(self.model, Path(checkpoint_dir, WEIGHTS_FILE))
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.crash_once_marker and not os.path.exists(self.crash_once_marker):
            Path(self.crash_once_marker).touch()
            os._exit(1)  # this actor process dies mid-pass, once per marker file
        x = torch.tensor(batch["x"], device=self.device)  # a copy: Ray Data batches are read-only
        z = self.model.graph_embedding(x)
        return {ID: batch[ID], "embedding": F.normalize(z, dim=1).float().cpu().numpy()}


def embed_store_x(x: np.ndarray, checkpoint_dir: str, network: dict[str, Any], *, pool_size: int = 1,
                  num_cpus: float = 0.25, num_gpus: float = 0.0, batch_size: int = 512,
                  output_dir: Optional[str] = None, crash_once_marker: Optional[str] = None) -> np.ndarray:
    """Graph embeddings ``[N, D]`` (float32, unit rows, row i = id i) of the samples ``x``.

    Args:
        x: samples ``[N, *shape]``, id = row index.
        checkpoint_dir: a directory holding ``model.pt`` (the network's weights).
        network: a :func:`trainers.models.network_spec` dict, or a bare ``model:`` section (a
            Siamese network on ``x``).
        pool_size, num_cpus, num_gpus: the actor pool and each actor's resources.
        batch_size: rows per ``map_batches`` call.
        output_dir: if given, the embeddings are also written there as parquet.
        crash_once_marker: fault injection for tests: the first actor to see a batch while this file
            does not exist creates it and kills its own process.
    """
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = to_dataset(x, None, num_blocks=max(pool_size * 2, 2))
    out = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint_dir": str(checkpoint_dir),
                               "network": as_network_spec(network, tuple(x.shape[1:])),
                               "crash_once_marker": crash_once_marker},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool_size),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    ).materialize()
    if output_dir:
        out.write_parquet(output_dir)
    emb = collect_by_id(out, ["embedding"])["embedding"]
    if len(emb) != len(x):
        raise RuntimeError(f"embedding pass returned {len(emb)} rows for {len(x)} samples")
    return np.ascontiguousarray(emb, dtype=np.float32)
