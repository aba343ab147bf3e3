"""Decoding and the parallel, prefetched feed of a train worker.

One step of a worker, as the loop sees it: ``batch = feed.next(step)``. Behind it:

1. the sampler client gives this rank's ids of steps ``step .. step + depth - 1`` (requested ahead);
2. for each, the worker process gathers the stored bytes of those ids from the SampleStore (zero-copy
   views of shards mapped from the object store or from disk: O(batch) memory traffic) and
3. hands them to a pool of ``workers`` forked processes, which decode (torchvision.io, PIL for the
   formats it lacks), resize to the store's side, augment per sample (:mod:`trainers.augment`) and
   collate; tensors come back through shared memory, uint8 where the preset keeps uint8.

So decoding and augmentation of the next ``depth`` batches overlap the current forward/backward
pass; ``train/data_wait_s`` is the time a step still waits. Views are a pure function of
``(train.seed, rank, step)``: every batch seeds its own generator, whatever the number of workers,
so a resumed run replays exactly the same views.

A sample that cannot be decoded (a corrupt or vanished file) is *replaced*: by the next sample of
the same batch that decodes (cyclically), or zeros if none does. The feed counts it
(``data/skipped``) and names its file once in the log; the run goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from trainers.augment import CROP_MIN, build_augment

warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")


# ----------------------------------------------------------------------------------------------
# decoding


def _decode_image(data: bytes | memoryview) -> torch.Tensor:
    """One encoded image -> ``uint8 [3, H, W]`` RGB (any mode, 16-bit and palette images included).

    Raises:
        ValueError: when neither torchvision nor PIL can decode the bytes.
    """
    from torchvision.io import ImageReadMode, decode_image

    if len(data) == 0:
        raise ValueError("empty file")
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if img.dtype == torch.uint8:
            return img
    except RuntimeError:
        pass  # a format torchvision does not decode (bmp), or a damaged file: PIL decides
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as pil:
            arr = np.asarray(pil.convert("RGB"))
    except Exception as err:  # PIL raises many kinds for damaged files
        text = str(err).split(" <_io.BytesIO")[0]  # no object addresses in log lines
        raise ValueError(f"not a decodable image ({type(err).__name__}: {text})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def fit_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased) and crop the centre square.

    Shape:
        img: ``[C, H, W]`` -> ``[C, size, size]``.
    """
    from torchvision.transforms.v2 import functional as TF

    if img.shape[-2:] == (size, size):
        return img
    if min(img.shape[-2:]) != size:
        img = TF.resize(img, size, antialias=True)
    return TF.center_crop(img, [size, size])


def decode_tensors(raws: list, codec: dict[str, Any]) -> np.ndarray:
    """Stored tensor rows -> ``[B, *shape]`` in the codec's dtype. O(B).

    Raises:
        ValueError: a row whose size does not match the shape.
    """
    dtype = np.dtype(codec["dtype"])
    shape = tuple(codec["shape"])
    out = np.empty((len(raws), *shape), dtype=dtype)
    for i, raw in enumerate(raws):
        out[i] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return out


