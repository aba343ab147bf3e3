"""From a source to the train and held-out SampleStores: list once, split, read through Ray Data.

Two stages, so that every data problem is found before Ray starts:

1. :func:`prepare_data` (driver, no Ray): builds the source objects, lists their items (the id ->
   location map, fixed for the run and written to ``<run>/data/items_{train,test}.csv``; a resumed run
   reads these files back instead of listing again), splits off the held-out items
   (``data.test_source`` or the seeded ``data.test_fraction`` split), keeps at most
   ``eval.max_samples`` of them, and settles the decoded image side (``data.image_size``).
2. :func:`build_stores` (Ray): cuts each split into shards of contiguous ids (about
   :data:`SHARD_BYTES` of stored samples each) and reads every shard in a Ray Data task
   (``map_batches`` over one block per shard): the source reads its items with a pyarrow file
   system and the task returns the shard table (``object_store``) or writes it as an Arrow IPC file
   and returns its path (``disk``). The driver only ever holds shard handles and the labels.
   Built-in data (arrays the driver already holds after listing them, ``Source.in_driver``) is cut
   into the same shards in the driver instead: a task would load or generate the arrays again.

Cost: listing O(N) small metadata; the build reads every item once, O(total stored bytes), in
parallel over the cluster's CPUs; the store then holds one stored copy per node (object store) or
one on disk.

Why not ``read_images``/``read_binary_files``: they yield rows in execution order with no stable id,
decode or drop whole blocks on one corrupt file (RAY_NOTES), and pay a fixed cost per file. Ids here
come from the sorted listing, shards are contiguous id ranges (so finding an id is a binary search
over shard starts), and a damaged item is stored as it is and replaced at decode time.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipelines.sources import LABEL, LOCATION, NBYTES, Listing, Source, SourceError, make_source, split_indices
from pipelines.store import ID, NAME, SPLIT, Shard, SampleStore, shard_table, write_shard

SHARD_BYTES = 64 << 20  # stored bytes per shard: big enough to amortise a task, small enough to stream
MAX_SHARD_ITEMS = 100_000
DEFAULT_MAX_SIDE = 224  # default decoded side when data.image_size is not set (the first image's shorter side, at most this)
SPLITS = ("train", "test")
STORE_ID = "store_id"


# ----------------------------------------------------------------------------------------------
# 1. prepare: sources, listing, split (no Ray)


@dataclass
class PreparedData:
    """Everything known about the data before Ray starts.

    Attributes:
        sources: the source of each split (the same object twice for a ``test_fraction`` split).
        listings: the items of each split; row ``i`` is store id ``i``.
        source_rows: row of every store id in its source's listing.
        classes: class names (index = label) shared by both splits, or ``None`` (unlabelled).
        image_size: decoded side of image sources, ``None`` for tensor sources.
        resumed: the listings were read back from a previous attempt of this run.
    """

    sources: dict[str, Source]
    listings: dict[str, Listing]
    source_rows: dict[str, np.ndarray]
    classes: Optional[list[str]]
    image_size: Optional[int]
    item_files: dict[str, Path] = field(default_factory=dict)
    resumed: bool = False

    @property
    def sizes(self) -> dict[str, int]:
        return {split: listing.size for split, listing in self.listings.items()}

    @property
    def stored_bytes(self) -> int:
        return int(sum(int(np.sum(lst.table.column(NBYTES).to_numpy())) for lst in self.listings.values()))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one decoded sample of ``x``: ``(3, S, S)`` for images, the tensor's shape otherwise
        (the store's ``sample_shape``, known before the store is built)."""
        codec = self.listings["train"].codec
        if codec["kind"] == "image":
            return (3, int(self.image_size), int(self.image_size))
        return tuple(int(d) for d in codec["shape"])


