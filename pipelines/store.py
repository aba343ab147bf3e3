"""The SampleStore: random access by integer id to one split of a dataset, out of core.

Samples are kept in their *stored* form, never as decoded float32: image files as their encoded
bytes (exactly the bytes of the source file), tensors as uint8 (or float32 when the source holds
floats). They are cut into *shards*, each a contiguous range of ids held as one Arrow table with the
columns ``id``, ``x`` (binary: one stored sample per row), ``name`` (the item's location, for log
lines) and, for paired sources, ``v``. A shard lives in one of three places:

==================  ==============================================================================
``object_store``    a Ray object (built by a Ray Data task, owned by the driver); every process on
                    a node maps the node's one copy zero-copy, and a node fetches a shard only when
                    one of its processes first reads from it
``disk``            an uncompressed Arrow IPC file under the run's storage path, memory-mapped by
                    every reader: memory is the OS page cache (shared, reclaimable), not the heap
``memory``          a table inside the store object itself (tests and small in-process tools)
==================  ==============================================================================

What every process holds besides mapped shards: the shard boundaries (``8 S`` bytes for ``S``
shards) and the labels (``8 N`` bytes). ``raw(ids)`` and ``take(ids)`` cost O(len(ids)) plus, the
first time a process touches a shard, the mapping of that shard (no read of its data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

ID, X, V, NAME, SPLIT = "id", "x", "v", "name", "split"
LOCATIONS = ("object_store", "disk", "memory")


@dataclass
class Shard:
    """One contiguous range of ids ``[start, stop)`` and where its table is.

    Exactly one of ``ref`` (object store), ``path`` (an Arrow IPC file) or ``table`` (in memory) is set.
    """

    start: int
    stop: int
    ref: Any = None
    path: Optional[str] = None
    table: Any = None


def shard_table(ids: np.ndarray, x: Any, names: list[str], v: Optional[np.ndarray] = None,
                split: Optional[int] = None):
    """The Arrow table of one shard.

    Args:
        ids: store ids of the rows (contiguous, increasing).
        x: encoded samples (``list[bytes]``) or a tensor array ``[n, *shape]`` (stored row by row as
            its raw bytes, C order).
        names: the items' locations.
        v: second modality ``[n, d]`` (stored as raw float32 bytes per row).
        split: a split tag column (used while building both splits in one pass).

    Cost: one copy of the stored samples.
    """
    import pyarrow as pa

    def as_binary(rows: Any):
        if isinstance(rows, np.ndarray):
            flat = np.ascontiguousarray(rows).reshape(len(rows), -1).view(np.uint8)
            width = flat.shape[1]
            offsets = np.arange(len(rows) + 1, dtype=np.int64) * width
            return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(rows),
                                                    [None, pa.py_buffer(offsets), pa.py_buffer(flat.reshape(-1))])
        return pa.array(rows, type=pa.large_binary())

    columns = {ID: pa.array(np.asarray(ids, dtype=np.int64)), X: as_binary(x), NAME: pa.array(names, pa.string())}
    if v is not None:
        columns[V] = as_binary(np.asarray(v, dtype=np.float32))
    if split is not None:
        columns[SPLIT] = pa.array(np.full(len(ids), split, np.int8))
    return pa.table(columns)


def write_shard(table, path: str) -> int:
    """Write a shard as an uncompressed Arrow IPC file (memory-mappable); returns its size in bytes."""
    import pyarrow as pa

    tmp = f"{path}.tmp{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    os.replace(tmp, path)  # a shard file is either complete or absent
    return os.path.getsize(path)


class _Column:
    """Zero-copy access to the rows of one binary column of a shard table."""

    def __init__(self, column):
        import pyarrow as pa

        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        self.bounds = np.cumsum([0] + [len(c) for c in chunks])
        self.parts = []
        for chunk in chunks:
            buffers = chunk.buffers()
            wide = pa.types.is_large_binary(chunk.type)
            offsets = np.frombuffer(buffers[1], dtype=np.int64 if wide else np.int32)
            offsets = offsets[chunk.offset:chunk.offset + len(chunk) + 1]
            data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
            self.parts.append((offsets, data))

    def get(self, row: int) -> memoryview:
        part = int(np.searchsorted(self.bounds, row, side="right") - 1) if len(self.parts) > 1 else 0
        offsets, data = self.parts[part]
        i = row - self.bounds[part]
        return memoryview(data[offsets[i]:offsets[i + 1]])


@dataclass
class SampleStore:
    """Random access by id to one split of a dataset; see the module docstring.

    Attributes:
        shards: the shards, in id order, covering ``0..size-1``.
        labels: ``int64 [size]`` class indices, or ``None`` (unlabelled).
        classes: class names (index = label), or ``None``.
        codec: how ``x`` is stored: ``{"kind": "image", "size": S}`` (encoded files, decoded to
            RGB ``S x S``) or ``{"kind": "tensor", "shape": [...], "dtype": "uint8" | "float32"}``.
        v_codec: the codec of ``v`` for a paired source, else ``None``.
        location: ``object_store``, ``disk`` or ``memory``.
        source_ids: row of every store id in the source's listing (the id -> file map).
    """

    shards: list[Shard]
    labels: Optional[np.ndarray]
    classes: Optional[list[str]]
    codec: dict[str, Any]
    v_codec: Optional[dict[str, Any]] = None
    location: str = "memory"
    source_ids: Optional[np.ndarray] = None
    _starts: np.ndarray = field(default=None, repr=False, compare=False)
    _open: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self._starts = np.array([s.start for s in self.shards] + [self.shards[-1].stop if self.shards else 0],
                                dtype=np.int64)
        if self.shards and (self._starts[0] != 0 or np.any(np.diff(self._starts) <= 0) or any(
                a.stop != b.start for a, b in zip(self.shards, self.shards[1:]))):
            raise ValueError("store shards must cover 0..size-1 contiguously, in order")
        if self.labels is not None and len(self.labels) != self.size:
            raise ValueError(f"store has {self.size} samples but {len(self.labels)} labels")

    # -- construction without Ray (tests, tools) --------------------------------------------------

    @classmethod
    def in_memory(cls, x: Optional[np.ndarray] = None, label: Optional[np.ndarray] = None,
                  v: Optional[np.ndarray] = None, *, shard_size: Optional[int] = None,
                  encoded: Optional[list[bytes]] = None, image_size: Optional[int] = None,
                  names: Optional[list[str]] = None, classes: Optional[list[str]] = None) -> "SampleStore":
        """A store over local data, without Ray.

        Args:
            x: tensor samples ``[N, *shape]`` (float kept float32, uint8 kept uint8).
            label: ``[N]`` integer labels.
            v: second modality ``[N, d]``.
            shard_size: samples per shard (default: one shard).
            encoded: encoded image files instead of ``x`` (then ``image_size`` is the decoded side).
            names: the items' locations (default ``item[i]``).
            classes: class names (default ``"0".."C-1"``).
        """
        n = len(encoded) if encoded is not None else len(x)
        sizes = {n} | ({len(label)} if label is not None else set()) | ({len(v)} if v is not None else set())
        if len(sizes) != 1 or n == 0:
            raise ValueError(f"store columns must be non-empty and of one length, got x: {n}"
                             + (f", label: {len(label)}" if label is not None else "")
                             + (f", v: {len(v)}" if v is not None else ""))
        if encoded is not None:
            codec = {"kind": "image", "size": image_size or 32}
        else:
            x = np.asarray(x)
            codec = {"kind": "tensor", "shape": list(x.shape[1:]), "dtype": "uint8" if x.dtype == np.uint8 else "float32"}
            x = x if x.dtype == np.uint8 else x.astype(np.float32)
        names = names or [f"item[{i}]" for i in range(n)]
        step = shard_size or n
        shards = []
        for a in range(0, n, step):
            b = min(a + step, n)
            rows = encoded[a:b] if encoded is not None else x[a:b]
            shards.append(Shard(a, b, table=shard_table(np.arange(a, b), rows, names[a:b], None if v is None else v[a:b])))
        labels = None if label is None else np.asarray(label).astype(np.int64)
        if labels is not None and classes is None:
            classes = [str(c) for c in range(int(labels.max()) + 1)]
        v_codec = None if v is None else {"kind": "tensor", "shape": list(np.shape(v)[1:]), "dtype": "float32"}
        return cls(shards, labels, classes, codec, v_codec, "memory", np.arange(n))

    @classmethod
    def from_arrays(cls, **columns: Optional[np.ndarray]) -> "SampleStore":
        """As :meth:`in_memory`, with every shard put into the Ray object store."""
        import ray

        store = cls.in_memory(**columns)
        for shard in store.shards:
            shard.ref, shard.table = ray.put(shard.table), None
        store.location = "object_store"
        return store

    # -- access -----------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return int(self._starts[-1])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def has(self, name: str) -> bool:
        """Whether the store holds column ``name`` (``x``, ``label`` or ``v``)."""
        return name == X or (name == "label" and self.labels is not None) or (name == V and self.v_codec is not None)

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.classes is None else len(self.classes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one decoded sample of ``x``: ``(3, S, S)`` for images, the tensor's shape otherwise."""
        if self.codec["kind"] == "image":
            return (3, int(self.codec["size"]), int(self.codec["size"]))
        return tuple(int(d) for d in self.codec["shape"])

    @property
    def v_shape(self) -> Optional[tuple[int, ...]]:
        return None if self.v_codec is None else tuple(int(d) for d in self.v_codec["shape"])

    def _shard(self, index: int) -> dict[str, Any]:
        opened = self._open.get(index)
        if opened is None:
            shard = self.shards[index]
            if shard.table is not None:
                table = shard.table
            elif shard.path is not None:
                import pyarrow as pa

                table = pa.ipc.open_file(pa.memory_map(shard.path, "r")).read_all()  # zero-copy view of the file
            else:
                import ray

                table = ray.get(shard.ref)  # zero-copy view of this node's copy
            opened = {"table": table, X: _Column(table.column(X)), NAME: table.column(NAME)}
            if V in table.column_names:
                opened[V] = _Column(table.column(V))
            self._open[index] = opened
        return opened

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise IndexError(f"ids must be in [0, {self.size}), got range [{ids.min()}, {ids.max()}]")
        shard = np.searchsorted(self._starts, ids, side="right") - 1
        return shard, ids - self._starts[shard]

    def raw(self, ids: np.ndarray, column: str = X) -> list[memoryview]:
        """The stored bytes of samples ``ids`` (zero-copy views), in the given order. O(len(ids)).

        For an image source these are exactly the bytes of the source files.
        """
        shards, rows = self._locate(ids)
        return [self._shard(int(s))[column].get(int(r)) for s, r in zip(shards, rows)]

    def name(self, idx: int) -> str:
        """The location of sample ``idx`` in its source (a relative path, ``file#row``, ...)."""
        (shard,), (row,) = self._locate(np.array([idx]))
        return str(self._shard(int(shard))[NAME][int(row)])

    def take(self, ids: np.ndarray, name: str = X) -> np.ndarray:
        """Samples ``ids`` of a column, decoded, in the given order. O(len(ids)).

        ``x``: ``float32 [B, *sample_shape]`` with the evaluation-time decode (images in [0, 1]);
        ``v``: ``float32 [B, d]``; ``label``: ``int64 [B]``.
        """
        if name == "label":
            if self.labels is None:
                raise KeyError("store has no column 'label' (the source is unlabelled)")
            _, _ = self._locate(ids)
            return self.labels[np.asarray(ids, dtype=np.int64)]
        if name not in (X, V) or (name == V and self.v_codec is None):
            raise KeyError(f"store has no column {name!r}; it has {[c for c in (X, 'label', V) if self.has(c)]}")
        from trainers.feed import decode_batch, decode_tensors

        if name == V:
            return decode_tensors(self.raw(ids, V), self.v_codec)
        images, _ = decode_batch(self.raw(ids), self.codec)
        return images.numpy() if images.dtype.is_floating_point else images.float().div_(255).numpy()

    def column(self, name: str) -> np.ndarray:
        """A whole column, decoded (:meth:`take` of every id): O(N) memory, for small stores only."""
        if name == "label":
            if self.labels is None:
                raise KeyError("store has no column 'label' (the source is unlabelled)")
            return self.labels
        return self.take(np.arange(self.size), name)

    def stored_bytes(self) -> int:
        """Bytes of the stored samples (the shards' sizes)."""
        return int(sum(self._shard(i)["table"].nbytes for i in range(len(self.shards)))) \
            if self.location == "memory" else int(getattr(self, "_bytes", 0))

    def __getstate__(self):  # ship shard handles, never mapped tables
        state = {k: v for k, v in self.__dict__.items() if k not in ("_open", "_starts")}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open = {}
        self.__post_init__()
