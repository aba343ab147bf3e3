"""Sources as Ray Data datasets, and the SampleStore that gives random access by integer id.

Ray Data streams rows but cannot serve an arbitrary batch of ids (its random-access dataset is
deprecated in 2.60), and a graph-sampled batch is exactly that. So a source is read through Ray Data
once, assembled in id order, and put into the object store as a few large numpy arrays; every train
worker maps them zero-copy and gathers rows with fancy indexing.

Cost: reading is O(N) once per job; ``take`` is O(B) memory traffic; the store costs one copy of the
data in each node's object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray

from pipelines.sources import RawData, load_source, split_indices

ID = "id"


def to_dataset(x: np.ndarray, labels: Optional[np.ndarray], num_blocks: int = 4,
               v: Optional[np.ndarray] = None) -> "ray.data.Dataset":
    """A Ray dataset with an explicit ``id`` column (0..N-1), the samples ``x``, ``label`` and the
    second modality ``v`` of a paired source."""
    from ray.data.extensions import ArrowTensorArray

    columns = {ID: pa.array(np.arange(len(x), dtype=np.int64)), "x": ArrowTensorArray.from_numpy(x)}
    if labels is not None:
        columns["label"] = pa.array(labels.astype(np.int64))
    if v is not None:
        columns["v"] = ArrowTensorArray.from_numpy(v)
    table = pa.table(columns)
    step = max(1, -(-len(x) // num_blocks))
    # ``from_blocks`` computes block metadata here; ``from_arrow`` would launch one metadata task per
    # block, each asking for a whole CPU, which deadlocks a refresh while train workers hold the CPUs.
    return ray.data.from_blocks([table.slice(i, step) for i in range(0, len(x), step)])


def collect_by_id(ds: "ray.data.Dataset", columns: list[str]) -> dict[str, np.ndarray]:
    """Materialise ``columns`` of a dataset as numpy arrays ordered by the ``id`` column.

    Order comes from the ids, not from Ray Data's execution order (which is not preserved by default).
    Raises ``ValueError`` when ids are missing or duplicated.
    """
    # Columns are selected in pyarrow, not with ``select_columns``: that would add a task stage that
    # asks for a whole CPU, which train workers may hold while a refresh runs.
    tables = [t.select([ID, *columns]) for t in ray.get(ds.to_arrow_refs())]
    table = pa.concat_tables(tables).sort_by(ID)
    ids = table.column(ID).to_numpy()
    if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"dataset ids are not 0..{len(ids) - 1} exactly once each")
    out = {}
    for name in columns:
        col = table.column(name)
        out[name] = _column_to_numpy(col)
    return out


def _column_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    col = col.combine_chunks()
    if hasattr(col, "to_numpy_ndarray"):  # Ray's tensor extension type
        return col.to_numpy_ndarray()
    if hasattr(col.type, "to_pandas_dtype") and not pa.types.is_fixed_size_list(col.type):
        try:
            return col.to_numpy(zero_copy_only=False)
        except NotImplementedError:
            pass
    return np.stack(col.to_numpy(zero_copy_only=False))


def _same_length(columns: dict[str, Optional[np.ndarray]]) -> tuple[dict[str, np.ndarray], int]:
    present = {k: np.ascontiguousarray(v) for k, v in columns.items() if v is not None}
    sizes = {len(v) for v in present.values()}
    if len(sizes) != 1:
        raise ValueError(f"store columns must be non-empty and of one length, got "
                         f"{ {k: len(v) for k, v in present.items()} }")
    return present, sizes.pop()


@dataclass
class SampleStore:
    """Random access by id to one split of a dataset, backed by the Ray object store.

    Attributes:
        refs: column name -> ObjectRef of the whole column (``x`` always; ``label`` when known;
            ``v``, the second modality, for a paired source).
        size: number of samples; ids are ``0..size-1``.
    """

    refs: dict[str, "ray.ObjectRef"]
    size: int
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_arrays(cls, **columns: Optional[np.ndarray]) -> "SampleStore":
        present, size = _same_length(columns)
        return cls(refs={k: ray.put(v) for k, v in present.items()}, size=size)

    @classmethod
    def in_memory(cls, **columns: Optional[np.ndarray]) -> "SampleStore":
        """A store over local arrays, without Ray (tests, single-process tools)."""
        present, size = _same_length(columns)
        return cls(refs={}, size=size, _cache=present)

    def column(self, name: str) -> np.ndarray:
        """The whole column (a zero-copy view of the object store on this node)."""
        if name not in self._cache:
            if name not in self.refs:
                raise KeyError(f"store has no column {name!r}; it has {sorted({*self.refs, *self._cache})}")
            self._cache[name] = ray.get(self.refs[name])
        return self._cache[name]

    def take(self, ids: np.ndarray, name: str = "x") -> np.ndarray:
        """Rows ``ids`` of a column, in the given order. O(len(ids))."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise IndexError(f"ids must be in [0, {self.size}), got range [{ids.min()}, {ids.max()}]")
        return self.column(name)[ids]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample of ``x``, e.g. ``(C, H, W)``."""
        return tuple(self.column("x").shape[1:])

    def has(self, name: str) -> bool:
        """Whether the store holds column ``name``."""
        return name in self.refs or name in self._cache

    @property
    def has_labels(self) -> bool:
        return self.has("label")

    def __getstate__(self):  # ship refs only, never the mapped arrays
        return {"refs": self.refs, "size": self.size}

    def __setstate__(self, state):
        self.refs, self.size, self._cache = state["refs"], state["size"], {}


@dataclass(frozen=True)
class Splits:
    train: SampleStore
    test: SampleStore
    train_source_ids: np.ndarray  # position in the source of every training id
    test_source_ids: np.ndarray


def build_splits(source: str, test_fraction: float, split_seed: int, **source_params: Any) -> Splits:
    """Read ``source`` through Ray Data and build the train and held-out SampleStores.

    Training ids are ``0..N_train-1`` (the sampler's node ids); the held-out split is only used for
    evaluation. ``source_params`` size and seed a generated source (see :func:`load_source`).
    Columns: ``x`` always, ``label`` when the source has labels, ``v`` for a paired source.
    """
    raw: RawData = load_source(source, **source_params)
    ds = to_dataset(raw.x, raw.labels, v=raw.v)
    cols = ["x"] + (["label"] if raw.labels is not None else []) + (["v"] if raw.v is not None else [])
    data = collect_by_id(ds, cols)
    labels = data.get("label")
    train_idx, test_idx = split_indices(len(data["x"]), test_fraction, split_seed, labels)

    def store(idx: np.ndarray) -> SampleStore:
        return SampleStore.from_arrays(**{name: data[name][idx] for name in cols})

    return Splits(train=store(train_idx), test=store(test_idx),
                  train_source_ids=train_idx, test_source_ids=test_idx)
