"""Embed a SampleStore on a Ray Data actor pool: the training split with a checkpoint's weights (graph
refresh, :func:`embed_store`), or any source with a run's trained encoder (``hardbatch embed``,
:func:`embed_to_parquet`).

The dataset is only the ids to embed, cut into blocks; each pool actor loads the weights once from a
checkpoint *path* (never an ObjectRef: a restarted actor must be able to rebuild itself, see
RAY_NOTES 2.1), and for each batch of ids reads the stored samples from the SampleStore (mapped
shards, O(batch)), decodes them with the evaluation-time transform (decode, resize, no augmentation)
and returns ``{id, embedding}``. Ray Data streams the blocks through the pool with backpressure, so
no process ever holds more than a few batches of decoded samples; the result is assembled by the
explicit ``id`` column, not by execution order.

Cost: one decode and forward pass over N samples; O(N * D) floats for the ``[N, D]`` result (the graph
needs all of it), plus the pool's start-up (a few seconds per pass on CPU).

``embed_to_parquet`` is the same stream with :class:`EncoderEmbedder`: the encoder's representation
``h`` (not the projection, not normalised) plus each sample's location, label and class, written as
parquet by the pool without ever being collected.

torch is imported by the pool actors only: the process that drives the pass (the GraphRefresher
actor) never needs it, and importing it there would cost seconds of CPU and about 600 MB of memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray

from pipelines.datasets import ID, collect_by_id
from pipelines.store import SampleStore

WEIGHTS_FILE = "model.pt"
# CPUs of a task writing parquet files (mostly I/O): with the default of 1, the writes of a pool that
# holds most CPUs wait until the whole pass is done, every result parked in the object store.
WRITE_CPUS = 0.25


def as_network_spec(network: dict[str, Any], x_shape: tuple[int, ...]) -> dict[str, Any]:
    """A network spec as is, or a bare ``model:`` section read as a Siamese network on ``x_shape``."""
    if "kind" in network:
        return network
    from trainers.models import network_spec

    return network_spec("siamese", network, x_shape)


class Embedder:
    """Callable class for ``map_batches``: L2-normalised graph embeddings of a batch of store ids.

    What is embedded is the network's ``graph_embedding`` (:mod:`trainers.models`): for a Siamese
    network the projector output, the space the loss compares samples in, so the proximity graph
    measures hardness where the loss feels it.
    """

    def __init__(self, checkpoint_dir: str, network: dict[str, Any], store: SampleStore, device: str = "auto",
                 crash_once_marker: Optional[str] = None):
        import torch

        from trainers.models import build_network, load_weights

        self._torch = torch  # imported here, in the pool actor, once (see the module docstring)
        self.crash_once_marker = crash_once_marker  # fault injection for tests: see __call__
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.store = store
        self.model = build_network(network)
        load_weights(self.model, Path(checkpoint_dir, WEIGHTS_FILE))
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        if self.crash_once_marker and not os.path.exists(self.crash_once_marker):
            Path(self.crash_once_marker).touch()
            os._exit(1)  # this actor process dies mid-pass, once per marker file
        with torch.no_grad():
            x = torch.from_numpy(self.store.take(batch["store_id"])).to(self.device)
            z = self.model.graph_embedding(x)
            return {ID: batch[ID], "embedding": torch.nn.functional.normalize(z, dim=1).float().cpu().numpy()}


def embed_store(store: SampleStore, checkpoint_dir: str, network: dict[str, Any], ids: Optional[np.ndarray] = None,
                *, pool_size: int = 1, num_cpus: float = 0.25, num_gpus: float = 0.0, batch_size: int = 512,
                output_dir: Optional[str] = None, crash_once_marker: Optional[str] = None) -> np.ndarray:
    """Graph embeddings (float32, unit rows) of the store's samples ``ids`` (default: all), row i = ``ids[i]``.

    Args:
        store: the SampleStore (shipped to the actors as shard handles, never as data).
        checkpoint_dir: a directory holding ``model.pt`` (the network's weights).
        network: a :func:`trainers.models.network_spec` dict, or a bare ``model:`` section (a
            Siamese network on the store's samples).
        ids: store ids to embed, in the order of the result.
        pool_size, num_cpus, num_gpus: the actor pool and each actor's resources.
        batch_size: ids per ``map_batches`` call.
        output_dir: if given, the embeddings are also written there as parquet.
        crash_once_marker: fault injection for tests: the first actor to see a batch while this file
            does not exist creates it and kills its own process.

    Shape:
        returns ``[len(ids), D]``. Cost: O(len(ids)) decodes and forward passes, streamed.
    """
    ray.data.DataContext.get_current().enable_progress_bars = False
    ids = np.arange(store.size, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    per_block = min(4 * batch_size, max(batch_size, -(-len(ids) // max(2 * pool_size, 2))))  # stream in blocks
    blocks = [pa.table({ID: pa.array(np.arange(a, min(a + per_block, len(ids)), dtype=np.int64)),
                        "store_id": pa.array(ids[a:a + per_block])}) for a in range(0, len(ids), per_block)]
    # ``from_blocks`` computes block metadata here; ``from_arrow`` would launch one metadata task per
    # block, each asking for a whole CPU, which deadlocks a refresh while train workers hold the CPUs.
    out = ray.data.from_blocks(blocks).map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint_dir": str(checkpoint_dir),
                               "network": as_network_spec(network, store.sample_shape), "store": store,
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
    if len(emb) != len(ids):
        raise RuntimeError(f"embedding pass returned {len(emb)} rows for {len(ids)} samples")
    return np.ascontiguousarray(emb, dtype=np.float32)


def embed_store_x(x: np.ndarray, checkpoint_dir: str, network: dict[str, Any], **kwargs: Any) -> np.ndarray:
    """:func:`embed_store` of samples given as an array ``[N, *shape]`` (id = row), for tests and tools."""
    return embed_store(SampleStore.in_memory(x), checkpoint_dir, network, **kwargs)


class EncoderEmbedder:
    """Callable class for ``map_batches``: a run's trained encoder applied to a batch of store ids.

    Returns a pyarrow table with ``id``, ``location`` (:meth:`SampleStore.name`), ``label`` and
    ``class`` (labelled stores only), ``embedding`` (``fixed_size_list<float32>[D]``: the
    representation ``h``, as :class:`trainers.models.Encoder` gives it; NaN for a sample that could
    not be decoded: a null there would not survive parquet) and ``error`` (why it could not be
    decoded, else null).

    Args:
        model: the encoder's MLflow model URI (``models:/<id>``), loaded here
            (:func:`pipelines.export.load_encoder`), so a restarted actor rebuilds itself (never
            from an ObjectRef).
        store: the SampleStore (shard handles).
        tracking_uri: the MLflow store of an MLflow ``model``.
        device: ``auto`` (the GPU Ray gave this actor, else the CPU), ``cpu`` or ``cuda``.
        threads: torch threads (CPU actors).
    """

    def __init__(self, model: str, store: SampleStore, tracking_uri: Optional[str] = None, device: str = "auto",
                 threads: Optional[int] = None):
        import torch

        from pipelines.export import load_encoder

        self._torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.store = store
        encoder, _ = load_encoder(model, tracking_uri)
        self.encoder = encoder.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from trainers.feed import decode_batch

        torch = self._torch
        ids = np.asarray(batch[ID], dtype=np.int64)
        x, failures = decode_batch(self.store.raw(ids), self.store.codec)
        with torch.inference_mode():
            x = x.to(self.device)
            x = x if x.dtype.is_floating_point else x.float().div_(255)  # as SampleStore.take decodes
            h = self.encoder(x).float().cpu().numpy()
        errors: list[Optional[str]] = [None] * len(ids)
        for i, reason in failures:  # decode_batch put another sample there: no embedding of its own
            h[i] = np.nan
            errors[i] = reason
        columns = {ID: pa.array(ids), "location": pa.array([self.store.name(int(i)) for i in ids], pa.string())}
        if self.store.labels is not None:
            labels = self.store.labels[ids]
            columns["label"] = pa.array(labels, pa.int64())
            columns["class"] = pa.array(np.asarray(self.store.classes, dtype=object)[labels], pa.string())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), h.shape[1])
        columns["error"] = pa.array(errors, pa.string())
        return pa.table(columns)


def embed_to_parquet(store: SampleStore, model: str, out_dir: str, *, tracking_uri: Optional[str] = None,
                     pool_size: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, threads: Optional[int] = None,
                     device: str = "auto", batch_size: int = 256) -> dict[str, Any]:
    """Every sample of ``store`` through a trained encoder, written to ``out_dir`` as a parquet dataset
    (one row per sample, in no particular order: sort by ``id``); see :class:`EncoderEmbedder`.

    Returns:
        ``{"rows", "undecodable", "columns"}``, read back from the files' metadata.
        Cost: O(N) decodes and forward passes, streamed; nothing is collected in this process.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pds
    from ray.util.debug import log_once

    from trainers.progress import quiet_logging

    quiet_logging(ray_data=True)  # Ray Data's execution-plan lines, unless --verbose
    log_once("ray_data_progress_manager_disabled")  # bars are off on purpose; say so once, not at all
    ray.data.DataContext.get_current().enable_progress_bars = False
    n = store.size
    per_block = min(8 * batch_size, max(batch_size, -(-n // max(4 * pool_size, 4))))
    blocks = [pa.table({ID: pa.array(np.arange(a, min(a + per_block, n), dtype=np.int64))})
              for a in range(0, n, per_block)]
    # from_blocks: see embed_store
    ray.data.from_blocks(blocks).map_batches(
        EncoderEmbedder,
        fn_constructor_kwargs={"model": str(model), "store": store, "tracking_uri": tracking_uri,
                               "device": device, "threads": threads},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool_size), num_cpus=num_cpus, num_gpus=num_gpus,
    ).write_parquet(out_dir, ray_remote_args={"num_cpus": WRITE_CPUS})
    written = pds.dataset(out_dir, format="parquet")
    return {"rows": written.count_rows(), "undecodable": written.count_rows(filter=pc.field("error").is_valid()),
            "columns": written.schema.names}