def source_options(data_cfg: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`pipelines.sources.make_source` from the ``data:`` section."""
    return {"image_column": data_cfg.get("image_column") or "image", "label_column": data_cfg.get("label_column"),
            "s3_endpoint": data_cfg.get("s3_endpoint"), "num_samples": data_cfg.get("num_samples", 4000),
            "dim": data_cfg.get("dim", 8), "seed": data_cfg.get("seed", 0)}


def _relabel(listing: Listing, classes: list[str]) -> tuple[Listing, list[str]]:
    """Labels of ``listing`` re-expressed in ``classes`` (names the training split has), with the
    listing's unseen class names appended."""
    if listing.classes is None:
        return listing, classes
    merged = list(classes) + [c for c in listing.classes if c not in classes]
    index = {name: i for i, name in enumerate(merged)}
    mapping = np.array([index[c] for c in listing.classes], dtype=np.int64)
    table = listing.table.set_column(listing.table.column_names.index(LABEL), LABEL,
                                     pa.array(mapping[listing.labels]))
    return Listing(table, merged, listing.codec, listing.v_codec), merged


def _image_side(source: Source, listing: Listing) -> int:
    """The shorter side of the first image that opens (at most :data:`DEFAULT_MAX_SIDE`)."""
    import io

    from PIL import Image

    for row in range(min(listing.size, 20)):
        data = source.read(listing.table.slice(row, 1)).x[0]
        try:
            with Image.open(io.BytesIO(bytes(data))) as img:
                return int(min(min(img.size), DEFAULT_MAX_SIDE))
        except Exception:
            continue
    raise SourceError(f"{source.spec}: none of the first {min(listing.size, 20)} images can be opened; "
                      f"are these image files?")


def prepare_data(data_cfg: dict[str, Any], eval_cfg: dict[str, Any], run_dir: Optional[Path] = None) -> PreparedData:
    """List, split and size the data of a run; see the module docstring.

    Args:
        data_cfg: the ``data:`` config section as a dict.
        eval_cfg: the ``eval:`` section (``max_samples`` caps the held-out split).
        run_dir: where ``data/items_*.csv`` go (and are read back from on resume); ``None``: nowhere.

    Raises:
        SourceError: one line naming the path and what is wrong.
    """
    options = source_options(data_cfg)
    source = make_source(data_cfg["source"], **options)
    test_spec = data_cfg.get("test_source")
    test_source = make_source(test_spec, **options) if test_spec else source
    sources = {"train": source, "test": test_source}
    data_dir = Path(run_dir) / "data" if run_dir is not None else None
    files = {split: data_dir / f"items_{split}.csv" for split in SPLITS} if data_dir else {}
    if files and all(f.exists() for f in files.values()):
        return _read_back(sources, files, data_cfg)

    listing = source.list()
    if test_spec:
        test_listing = test_source.list()
        if (listing.classes is None) != (test_listing.classes is None):
            raise SourceError(f"data.test_source = {test_spec!r} is {'un' if test_listing.classes is None else ''}labelled "
                              f"but data.source = {data_cfg['source']!r} is {'un' if listing.classes is None else ''}labelled")
        if listing.codec.get("kind") != test_listing.codec.get("kind") or (
                listing.codec.get("kind") == "tensor" and listing.codec != test_listing.codec):
            raise SourceError(f"data.test_source = {test_spec!r} stores {test_listing.codec} but data.source stores "
                              f"{listing.codec}: both must hold the same kind of samples")
        classes = listing.classes
        if classes is not None:
            test_listing, classes = _relabel(test_listing, classes)
        train_rows, test_rows = np.arange(listing.size), np.arange(test_listing.size)
        listings = {"train": listing, "test": test_listing}
    else:
        classes = listing.classes
        train_rows, test_rows = split_indices(listing.size, data_cfg.get("test_fraction", 0.2),
                                              data_cfg.get("split_seed", 0), listing.labels)
        listings = {"train": listing.take(train_rows), "test": listing.take(test_rows)}
    cap = eval_cfg.get("max_samples")
    if cap and listings["test"].size > cap:  # a seeded subset of the held-out items, in listing order
        keep = np.sort(np.random.default_rng([data_cfg.get("split_seed", 0), 1]).choice(listings["test"].size, cap,
                                                                                          replace=False))
        listings["test"] = listings["test"].take(keep)
        test_rows = test_rows[keep]
    image_size = None
    if listing.codec["kind"] == "image":
        image_size = int(data_cfg.get("image_size") or _image_side(source, listing))
    prepared = PreparedData(sources, listings, {"train": np.asarray(train_rows), "test": np.asarray(test_rows)},
                            classes, image_size)
    if data_dir is not None:
        _write_items(prepared, data_dir)
    return prepared


def _write_items(prepared: PreparedData, data_dir: Path) -> None:
    """``items_{split}.csv``: store id, the source's row, location, label and class, and the columns
    the source reads by (the id -> item map of the run, also logged to MLflow)."""
    import pyarrow.csv as pcsv

    data_dir.mkdir(parents=True, exist_ok=True)
    for split, listing in prepared.listings.items():
        table = listing.table
        table = table.add_column(0, ID, pa.array(np.arange(listing.size, dtype=np.int64)))
        table = table.add_column(1, "source_row", pa.array(prepared.source_rows[split].astype(np.int64)))
        if prepared.classes is not None and LABEL in table.column_names:
            table = table.append_column("class", pa.array(np.asarray(prepared.classes, dtype=object)[listing.labels]))
        path = data_dir / f"items_{split}.csv"
        pcsv.write_csv(table, path)
        prepared.item_files[split] = path
    meta = {"classes": prepared.classes, "image_size": prepared.image_size,
            "codec": prepared.listings["train"].codec, "v_codec": prepared.listings["train"].v_codec}
    (data_dir / "data.json").write_text(json.dumps(meta, indent=1))


def _read_back(sources: dict[str, Source], files: dict[str, Path], data_cfg: dict[str, Any]) -> PreparedData:
    import pyarrow.csv as pcsv

    meta = json.loads((files["train"].parent / "data.json").read_text())
    listings, rows = {}, {}
    for split, path in files.items():
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False,
                                                                         column_types={LOCATION: pa.string()}))
        rows[split] = table.column("source_row").to_numpy()
        keep = [c for c in table.column_names if c not in (ID, "source_row", "class")]
        listings[split] = Listing(table.select(keep), meta["classes"], meta["codec"], meta["v_codec"])
    return PreparedData(sources, listings, rows, meta["classes"], meta["image_size"], dict(files), resumed=True)


