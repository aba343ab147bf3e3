"""Data sources a job can name in ``data.source``: one object per kind of source.

A source *lists* its items once (the id -> location map, fixed for the run), *reads* items by their
row in that listing, and *knows* its labels. Nothing else in the pipeline branches on the kind of
source: :mod:`pipelines.datasets` reads any source into a SampleStore through Ray Data, and adding a
source means writing one :class:`Source` subclass here and adding it to :data:`KINDS`.

=========================  ====================================================================
``builtin:digits``         scikit-learn's 1797 8x8 digits; labels used only for evaluation
                           (and as the classes of ``soft_infonce``'s conditional model)
``builtin:digits_pairs``   the same digits as pairs for bimodal training: u = the image,
                           v = its label as a one-hot vector
``generated:gaussian``     ``data.num_samples`` pairs (u, v) in R^d x R^d, jointly Gaussian with
                           identity marginals and a known cross-covariance (seed ``data.seed``)
``images:PATH``            a folder of images (jpg, jpeg, png, webp, bmp; any size and mode, read
                           as RGB). Class sub-folders give labels as torchvision's ``ImageFolder``
                           does (sorted folder names); a flat folder is unlabelled.
``parquet:PATH``           a parquet file, a folder of them or a glob; ``data.image_column`` holds
                           encoded image bytes or a fixed-shape numeric tensor, ``data.label_column``
                           (optional) the labels (integers or strings)
=========================  ====================================================================

``PATH`` is a local path or a ``file://``, ``s3://`` or ``gs://`` URI, read through pyarrow file
systems. S3 credentials come from the usual environment variables and files; ``data.s3_endpoint``
(else ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL``) points at S3-compatible storage.
"""

from __future__ import annotations

import fnmatch
import math
import os
import posixpath
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional
from urllib.parse import urlparse

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LOCATION, LABEL, NBYTES = "location", "label", "nbytes"  # listing columns every source writes


class SourceError(ValueError):
    """A data problem found before training; its message is one line naming the path and the problem."""


# ----------------------------------------------------------------------------------------------
# built-in data as arrays (kept for tests and reports)


@dataclass(frozen=True)
class RawData:
    """A whole built-in source in memory.

    Attributes:
        x: samples (the u modality of a paired source): ``float32 [N, C, H, W]`` for images,
            ``float32 [N, d]`` for vectors.
        labels: ``int64 [N]`` class ids, or ``None``.
        v: the second modality of a paired source, ``float32 [N, d_v]``, or ``None``.
        meta: facts about a generated source (e.g. its true cross-covariance), for tests and reports.
    """

    x: np.ndarray
    labels: Optional[np.ndarray]
    v: Optional[np.ndarray] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.v is not None


def _digits(**_: Any) -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # [1797, 1, 8, 8] in [0, 1]
    return RawData(x=x, labels=bunch.target.astype(np.int64))


def _digits_pairs(**_: Any) -> RawData:
    digits = _digits()
    one_hot = np.eye(10, dtype=np.float32)[digits.labels]
    return RawData(x=digits.x, labels=digits.labels, v=one_hot)


def canonical_correlations(dim: int) -> np.ndarray:
    """The canonical correlations of ``generated:gaussian``: ``0.9, ..., 0.9 / dim`` (evenly spaced)."""
    return np.linspace(0.9, 0.9 / dim, dim)


def gaussian_pairs(num_samples: int = 4000, dim: int = 8, seed: int = 0) -> RawData:
    """Pairs ``(u, v) ~ N(0, [[I, C], [C^T, I]])`` with ``C = Q_u diag(rho) Q_v^T``.

    ``Q_u, Q_v`` are seeded random rotations and ``rho`` the :func:`canonical_correlations`, so the
    top-r CCA directions of u are the first r columns of ``Q_u`` (ALGORITHMS.md 3.5: the optimal
    linear encoders of the bilinear CLIP loss span them). ``v = C^T u + L e`` with
    ``L L^T = I - C^T C``, the exact conditional ``v | u ~ N(C^T u, I - C^T C)``.

    Returns:
        ``RawData`` with ``x`` = u and ``v`` (both ``float32 [num_samples, dim]``), no labels, and
        ``meta`` holding ``cross_covariance``, ``canonical_correlations``, ``q_u`` and ``q_v``.
    """
    rng = np.random.default_rng(seed)
    rho = canonical_correlations(dim)
    q_u, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    q_v, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    cross = q_u @ np.diag(rho) @ q_v.T  # Cov(u, v)
    chol = np.linalg.cholesky(np.eye(dim) - cross.T @ cross)
    u = rng.standard_normal((num_samples, dim))
    v = u @ cross + rng.standard_normal((num_samples, dim)) @ chol.T
    meta = {"cross_covariance": cross, "canonical_correlations": rho, "q_u": q_u, "q_v": q_v}
    return RawData(x=u.astype(np.float32), labels=None, v=v.astype(np.float32), meta=meta)