def decode_batch(raws: list, codec: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Decode stored samples into one batch, replacing the ones that fail.

    A sample that fails to decode is replaced by the next sample of the batch that decodes
    (cyclically), or by zeros when none does: deterministic for a given batch.

    Args:
        raws: stored bytes of each sample (see :meth:`pipelines.store.SampleStore.raw`).
        codec: ``{"kind": "image", "size": S}`` or ``{"kind": "tensor", "shape": [...], "dtype": ...}``.

    Returns:
        ``(batch, failures)``: ``uint8 [B, 3, S, S]`` for images, ``[B, *shape]`` (uint8 or float32)
        for tensors; ``failures`` lists ``(position, reason)`` of the replaced samples.
        Cost: O(B) decodes.
    """
    items: list[Optional[torch.Tensor]] = []
    failures: list[tuple[int, str]] = []
    if codec["kind"] == "image":
        size = int(codec["size"])
        for i, raw in enumerate(raws):
            try:
                items.append(fit_square(_decode_image(raw), size))
            except ValueError as err:
                items.append(None)
                failures.append((i, str(err)[:200]))
        shape, dtype = (3, size, size), torch.uint8
    else:
        shape, dtype = tuple(codec["shape"]), torch.uint8 if codec["dtype"] == "uint8" else torch.float32
        np_dtype = np.dtype(codec["dtype"])
        want = int(np.prod(shape)) * np_dtype.itemsize
        for i, raw in enumerate(raws):
            if len(raw) != want:
                items.append(None)
                failures.append((i, f"stored sample has {len(raw)} bytes, expected {want}"))
            else:
                items.append(torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()))
    good = [i for i, item in enumerate(items) if item is not None]
    for i, _ in failures:
        later = [j for j in good if j > i] or good
        items[i] = items[later[0]].clone() if later else torch.zeros(shape, dtype=dtype)
    return (torch.stack(items) if items else torch.zeros((0, *shape), dtype=dtype)), failures


# ----------------------------------------------------------------------------------------------
# batches


def batch_seed(seed: int, rank: int, step: int, salt: int = 0x5EED) -> int:
    """The seed of the views of one batch: a pure function of ``(train.seed, rank, step)``; another
    ``salt`` gives another stream of the same step (:func:`step_seed`)."""
    return int(np.random.SeedSequence([seed, rank, step, salt]).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of torch's global generator for one training step (mixup weights, SSCL's synthetic
    negatives): a pure function of ``(train.seed, rank, step)``, so a resumed run replays a step's
    draws exactly as the uninterrupted run made them, with no generator state to checkpoint."""
    return batch_seed(seed, rank, step, salt=0x57E9)


@dataclass
class BatchMaker:
    """What a task's batch is made of, as a small picklable recipe (it travels to feed processes).

    Attributes:
        codec: the store's codec of ``x``; v_codec: of ``v`` (paired data), else ``None``.
        views: augmented views of ``x`` per sample (2: Siamese, 1: classifier and bimodal u side).
        augment: ``{"preset", "size", "channels", "blur", "crop_min"}``, or ``None`` (vectors: no augmentation).
        labels, pairs: whether the batch carries the labels / the ``v`` side.
    """

    codec: dict[str, Any]
    v_codec: Optional[dict[str, Any]] = None
    views: int = 2
    augment: Optional[dict[str, Any]] = None
    labels: bool = False
    pairs: bool = False

    def gather(self, store, ids: np.ndarray) -> dict[str, Any]:
        """The stored inputs of one batch (runs in the train process: memory slicing only). O(B)."""
        job: dict[str, Any] = {"ids": np.asarray(ids), "x": [bytes(r) for r in store.raw(ids)]}
        if self.labels:
            job["label"] = store.take(ids, "label")
        if self.pairs:
            job["v"] = [bytes(r) for r in store.raw(ids, "v")]
        return job

    def build(self, job: dict[str, Any], seed: int) -> dict[str, Any]:
        """Decode, augment and collate one batch (runs in a feed process, or inline). O(B).

        Returns:
            ``{"views": [uint8|float32 [B, C, S, S]] * views, "failures": [(position, reason)]}``
            plus ``label`` (int64 [B]) and ``v`` (float32 [B, d]) when asked for.
        """
        x, failures = decode_batch(job["x"], self.codec)
        torch.manual_seed(seed)
        if self.augment is None:
            views = [x] * self.views
        else:
            transform = _transform(self.augment)
            views = [torch.stack([transform(sample) for sample in x]) for _ in range(self.views)]
        out: dict[str, Any] = {"views": views, "failures": failures}
        if self.labels:
            out["label"] = torch.from_numpy(np.asarray(job["label"], dtype=np.int64))
        if self.pairs:
            out["v"] = torch.from_numpy(decode_tensors(job["v"], self.v_codec))
        return out

    def make(self, store, ids: np.ndarray, seed: int) -> dict[str, Any]:
        """:meth:`gather` then :meth:`build` in this process, leaving torch's global generator as it was."""
        with torch.random.fork_rng(devices=[]):
            return self.build(self.gather(store, ids), seed)


_TRANSFORMS: dict[tuple, Any] = {}


def _transform(augment: dict[str, Any]):
    key = tuple(sorted(augment.items()))
    if key not in _TRANSFORMS:
        size = augment["size"]
        size = int(size) if isinstance(size, (int, np.integer)) else tuple(int(d) for d in size)
        _TRANSFORMS[key] = build_augment(augment["preset"], size, int(augment.get("channels", 3)),
                                         bool(augment.get("blur", False)),
                                         float(augment.get("crop_min", CROP_MIN)))
    return _TRANSFORMS[key]


def _worker_init(parent: int) -> None:
    """Set up a forked feed process: one torch thread, and death with its train worker.

    A forked child inherits the worker's sockets to Ray; if it outlived a crashed worker, Ray would
    not see the worker's connection close and would notice the death only minutes later (a worker
    failure took 10 minutes instead of 2 in an end-to-end test). So on Linux the
    child asks the kernel for SIGKILL when its parent goes (``PR_SET_PDEATHSIG``).
    """
    torch.set_num_threads(1)  # one process per core; torch's own pool would oversubscribe
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the worker died before the request took effect
            os._exit(0)


def _build(maker: BatchMaker, job: dict[str, Any], seed: int) -> dict[str, Any]:
    return maker.build(job, seed)


class Feed:
    """The prefetched, parallel batch feed of one train worker; see the module docstring.

    Args:
        store: the training SampleStore.
        maker: the task's :class:`BatchMaker`.
        plans: ``plans(step, horizon) -> (ids, graph_version)`` (the sampler client's ``get``).
        workers: feed processes (0: build each batch in this process when it is asked for, no overlap).
        depth: batches requested ahead of the step being trained.
        seed, rank: the views of step ``s`` are seeded by ``batch_seed(seed, rank, s)``.
        say: where a line naming a replaced sample goes (the worker's log).
    """

    def __init__(self, store, maker: BatchMaker, plans: Callable[[int, Optional[int]], tuple[np.ndarray, int]],
                 workers: int = 1, depth: int = 4, seed: int = 0, rank: int = 0,
                 say: Callable[[str], None] = print):
        self.store, self.maker, self.plans = store, maker, plans
        self.workers, self.depth = int(workers), max(1, int(depth))
        self.seed, self.rank, self.say = seed, rank, say
        self.skipped = 0
        self._named: set[int] = set()
        self._pending: dict[int, tuple[Any, np.ndarray, int]] = {}
        self._next: Optional[int] = None  # the next step to request
        self._pool: Optional[ProcessPoolExecutor] = None
        if self.workers > 0:
            import torch.multiprocessing  # noqa: F401  (tensors come back through shared memory)

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_worker_init, initargs=(os.getpid(),))

    def _submit(self, step: int, horizon: Optional[int]) -> None:
        ids, version = self.plans(step, horizon)
        job = self.maker.gather(self.store, ids)
        seed = batch_seed(self.seed, self.rank, step)
        if self._pool is None:
            self._pending[step] = (job, np.asarray(ids), version)
        else:
            self._pending[step] = (self._pool.submit(_build, self.maker, job, seed), np.asarray(ids), version)

    def next(self, step: int, horizon: Optional[int] = None, end: Optional[int] = None) -> tuple[dict[str, Any], int]:
        """This rank's batch of ``step`` and the graph version its plan came from.

        Requests steps ahead up to ``depth``, never at or past ``horizon`` (a synchronous refresh
        boundary) or ``end`` (the last step + 1).
        """
        if step not in self._pending and step != self._next:  # a jump (resume, tests): start afresh
            self._pending.clear()
            self._next = step
        limit = step + self.depth
        for bound in (horizon, end):
            if bound is not None:
                limit = min(limit, bound)
        limit = max(limit, step + 1)
        while self._next < limit:
            self._submit(self._next, horizon)
            self._next += 1
        work, ids, version = self._pending.pop(step)
        if isinstance(work, Future):
            batch = work.result()
        else:
            with torch.random.fork_rng(devices=[]):
                batch = self.maker.build(work, batch_seed(self.seed, self.rank, step))
        self._report(ids, batch.pop("failures"))
        return batch, version

    def _report(self, ids: np.ndarray, failures: list[tuple[int, str]]) -> None:
        for position, reason in failures:
            self.skipped += 1
            idx = int(ids[position])
            if idx not in self._named:
                self._named.add(idx)
                self.say(f"data: skipped sample {idx} ({self.store.name(idx)}): {reason}; replaced by another "
                         f"sample of its batch (data/skipped counts every time)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def default_workers(cpus_per_worker: float) -> int:
    """Feed processes per train worker when ``data.feed_workers`` is not set: one per whole CPU the
    worker holds beyond the one training uses, at least one."""
    return max(1, int(cpus_per_worker) - 1)