# ----------------------------------------------------------------------------------------------
# 2. build: shards through Ray Data


def plan_shards(nbytes: np.ndarray, target: int = SHARD_BYTES, max_items: int = MAX_SHARD_ITEMS,
                min_shards: int = 1) -> np.ndarray:
    """Shard boundaries ``[0, ..., N]`` over items of sizes ``nbytes``: contiguous ranges of about
    ``target`` bytes (at most ``max_items`` items), at least ``min_shards`` of them when there are
    enough items. O(N)."""
    n = len(nbytes)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    total = float(np.sum(nbytes))
    count = max(math.ceil(total / target), math.ceil(n / max_items), min(min_shards, max(1, n // 64)))
    cuts = np.searchsorted(np.cumsum(nbytes, dtype=np.float64), np.arange(1, count) * total / count, side="left") + 1
    return np.unique(np.concatenate([[0], np.clip(cuts, 1, n - 1) if n > 1 else [], [n]]).astype(np.int64))


def _build_shard(block: pa.Table, sources: dict[str, Source], location: str, out_dir: Optional[str]) -> pa.Table:
    """Ray Data map function: read the items of one block (one shard) and store them."""
    split = SPLITS[int(block.column(SPLIT)[0].as_py())]
    result = sources[split].read(block)
    ids = block.column(STORE_ID).to_numpy()
    names = block.column(LOCATION).to_pylist()
    table = shard_table(ids, result.x, names, result.v)
    errors = json.dumps(result.errors[:50])
    if location == "disk":
        path = str(Path(out_dir) / f"{split}_{int(ids[0]):010d}.arrow")
        size = write_shard(table, path)
        return pa.table({SPLIT: [SPLITS.index(split)], "start": [int(ids[0])], "stop": [int(ids[-1]) + 1],
                         "path": [path], "nbytes": [size], "errors": [errors], "error_count": [len(result.errors)]})
    return table.append_column(SPLIT, pa.array(np.full(len(ids), SPLITS.index(split), np.int8))) \
        .append_column("errors", pa.array([errors] + [""] * (len(ids) - 1)))


def _shard_meta(table: pa.Table) -> dict[str, Any]:
    ids = table.column(ID)
    errors = table.column("errors")[0].as_py() if table.num_rows else "[]"
    return {SPLIT: int(table.column(SPLIT)[0].as_py()), "start": int(ids[0].as_py()),
            "stop": int(ids[-1].as_py()) + 1, "nbytes": int(table.nbytes), "errors": errors}


@dataclass
class Splits:
    train: SampleStore
    test: SampleStore
    train_source_ids: np.ndarray  # row in the source listing of every training id
    test_source_ids: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _listing_hash(prepared: PreparedData) -> str:
    digest = hashlib.sha1()
    for split in SPLITS:
        table = prepared.listings[split].table
        digest.update(str(table.num_rows).encode())
        for name in (LOCATION, NBYTES):
            for chunk in table.column(name).chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        digest.update(buf)
    return digest.hexdigest()


def choose_location(stored_bytes: int, requested: str = "auto") -> str:
    """``object_store`` when the stored samples take at most half of the smallest node's object
    store, else ``disk`` (``requested`` other than ``auto`` is returned as is)."""
    if requested != "auto":
        return requested
    import ray

    stores = [node["Resources"].get("object_store_memory", 0) for node in ray.nodes() if node.get("Alive")]
    capacity = min(stores) if stores else ray.cluster_resources().get("object_store_memory", 0)
    return "object_store" if stored_bytes <= 0.5 * capacity else "disk"


def _build_with_ray_data(blocks: list[pa.Table], prepared: PreparedData, location: str,
                         store_dir: Optional[Path], num_cpus: float) -> list[dict[str, Any]]:
    """Read every shard in a Ray Data task (one block per shard); the shards' metadata, with the
    object ref of each shard table (``object_store``) or the path it was written to (``disk``)."""
    import ray
    from ray.util.debug import log_once

    from trainers.progress import quiet_logging

    quiet_logging(ray_data=True)  # Ray Data's execution-plan lines, unless --verbose
    log_once("ray_data_progress_manager_disabled")  # bars are off on purpose; say so once, not at all
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_blocks(blocks).map_batches(
        _build_shard, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
        fn_kwargs={"sources": prepared.sources, "location": location,
                   "out_dir": None if store_dir is None else str(store_dir)})
    try:
        if location == "disk":
            return ds.take_all()
        refs = ds.materialize().to_arrow_refs()
        meta_task = ray.remote(num_cpus=0)(_shard_meta)
        metas = ray.get([meta_task.remote(ref) for ref in refs])
        for meta, ref in zip(metas, refs):
            meta["ref"] = ref
        return metas
    except Exception as err:  # a source refusing an item inside a task: its own message, one line
        cause = getattr(err, "cause", None) or err
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        if isinstance(cause, (SourceError, ValueError)) and str(cause).split(":")[0] in (
                src.spec.split(":")[0] for src in prepared.sources.values()):
            raise SourceError(str(cause).splitlines()[0]) from None
        raise


def _build_in_driver(blocks: list[pa.Table], sources: dict[str, Source], location: str,
                     store_dir: Optional[Path]) -> list[dict[str, Any]]:
    """The same shards built here, for sources whose items the driver already holds
    (``Source.in_driver``): the same shard tables, put in the object store or written to disk."""
    import ray

    metas = []
    for block in blocks:
        table = _build_shard(block, sources, location, None if store_dir is None else str(store_dir))
        if location == "disk":
            metas += table.to_pylist()
        else:
            metas.append({**_shard_meta(table), "ref": ray.put(table)})
    return metas


def build_stores(prepared: PreparedData, location: str = "auto", store_dir: Optional[Path] = None,
                 num_cpus: float = 1.0) -> Splits:
    """Read the prepared splits into two SampleStores through Ray Data; see the module docstring.

    Args:
        prepared: from :func:`prepare_data`.
        location: ``object_store``, ``disk`` or ``auto`` (:func:`choose_location`).
        store_dir: where ``disk`` shards go (a resumed run reuses complete shards found there).
        num_cpus: logical CPUs per read task.

    Raises:
        SourceError: an item that the source cannot store (for instance integer pixels out of range).
    """
    import ray

    t0 = time.perf_counter()
    location = choose_location(prepared.stored_bytes, location)
    if location == "disk" and store_dir is None:
        raise ValueError("a disk store needs a store_dir")
    manifest_path = Path(store_dir) / "manifest.json" if store_dir is not None else None
    key = _listing_hash(prepared)
    reused = False
    if location == "disk" and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        metas = manifest["shards"] if manifest.get("listing") == key and all(
            Path(m["path"]).exists() for m in manifest["shards"]) else None
        reused = metas is not None
    if not reused:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = []
        for s, split in enumerate(SPLITS):
            listing = prepared.listings[split]
            nbytes = listing.table.column(NBYTES).to_numpy()
            # parallel reads pay off past a few MiB; below that one task per split is quickest
            bounds = plan_shards(nbytes, min_shards=2 * cpus if nbytes.sum() > 16 * 2**20 else 1)
            table = listing.table.append_column(STORE_ID, pa.array(np.arange(listing.size, dtype=np.int64)))
            table = table.append_column(SPLIT, pa.array(np.full(listing.size, s, np.int8)))
            blocks += [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if location == "disk":
            Path(store_dir).mkdir(parents=True, exist_ok=True)
        if all(src.in_driver for src in prepared.sources.values()):
            metas = _build_in_driver(blocks, prepared.sources, location, store_dir)
        else:
            metas = _build_with_ray_data(blocks, prepared, location, store_dir, num_cpus)
        if location == "disk":
            manifest_path.write_text(json.dumps({"listing": key, "shards": metas}))
    stores = {}
    for s, split in enumerate(SPLITS):
        listing = prepared.listings[split]
        mine = sorted((m for m in metas if int(m[SPLIT]) == s), key=lambda m: m["start"])
        shards = [Shard(int(m["start"]), int(m["stop"]), ref=m.get("ref"), path=m.get("path")) for m in mine]
        codec = dict(listing.codec)
        if codec["kind"] == "image":
            codec["size"] = prepared.image_size
        store = SampleStore(shards, listing.labels, prepared.classes if listing.labels is not None else None,
                            codec, listing.v_codec, location, prepared.source_rows[split])
        if store.size != listing.size:
            raise RuntimeError(f"{split} store holds {store.size} samples, the listing {listing.size}")
        stores[split] = store
    errors = [e for m in metas for e in json.loads(m.get("errors") or "[]")]
    info = {"location": location, "shards": len(metas), "stored_bytes": int(sum(m["nbytes"] for m in metas)),
            "build_seconds": time.perf_counter() - t0, "unreadable": errors, "reused": reused}
    return Splits(stores["train"], stores["test"], prepared.source_rows["train"], prepared.source_rows["test"], info)


def build_splits(source: str, test_fraction: float = 0.2, split_seed: int = 0, location: str = "auto",
                 store_dir: Optional[Path] = None, **data: Any) -> Splits:
    """:func:`prepare_data` then :func:`build_stores` for a ``data.source`` value (tests, tools)."""
    prepared = prepare_data({"source": source, "test_fraction": test_fraction, "split_seed": split_seed, **data},
                            {"max_samples": data.pop("max_samples", None)})
    return build_stores(prepared, location, store_dir)


# ----------------------------------------------------------------------------------------------
# small array datasets (embedding results, tests)


def to_dataset(x: np.ndarray, labels: Optional[np.ndarray], num_blocks: int = 4,
               v: Optional[np.ndarray] = None) -> "ray.data.Dataset":
    """A Ray dataset with an explicit ``id`` column (0..N-1), the samples ``x``, ``label`` and the
    second modality ``v`` of a paired source."""
    import ray
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
    import ray

    # Columns are selected in pyarrow, not with ``select_columns``: that would add a task stage that
    # asks for a whole CPU, which train workers may hold while a refresh runs.
    tables = [t.select([ID, *columns]) for t in ray.get(ds.to_arrow_refs())]
    table = pa.concat_tables(tables).sort_by(ID)
    ids = table.column(ID).to_numpy()
    if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"dataset ids are not 0..{len(ids) - 1} exactly once each")
    return {name: _column_to_numpy(table.column(name)) for name in columns}


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