# ----------------------------------------------------------------------------------------------
# storage: local paths and URIs through pyarrow file systems


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def s3_endpoint(configured: Optional[str] = None) -> Optional[str]:
    """The S3 endpoint: ``data.s3_endpoint``, else ``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL``."""
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_credentials() -> dict[str, str]:
    """Credentials given as environment variables in this process (the driver's shell), as
    ``S3FileSystem`` keyword arguments; empty when none are set (then pyarrow's own chain applies in
    each process: profiles, ``~/.aws``, instance roles)."""
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return {}
    out = {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
    if os.environ.get("AWS_SESSION_TOKEN"):
        out["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return out


def open_storage(uri: str, endpoint: Optional[str] = None, probe: bool = False,
                 credentials: Optional[dict[str, str]] = None):
    """A pyarrow file system and the path inside it for a local path or a file/s3/gs URI.

    Args:
        uri: ``/data/x``, ``relative/x``, ``file:///data/x``, ``s3://bucket/key`` or ``gs://bucket/key``.
        endpoint: S3-compatible endpoint URL (``http://127.0.0.1:9000``); see :func:`s3_endpoint`.
        probe: short timeouts and a single attempt (a check must not take minutes on a dead host).
        credentials: S3 keys (:func:`s3_credentials`); ``None``: pyarrow's default chain.

    Returns:
        ``(filesystem, path)``.
    """
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if scheme == "s3":
        kwargs: dict[str, Any] = {
            "connect_timeout": 2.0 if probe else 10.0, "request_timeout": 5.0 if probe else 60.0,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1 if probe else 3), **(credentials or {})}
        endpoint = s3_endpoint(endpoint)
        if endpoint:
            ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=ep.netloc, scheme=ep.scheme or "https",
                          region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if scheme in ("gs", "gcs"):
        from datetime import timedelta

        return (pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=5 if probe else 60)),
                f"{parsed.netloc}{parsed.path}".rstrip("/"))
    raise SourceError(f"{uri!r}: unsupported storage scheme {scheme + '://'!r}; use a local path, file://, s3:// or gs://")


def _credentials_hint(uri: str) -> str:
    if "s3://" not in uri:
        return ""
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if any(os.environ.get(n) for n in names) or os.path.exists(os.path.expanduser("~/.aws/credentials")):
        return ""
    return " (no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials)"


def storage_error(uri: str, err: Exception, endpoint: Optional[str] = None) -> SourceError:
    """One line for an I/O failure on ``uri``: unreachable storage, denied access, missing bucket."""
    text = " ".join(str(err).split())
    low = text.lower()
    where = f" at {s3_endpoint(endpoint)}" if "s3://" in uri and s3_endpoint(endpoint) else ""
    if any(s in low for s in ("could not connect", "couldn't connect", "connection refused", "timed out",
                              "network_connection", "resolve host", "curlcode")):
        return SourceError(f"{uri}: cannot reach the storage{where} ({text[:160]})")
    if any(s in low for s in ("access_denied", "access denied", "forbidden", "403", "invalidaccesskeyid",
                              "signaturedoesnotmatch", "credentials", "unauthorized")):
        return SourceError(f"{uri}: access denied{where}{_credentials_hint(uri) or ''} ({text[:160]})")
    if "no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low:
        return SourceError(f"{uri}: the bucket does not exist{where}")
    return SourceError(f"{uri}: cannot read{where}: {text[:200]}{_credentials_hint(uri)}")


def _file_info(fs, path: str, uri: str, endpoint: Optional[str]):
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise storage_error(uri, err, endpoint) from None


def _list_files(fs, path: str, uri: str, endpoint: Optional[str], recursive: bool = True):
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=False))
    except FileNotFoundError:
        raise SourceError(f"{uri}: folder not found") from None
    except OSError as err:
        raise storage_error(uri, err, endpoint) from None
    return infos


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


# ----------------------------------------------------------------------------------------------
# the listing: id -> item, fixed for a run


@dataclass
class Listing:
    """The items of a source, fixed when the run starts: item ``i`` is row ``i`` of ``table``.

    Attributes:
        table: one row per item; ``location`` (what a user reads in logs: a relative path,
            ``file#row``, ``digits[17]``), ``nbytes`` (stored size, exact or estimated), ``label``
            (int64 class index) when labelled, and the columns the source's ``read`` needs.
        classes: class names (index = label), or ``None`` when unlabelled.
        codec: how a sample of ``x`` is stored: ``{"kind": "image"}`` (encoded image files) or
            ``{"kind": "tensor", "shape": [...], "dtype": "uint8" | "float32"}``.
        v_codec: the codec of the second modality of a paired source, else ``None``.
    """

    table: Any  # pyarrow.Table
    classes: Optional[list[str]]
    codec: dict[str, Any]
    v_codec: Optional[dict[str, Any]] = None

    @property
    def size(self) -> int:
        return self.table.num_rows

    @property
    def labels(self) -> Optional[np.ndarray]:
        if LABEL not in self.table.column_names:
            return None
        return self.table.column(LABEL).to_numpy().astype(np.int64)

    def take(self, rows: np.ndarray) -> "Listing":
        """The items at ``rows`` (in that order), e.g. one split. O(len(rows))."""
        import pyarrow as pa

        return Listing(self.table.take(pa.array(np.asarray(rows, dtype=np.int64))), self.classes, self.codec,
                       self.v_codec)


@dataclass
class ReadResult:
    """Samples read for some listing rows, in their order.

    Attributes:
        x: the stored form of every sample: encoded file bytes (``list[bytes]``) or a tensor array
            ``[n, *shape]``.
        v: second modality ``float32 [n, d]`` of a paired source, else ``None``.
        errors: ``(location, message)`` of items that could not be read (stored empty; the feed
            replaces them like a corrupt image).
    """

    x: Any
    v: Optional[np.ndarray] = None
    errors: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Probe:
    """What a cheap look at a source tells before anything is read.

    Attributes:
        labelled: whether items have labels.
        num_classes: classes when known, else ``None``.
        paired: whether samples are (u, v) pairs.
    """

    labelled: bool
    num_classes: Optional[int]
    paired: bool = False


# ----------------------------------------------------------------------------------------------
# sources


class Source:
    """One kind of data. Subclasses set ``prefix`` and implement ``probe``, ``list`` and ``read``.

    A source holds only its spec and options (strings and numbers), so it pickles into Ray tasks; a
    file system is opened lazily in each process.

    Args:
        spec: the ``data.source`` value (``images:/data/cats``).
        image_column, label_column: parquet columns.
        s3_endpoint: S3-compatible endpoint (``data.s3_endpoint``).
        num_samples, dim, seed: generated sources.
    """

    prefix: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # the prefix is the whole spec (``builtin:digits``), no path after it
    paired: ClassVar[bool] = False
    user_data: ClassVar[bool] = False  # files the user brings (probed, listed, logged)
    labelled: ClassVar[Optional[bool]] = None  # known without looking at the data; None: depends on it
    num_classes: ClassVar[Optional[int]] = None
    # The items are arrays the driver already holds after listing them (built-in data): the store is
    # built there rather than in Ray Data tasks, which would each load or generate them again.
    in_driver: ClassVar[bool] = False

    def __init__(self, spec: str, *, image_column: str = "image", label_column: Optional[str] = None,
                 s3_endpoint: Optional[str] = None, num_samples: int = 4000, dim: int = 8, seed: int = 0):
        self.spec = spec
        self.path = spec[len(self.prefix):] if not self.exact else ""
        self.image_column, self.label_column = image_column, label_column
        self.s3_endpoint = s3_endpoint
        self.num_samples, self.dim, self.seed = num_samples, dim, seed
        # S3 keys from the driver's environment travel with the source into Ray's read tasks, so
        # workers (on any node, started before or after) read with the same identity
        self.credentials = s3_credentials() if "s3://" in self.path else {}
        self._fs = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"] = None  # reopened where it is used
        return state

    def filesystem(self, probe: bool = False):
        """``(pyarrow file system, path inside it)`` of ``self.path``."""
        if probe:
            return open_storage(self.path, self.s3_endpoint, probe=True, credentials=self.credentials)
        if self._fs is None:
            self._fs = open_storage(self.path, self.s3_endpoint, credentials=self.credentials)
        return self._fs

    def probe(self) -> Probe:
        """A cheap check (seconds at most, short timeouts) that the source exists and can be read.

        Raises:
            SourceError: one line naming the path and what is wrong.
        """
        return Probe(labelled=bool(self.labelled), num_classes=self.num_classes, paired=self.paired)

    def list(self) -> Listing:
        """Every item, in a fixed order. Raises ``SourceError`` for data that cannot be trained on."""
        raise NotImplementedError

    def read(self, items) -> ReadResult:
        """The stored form of the items ``items`` (rows of :meth:`list`'s table), in that order."""
        raise NotImplementedError


_RAW_CACHE: dict[tuple, RawData] = {}


class _ArraySource(Source):
    """A built-in source held as arrays (:class:`RawData`): items are rows of the arrays."""

    exact = True
    in_driver = True
    name: ClassVar[str] = ""

    def raw(self) -> RawData:
        """The arrays (loaded or generated once per process and parameters)."""
        key = (type(self).__name__, self.num_samples, self.dim, self.seed)
        if key not in _RAW_CACHE:
            _RAW_CACHE.clear()  # one built-in source per process is plenty
            _RAW_CACHE[key] = self._load()
        return _RAW_CACHE[key]

    def _load(self) -> RawData:
        raise NotImplementedError

    def list(self) -> Listing:
        import pyarrow as pa

        raw = self.raw()
        n = len(raw.x)
        cols = {LOCATION: pa.array([f"{self.name}[{i}]" for i in range(n)]),
                NBYTES: pa.array(np.full(n, raw.x[0].nbytes + (raw.v[0].nbytes if raw.paired else 0), np.int64)),
                "row": pa.array(np.arange(n, dtype=np.int64))}
        classes = None
        if raw.labels is not None:
            cols[LABEL] = pa.array(raw.labels.astype(np.int64))
            classes = [str(c) for c in range(int(raw.labels.max()) + 1)]
        tensor = lambda a: {"kind": "tensor", "shape": list(a.shape[1:]), "dtype": "float32"}  # noqa: E731
        return Listing(pa.table(cols), classes, tensor(raw.x), tensor(raw.v) if raw.paired else None)

    def read(self, items) -> ReadResult:
        rows = items.column("row").to_numpy()
        raw = self.raw()
        return ReadResult(x=raw.x[rows], v=None if raw.v is None else raw.v[rows])


class DigitsSource(_ArraySource):
    """scikit-learn's 1797 8x8 digits, ``float32 [1, 8, 8]`` in [0, 1], 10 classes."""

    prefix, name, labelled, num_classes = "builtin:digits", "digits", True, 10

    def _load(self) -> RawData:
        return _digits()


class DigitsPairsSource(_ArraySource):
    """The digits as pairs: u = the image, v = the one-hot label."""

    prefix, name, labelled, num_classes, paired = "builtin:digits_pairs", "digits_pairs", True, 10, True

    def _load(self) -> RawData:
        return _digits_pairs()


class GaussianSource(_ArraySource):
    """``data.num_samples`` jointly Gaussian pairs in R^dim x R^dim (:func:`gaussian_pairs`)."""

    prefix, name, labelled, paired = "generated:gaussian", "gaussian", False, True

    def _load(self) -> RawData:
        return gaussian_pairs(self.num_samples, self.dim, self.seed)


class ImageFolderSource(Source):
    """``images:PATH``: image files under a folder, labelled by class sub-folder.

    Labels follow torchvision's ``ImageFolder``: the class names are the sorted names of the
    sub-folders directly under PATH, class ``i`` is the ``i``-th name, and every image anywhere
    under a class folder belongs to it. A folder without sub-folders is unlabelled. Files and folders
    whose names start with ``.`` or ``_`` are skipped; extensions are matched case-insensitively.

    Listing is one recursive listing of PATH: O(files) (one request per 1000 objects on S3).
    """

    prefix, user_data = "images:", True

    def _top(self, probe: bool):
        fs, root = self.filesystem(probe)
        info = _file_info(fs, root, self.spec, self.s3_endpoint)
        import pyarrow.fs as pafs

        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"images:{self.path}: folder not found")
        if info.type == pafs.FileType.File:
            raise SourceError(f"images:{self.path}: is a file; give the folder that holds the images")
        return fs, root

    def _split(self, infos, root: str):
        """``(class names, images, others)`` of a listing: the sorted top-level folder names, a table
        of the images (``location`` relative to the root, ``nbytes``), and how many other files there
        are. Vectorised with Arrow: O(files), a few dozen bytes per file beyond pyarrow's own listing."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.fs as pafs

        n = len(infos)
        prefix = root.rstrip("/") + "/"
        paths = pa.array([i.path if i.path.startswith(prefix) else prefix + posixpath.relpath(i.path, root)
                          for i in infos], pa.string())
        is_dir = pa.array(np.fromiter((i.type == pafs.FileType.Directory for i in infos), bool, n))
        sizes = pa.array(np.fromiter((i.size or 0 for i in infos), np.int64, n))
        rel = pc.utf8_slice_codeunits(paths, len(prefix))
        visible = pc.invert(pc.match_substring_regex(rel, r"(^|/)[._]"))
        top_dirs = pc.and_(pc.and_(is_dir, visible), pc.invert(pc.match_substring(rel, "/")))
        classes = sorted(pc.filter(rel, top_dirs).to_pylist())
        image = pc.match_substring_regex(pc.utf8_lower(rel), "(" + "|".join(
            "\\" + e for e in IMAGE_EXTENSIONS) + ")$")
        files = pc.and_(pc.and_(pc.invert(is_dir), visible), image)
        others = int(pc.sum(pc.and_(pc.and_(pc.invert(is_dir), visible), pc.invert(image))).as_py() or 0)
        images = pa.table({LOCATION: pc.filter(rel, files), NBYTES: pc.filter(sizes, files)})
        return classes, images, others

    def _no_images(self, others: int, where: str = "") -> SourceError:
        seen = f"; found {others} other file(s)" if others else ""
        return SourceError(f"images:{self.path}: no images found{where} (looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)}, any case{seen})")

    def _not_splits(self, classes: list[str]) -> None:
        """Refuse a folder whose sub-folders are splits (train/test), not classes."""
        splits = {"train", "test", "val", "valid", "validation"}
        if len(classes) >= 2 and {c.lower() for c in classes} <= splits:
            names = ", ".join(classes)
            train = next((c for c in classes if c.lower() == "train"), classes[0])
            other = next((c for c in classes if c != train), classes[1])
            raise SourceError(f"images:{self.path}: its sub-folders ({names}) look like splits, not classes: "
                              f"set data.source=images:{self.path.rstrip('/')}/{train} and "
                              f"data.test_source=images:{self.path.rstrip('/')}/{other}")

    def probe(self) -> Probe:
        fs, root = self._top(probe=True)
        infos = _list_files(fs, root, f"images:{self.path}", self.s3_endpoint, recursive=False)
        if not infos:
            raise SourceError(f"images:{self.path}: the folder is empty")
        classes, files, others = self._split(infos, root)
        self._not_splits(classes)
        if classes:
            return Probe(labelled=True, num_classes=len(classes))
        if not files.num_rows:
            raise self._no_images(others)
        return Probe(labelled=False, num_classes=None)

    def list(self) -> Listing:
        """Every image, labelled by class folder, in ``ImageFolder``'s order (class, then folder as
        ``sorted(os.walk)``, then file name). One listing per class folder, so the peak memory is
        pyarrow's listing of the largest class (about 600 bytes per file), not of the whole set."""
        import pyarrow as pa
        import pyarrow.compute as pc

        fs, root = self._top(probe=False)
        where = f"images:{self.path}"
        top = _list_files(fs, root, where, self.s3_endpoint, recursive=False)
        if not top:
            raise SourceError(f"{where}: the folder is empty")
        classes, images, others = self._split(top, root)
        self._not_splits(classes)
        if not classes:
            if not images.num_rows:
                raise self._no_images(others)
            return Listing(images.sort_by([(LOCATION, "ascending")]), None, {"kind": "image"})
        parts = []
        for label, name in enumerate(classes):
            infos = _list_files(fs, f"{root.rstrip('/')}/{name}", where, self.s3_endpoint, recursive=True)
            _, found, _ = self._split(infos, root)
            del infos
            if not found.num_rows:
                raise SourceError(f"{where}: class folder {name!r} holds no images (looked for "
                                  f"{', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
            rel = found.column(LOCATION)
            parts.append(pa.table({
                LOCATION: rel, NBYTES: found.column(NBYTES), LABEL: pa.array(np.full(len(rel), label, np.int64)),
                "_folder": pc.replace_substring_regex(rel, "/[^/]*$", ""),
                "_name": pc.replace_substring_regex(rel, "^.*/", "")}).sort_by([("_folder", "ascending"),
                                                                                 ("_name", "ascending")]))
        return Listing(pa.concat_tables(parts).select([LOCATION, NBYTES, LABEL]).combine_chunks(), classes,
                       {"kind": "image"})

    def read(self, items) -> ReadResult:
        fs, root = self.filesystem()
        locations = items.column(LOCATION).to_pylist()
        errors: list[tuple[str, str]] = []

        def one(rel: str) -> bytes:
            try:
                with fs.open_input_file(f"{root}/{rel}") as f:
                    return f.read()
            except OSError as err:  # vanished or unreadable: replaced at decode time like a corrupt file
                errors.append((rel, " ".join(str(err).split())[:200]))
                return b""

        import pyarrow.fs as pafs

        if isinstance(fs, pafs.LocalFileSystem) or len(locations) < 4:
            data = [one(rel) for rel in locations]
        else:  # object storage: latency-bound, so overlap the requests
            with ThreadPoolExecutor(16) as pool:
                data = list(pool.map(one, locations))
        return ReadResult(x=data, errors=errors)


def _tensor_layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], Optional[tuple[int, ...]]]:
    """``(stored shape [C, H, W], transpose from the column's layout or None)`` of an image tensor."""
    if len(shape) == 2:
        return (1, *shape), None
    if len(shape) == 3:
        if shape[0] in (1, 3, 4):
            return tuple(shape), None
        if shape[-1] in (1, 3, 4):
            return (shape[2], shape[0], shape[1]), (0, 3, 1, 2)
    raise ValueError(f"shape {list(shape)} is not an image: expected [H, W], [C, H, W] or [H, W, C] with C in 1, 3, 4")


def _numeric_kind(value_type) -> Optional[str]:
    import pyarrow as pa

    if pa.types.is_uint8(value_type):
        return "uint8"
    if pa.types.is_floating(value_type):
        return "float32"
    if pa.types.is_integer(value_type):
        return "int"
    return None


def _tensor_type(arrow_type) -> Optional[tuple[tuple[int, ...], Any]]:
    """``(shape, value type)`` of a fixed-shape tensor column type (canonical ``arrow.fixed_shape_tensor``,
    Ray Data's tensor extension, or nested fixed-size lists), else ``None``."""
    import pyarrow as pa

    if isinstance(arrow_type, pa.BaseExtensionType):
        shape = getattr(arrow_type, "shape", None)
        value = getattr(arrow_type, "value_type", None)
        if value is None and hasattr(arrow_type, "scalar_type"):
            value = arrow_type.scalar_type
        if shape is not None and value is not None and all(d is not None and d > 0 for d in shape):
            return tuple(int(d) for d in shape), value
        return None
    shape = []
    t = arrow_type
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    if shape and _numeric_kind(t):
        return tuple(shape), t
    return None


class ParquetSource(Source):
    """``parquet:PATH``: rows of parquet files (a file, a folder of ``*.parquet`` files, or a glob).

    Items are the rows of the sorted files, in file then row order. ``data.image_column`` holds
    encoded image files (a binary column) or a fixed-shape numeric tensor (``[H, W]``, ``[C, H, W]``
    or ``[H, W, C]``: ``arrow.fixed_shape_tensor``, Ray Data's tensor type, or nested fixed-size
    lists); uint8 tensors are kept as uint8 (pixel values 0..255), floating tensors as float32 (values
    in [0, 1]). ``data.label_column`` (optional) holds integer or string labels, without nulls.

    Listing reads each file's footer and the label column: O(files + N) small reads.
    """

    prefix, user_data = "parquet:", True

    def _files(self, probe: bool) -> list[str]:
        import pyarrow.fs as pafs

        fs, root = self.filesystem(probe)
        where = f"parquet:{self.path}"
        if is_glob(root):
            base = root
            while is_glob(base):
                base = posixpath.dirname(base)
            infos = _list_files(fs, base, where, self.s3_endpoint, recursive="**" in root or "/" in root[len(base) + 1:])
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, root))
            if not files:
                raise SourceError(f"{where}: no files match the pattern")
            return files
        info = _file_info(fs, root, where, self.s3_endpoint)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{where}: no such file or folder")
        if info.type == pafs.FileType.File:
            return [root]
        infos = _list_files(fs, root, where, self.s3_endpoint, recursive=True)
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and not _hidden(i.path[len(root) + 1:]))
        if not files:
            raise SourceError(f"{where}: no .parquet files in the folder")
        return files

    def _schema(self, fs, path: str):
        import pyarrow.parquet as pq

        try:
            with fs.open_input_file(path) as f:
                return pq.read_schema(f)
        except OSError as err:
            if "parquet" in str(err).lower() or "magic" in str(err).lower():
                raise SourceError(f"parquet:{self.path}: {path} is not a parquet file ({' '.join(str(err).split())[:120]})") from None
            raise storage_error(f"parquet:{self.path}", err, self.s3_endpoint) from None

    def _codec(self, schema, path: str) -> dict[str, Any]:
        import pyarrow as pa

        names = schema.names
        where = f"parquet:{self.path}"
        for key, column in (("data.image_column", self.image_column), ("data.label_column", self.label_column)):
            if column is not None and column not in names:
                raise SourceError(f"{where}: {key} = {column!r} is not a column of {posixpath.basename(path)} "
                                  f"(its columns: {', '.join(names)})")
        arrow_type = schema.field(self.image_column).type
        if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
            return {"kind": "image"}
        tensor = _tensor_type(arrow_type)
        if tensor is None and (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
            return {"kind": "tensor", "shape": None, "dtype": None}  # shape read from the first row
        if tensor is None or _numeric_kind(tensor[1]) is None:
            raise SourceError(f"{where}: column {self.image_column!r} has type {arrow_type}: expected encoded image "
                              f"bytes (binary) or a fixed-shape numeric tensor")
        try:
            shape, _ = _tensor_layout(tensor[0])
        except ValueError as err:
            raise SourceError(f"{where}: column {self.image_column!r}: {err}") from None
        return {"kind": "tensor", "shape": list(shape), "dtype": "uint8" if _numeric_kind(tensor[1]) != "float32" else "float32"}

    def probe(self) -> Probe:
        files = self._files(probe=True)
        fs, _ = self.filesystem(probe=True)
        self._codec(self._schema(fs, files[0]), files[0])
        return Probe(labelled=self.label_column is not None, num_classes=None)

    def list(self) -> Listing:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        files = self._files(probe=False)
        fs, root = self.filesystem()
        where = f"parquet:{self.path}"
        codec = self._codec(self._schema(fs, files[0]), files[0])
        base = root if not is_glob(root) else posixpath.dirname(root.split("*")[0])
        file_idx, rows, nbytes, locations, labels = [], [], [], [], []
        for path in files:
            try:
                with fs.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
                    schema = meta.schema.to_arrow_schema()
                    if self.image_column not in schema.names or (self.label_column and self.label_column not in schema.names):
                        self._codec(schema, path)  # names the missing column
                    col = schema.names.index(self.image_column)
                    size = sum(meta.row_group(g).column(col).total_uncompressed_size
                               for g in range(meta.num_row_groups) if col < meta.row_group(g).num_columns)
                    n = meta.num_rows
                    if self.label_column:
                        f.seek(0)
                        labels.append(pq.read_table(f, columns=[self.label_column]).column(0))
            except OSError as err:
                raise storage_error(where, err, self.s3_endpoint) from None
            name = path[len(base) + 1:] if path.startswith(base + "/") else posixpath.basename(path)
            file_idx.append(pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([path])))
            rows.append(np.arange(n, dtype=np.int64))
            nbytes.append(np.full(n, max(1, size // max(n, 1)), np.int64))
            locations.append(pc.binary_join_element_wise(  # "part-00001.parquet#17", built in Arrow
                pa.scalar(f"{name}#"), pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string()), ""))
        if not sum(len(loc) for loc in locations):
            raise SourceError(f"{where}: the files hold no rows")
        locations = pa.chunked_array(locations, type=pa.string()).combine_chunks()
        cols = {LOCATION: locations, NBYTES: pa.array(np.concatenate(nbytes)),
                "file": pa.chunked_array(file_idx).cast(pa.string()).combine_chunks(),
                "row": pa.array(np.concatenate(rows))}
        classes = None
        if self.label_column:
            values = pa.chunked_array([c for lab in labels for c in lab.chunks], type=labels[0].type) \
                if len({lab.type for lab in labels}) == 1 else None
            if values is None:
                raise SourceError(f"{where}: label column {self.label_column!r} has different types across files")
            nulls = values.null_count
            if nulls:
                first = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
                raise SourceError(f"{where}: label column {self.label_column!r} has {nulls} null value(s) "
                                  f"(first at {locations[first].as_py()}); every row needs a label, or leave "
                                  f"data.label_column unset for unlabelled training")
            if not (pa.types.is_integer(values.type) or pa.types.is_string(values.type)
                    or pa.types.is_large_string(values.type)):
                raise SourceError(f"{where}: label column {self.label_column!r} has type {values.type}: "
                                  f"labels must be integers or strings")
            raw = values.to_numpy(zero_copy_only=False)
            uniques, index = np.unique(raw, return_inverse=True)
            classes = [str(u) for u in uniques]
            cols[LABEL] = pa.array(index.reshape(-1).astype(np.int64))
        if codec["kind"] == "tensor" and codec["shape"] is None:
            codec = self._list_codec(fs, files[0])
        return Listing(pa.table(cols), classes, codec)

    def _list_codec(self, fs, path: str) -> dict[str, Any]:
        """Shape and dtype of a column of nested variable-size lists, from its first row."""
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            first = pq.ParquetFile(f).read_row_group(0, columns=[self.image_column]).column(0)[0].as_py()
        arr = np.asarray(first)
        try:
            shape, _ = _tensor_layout(arr.shape)
        except ValueError as err:
            raise SourceError(f"parquet:{self.path}: column {self.image_column!r}: {err}") from None
        return {"kind": "tensor", "shape": list(shape), "dtype": "float32" if arr.dtype.kind == "f" else "uint8"}

    def read(self, items) -> ReadResult:
        import pyarrow.parquet as pq

        fs, _ = self.filesystem()
        paths = np.asarray(items.column("file").to_pylist(), dtype=object)
        rows = items.column("row").to_numpy()
        encoded: list[Any] = [b""] * len(rows)
        tensors: list[tuple[np.ndarray, np.ndarray]] = []
        for path in dict.fromkeys(paths.tolist()):  # each file once, in first-seen order
            where = np.flatnonzero(paths == path)
            want = rows[where]
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
                starts = np.concatenate([[0], np.cumsum(sizes)])
                group_of = np.searchsorted(starts, want, side="right") - 1  # row group of each wanted row
                groups = np.unique(group_of)  # read only these row groups
                table = pf.read_row_groups(groups.tolist(), columns=[self.image_column])
            group_start = np.concatenate([[0], np.cumsum(sizes[groups])])[np.searchsorted(groups, group_of)]
            values = self._values(table.column(0).take(group_start + want - starts[group_of]))
            if isinstance(values, np.ndarray):
                tensors.append((where, values))
            else:
                for pos, value in zip(where, values):
                    encoded[pos] = value if value is not None else b""
        if tensors:
            x = np.empty((len(rows), *tensors[0][1].shape[1:]), dtype=tensors[0][1].dtype)
            for where, values in tensors:
                x[where] = values
            return ReadResult(x=x)
        return ReadResult(x=encoded)

    def _values(self, column):
        """Encoded bytes (list) or a ``[n, C, H, W]`` tensor array of one column chunk."""
        import pyarrow as pa

        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        t = column.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return column.to_pylist()
        if isinstance(t, pa.BaseExtensionType) and hasattr(column, "to_numpy_ndarray"):
            arr = column.to_numpy_ndarray()
        elif isinstance(t, pa.BaseExtensionType) and hasattr(column, "to_numpy"):
            arr = np.asarray(column.to_numpy())
        else:
            arr = np.stack([np.asarray(v) for v in column.to_pylist()]) if len(column) else np.zeros((0,))
        shape, transpose = _tensor_layout(arr.shape[1:])
        if transpose is not None:
            arr = arr.transpose(transpose)
        elif arr.ndim == 3:
            arr = arr[:, None]
        if arr.dtype.kind == "f":
            return np.ascontiguousarray(arr, dtype=np.float32)
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"parquet:{self.path}: integer pixels of column {self.image_column!r} must lie "
                                 f"in [0, 255], got [{arr.min()}, {arr.max()}]")
        return np.ascontiguousarray(arr, dtype=np.uint8)


KINDS: tuple[type[Source], ...] = (DigitsPairsSource, DigitsSource, GaussianSource, ImageFolderSource, ParquetSource)
BUILTIN_NAMES = tuple(sorted(k.prefix for k in KINDS if k.exact))


def source_class(spec: str) -> type[Source]:
    """The :class:`Source` subclass a ``data.source`` value names.

    Raises:
        ValueError: naming the allowed forms.
    """
    for kind in KINDS:
        if (kind.exact and spec == kind.prefix) or (not kind.exact and spec.startswith(kind.prefix)):
            if not kind.exact and not spec[len(kind.prefix):].strip():
                raise ValueError(f"{kind.prefix}PATH needs a path, e.g. {kind.prefix}/data/train")
            return kind
    raise ValueError(f"unknown data source, allowed: {', '.join(sorted(BUILTIN_NAMES))}, images:PATH, parquet:PATH "
                     f"(PATH local, file://, s3:// or gs://)")


def make_source(spec: str, **options: Any) -> Source:
    """The source object of a ``data.source`` value; ``options`` as :class:`Source`'s arguments."""
    return source_class(spec)(spec, **options)


# Static facts about the built-in sources (config cross-checks that need no I/O).
SOURCES = {k.prefix: k for k in KINDS if k.exact}
PAIRED = frozenset(k.prefix for k in KINDS if k.exact and k.paired)
NUM_CLASSES = {k.prefix: k.num_classes for k in KINDS if k.exact and k.num_classes}
LABELLED = frozenset(NUM_CLASSES)
GENERATED = frozenset({GaussianSource.prefix})  # sized and seeded by data.num_samples / dim / seed
_SIZES = {"builtin:digits": 1797, "builtin:digits_pairs": 1797}


def check_source(name: str) -> None:
    """Raise ``ValueError`` naming the allowed sources when ``name`` is not one of them."""
    source_class(name)


def load_source(name: str, **params: Any) -> RawData:
    """A built-in source as arrays; ``params`` (``num_samples``, ``dim``, ``seed``) size and seed
    generated ones."""
    kind = source_class(name)
    if not issubclass(kind, _ArraySource):
        raise ValueError(f"load_source reads built-in sources only; {name!r} is read into a SampleStore")
    return kind(name, **params).raw()


def split_indices(num: int, test_fraction: float, seed: int, labels: Optional[np.ndarray] = None):
    """A fixed, seeded train/test split (stratified when labels are known).

    Returns:
        ``(train_idx, test_idx)``: sorted ``int64`` index arrays that partition ``range(num)``.
    """
    n_test = math.ceil(num * test_fraction)
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(num)
        test = order[:n_test]
    else:
        # Stratified: take the same fraction of every class, rounding so the total is n_test.
        classes, counts = np.unique(labels, return_counts=True)
        share = counts * n_test / num
        take = np.floor(share).astype(int)
        take[np.argsort(-(share - take))[: n_test - take.sum()]] += 1
        test = np.concatenate([
            rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)
        ])
    mask = np.zeros(num, dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def train_size(name: str, test_fraction: float, num_samples: Optional[int] = None) -> Optional[int]:
    """Size of the training split when it is known without reading the data, else ``None``."""
    total = num_samples if name in GENERATED else _SIZES.get(name)
    return None if total is None else total - math.ceil(total * test_fraction)


def quiet_image_warnings() -> None:
    """torchvision 0.29 warns that its image decoders are deprecated (pointing at TorchCodec)."""
    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")
