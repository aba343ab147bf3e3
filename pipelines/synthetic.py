"""Seeded generated image folders and parquet files, for tests, benchmarks and demos.

    from pipelines.synthetic import image_folder, parquet_images
    image_folder("/tmp/shapes", num_classes=4, per_class={"train": 50, "test": 10}, size=32)
    parquet_images("/tmp/shapes.parquet", num_rows=500, num_classes=4, size=32)

Every image is a pure function of ``(seed, class, index)``: class ``c`` of ``C`` is a sinusoidal
grating at angle ``90 * c / C`` degrees (jittered by a quarter of the gap between classes), and each
image draws its own colours, phase, frequency, position and pixel noise. Only the angle tells the
classes apart, so neither colour nor raw pixels give the class away, while a small CNN learns it
from contrastive training (the angle survives crops and colour jitter, and a horizontal flip maps an
angle in [0, 90) outside that range): a held-out kNN accuracy that rises well above chance shows that
a pipeline learns. Files are written in parallel processes; 10^6 PNGs of 32 x 32 take about a
minute per core.

Layouts (``image_folder``):

============================  =====================================================================
``labelled=True``             ``root[/split]/class_03/class_03_000017.png``: class sub-folders, as
                              torchvision's ``ImageFolder`` reads them
``labelled=False``            ``root[/split]/img_000017.png``: one flat folder, no labels
============================  =====================================================================
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}
MODES = ("RGB", "L", "RGBA", "P", "LA", "CMYK")
_WRITABLE = {"PNG": {"RGB", "L", "RGBA", "P", "LA"}, "JPEG": {"RGB", "L", "CMYK"}, "WEBP": {"RGB", "RGBA"},
             "BMP": {"RGB", "L", "P"}}  # a mode a format cannot hold is written as RGB
Size = Union[int, tuple[int, int]]


@dataclass
class GeneratedSet:
    """What a generator wrote.

    Attributes:
        root: the folder (or parquet file / folder) written.
        files: per split (``""`` when there are no splits), the paths written relative to
            ``root``, in the order an ``ImageFolder`` lists them (sorted).
        labels: per split, the class index of every file (``-1`` when unlabelled), aligned with ``files``.
        classes: the class names (sorted), empty when unlabelled.
        corrupt: paths (relative to ``root``) of the files written as garbage on purpose.
    """

    root: Path
    files: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


def class_name(c: int) -> str:
    return f"class_{c:02d}"


def render(seed: int, label: int, index: int, num_classes: int, height: int, width: int,
           noise: float = 0.15) -> np.ndarray:
    """One image of class ``label``: a coloured grating with per-image phase, frequency and noise.

    A pure function of its arguments. O(height * width).

    Shape:
        returns ``uint8 [height, width, 3]``.
    """
    rng = np.random.default_rng([seed, label, index])
    gap = 0.5 * np.pi / max(num_classes, 1)
    angle = gap * (label + rng.uniform(-0.25, 0.25))
    freq = rng.uniform(2.0, 3.5) / 16.0  # cycles per pixel at 16 px; scaled with the image below
    phase = rng.uniform(0, 2 * np.pi)
    scale = 16.0 / min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) * scale
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + phase)
    hue = rng.uniform(0.0, 1.0)  # colour carries no class information
    colour = np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)], dtype=np.float32)
    img = wave[..., None] * colour[None, None, :] + (1 - wave[..., None]) * (1 - colour[None, None, :]) * 0.3
    img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "png", mode: str = "RGB", quality: int = 90) -> bytes:
    """Encode ``uint8 [H, W, 3]`` pixels as an image file of format ``fmt`` in PIL ``mode``."""
    from PIL import Image

    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    kind = FORMATS[fmt]
    options = {"quality": quality} if kind in ("JPEG", "WEBP") else {"compress_level": 1} if kind == "PNG" else {}
    img.save(buf, format=kind, **options)
    return buf.getvalue()


def _draw_size(rng: np.random.Generator, size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    low, high = size
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


KINDS = ("gratings", "shapes")


def _renderer(kind: str):
    """The image function of a generated set's ``kind``: ``gratings`` (:func:`render`, the default)
    or ``shapes`` (:func:`pipelines.shapes.render_shape`, the benchmark of issue 15)."""
    if kind == "gratings":
        return render
    if kind == "shapes":
        from pipelines.shapes import render_shape

        return render_shape
    raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")


def _item(seed: int, label: int, index: int, num_classes: int, size: Size, formats: Sequence[str],
          modes: Sequence[str], kind: str = "gratings") -> tuple[bytes, str]:
    """Encoded bytes and file extension of one generated image (format and mode drawn per image)."""
    rng = np.random.default_rng([seed, label, index, 1])
    height, width = _draw_size(rng, size)
    fmt = formats[int(rng.integers(len(formats)))]
    mode = modes[int(rng.integers(len(modes)))]
    if mode not in _WRITABLE[FORMATS[fmt]]:
        mode = "RGB"
    return encode(_renderer(kind)(seed, max(label, 0), index, num_classes, height, width), fmt, mode), fmt


def _write_many(jobs: list[tuple]) -> int:
    for path, seed, label, index, num_classes, size, formats, modes, kind in jobs:
        data, _ = _item(seed, label, index, num_classes, size, formats, modes, kind)
        with open(path, "wb") as f:
            f.write(data)
    return len(jobs)


def _run_jobs(jobs: list[tuple], workers: Optional[int]) -> None:
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(jobs) < 2000:
        _write_many(jobs)
        return
    step = max(500, len(jobs) // (workers * 8))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_many, [jobs[i:i + step] for i in range(0, len(jobs), step)]))


def image_folder(root: Union[str, os.PathLike], *, num_classes: int = 4,
                 per_class: Union[int, dict[str, int]] = 20, size: Size = 32,
                 formats: Sequence[str] = ("png",), modes: Sequence[str] = ("RGB",), labelled: bool = True,
                 corrupt: int = 0, seed: int = 0, workers: Optional[int] = None,
                 kind: str = "gratings") -> GeneratedSet:
    """Write a seeded image folder.

    Args:
        root: the folder to create (it may exist; files are overwritten).
        num_classes: classes (class sub-folders ``class_00`` ...; an unlabelled folder still draws
            its images from these classes, it just does not say which).
        per_class: images per class, or ``{split: images per class}`` to write one sub-folder per
            split (``{"train": 50, "test": 10}`` -> ``root/train/...`` and ``root/test/...``).
        size: side of the square images, or ``(low, high)`` to draw height and width per image.
        formats: file formats drawn per image, from ``png, jpg, jpeg, webp, bmp``.
        modes: PIL modes drawn per image, from ``RGB, L, RGBA, P, LA, CMYK`` (a mode the drawn format
            cannot hold, such as CMYK in PNG, is written as RGB).
        labelled: class sub-folders (``True``) or one flat folder (``False``).
        corrupt: number of files per split replaced by garbage bytes (named as ``.png`` images).
        seed: seed of everything drawn.
        workers: processes writing files (default: the cores, at most 8).
        kind: what the images show: ``gratings`` (the module docstring) or ``shapes`` (the benchmark
            of :mod:`pipelines.shapes`, at most 10 classes).

    Returns:
        A :class:`GeneratedSet`. Cost: O(total pixels), written in parallel.
    """
    _renderer(kind)  # an unknown kind fails here, before any file is written
    if kind == "shapes":
        from pipelines.shapes import SHAPES

        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes: {num_classes}: the shapes benchmark has 1 to {len(SHAPES)} classes")
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"formats: {fmt!r} is not one of {', '.join(FORMATS)}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes: {mode!r} is not one of {', '.join(MODES)}")
    root = Path(root)
    splits = per_class if isinstance(per_class, dict) else {"": per_class}
    out = GeneratedSet(root=root, classes=[class_name(c) for c in range(num_classes)] if labelled else [])
    jobs = []
    for split_no, (split, count) in enumerate(splits.items()):
        base = root / split if split else root
        rel_base = f"{split}/" if split else ""
        files, labels = [], []
        for c in range(num_classes):
            folder = base / class_name(c) if labelled else base
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                index = split_no * 10_000_000 + c * count + i  # distinct images across splits
                rng = np.random.default_rng([seed, c, index, 1])
                _draw_size(rng, size)
                fmt = formats[int(rng.integers(len(formats)))]
                stem = f"{class_name(c)}_{i:06d}" if labelled else f"img_{c * count + i:07d}"
                rel = (f"{class_name(c)}/" if labelled else "") + f"{stem}.{fmt}"
                jobs.append((str(base / rel), seed, c, index, num_classes, size, tuple(formats), tuple(modes), kind))
                files.append(rel_base + rel)
                labels.append(c if labelled else -1)
        order = np.argsort(files, kind="stable")
        out.files[split] = [files[i] for i in order]
        out.labels[split] = np.asarray(labels, dtype=np.int64)[order]
    _run_jobs(jobs, workers)
    if corrupt:
        rng = np.random.default_rng([seed, 99])
        for split, files in out.files.items():
            for pos in rng.choice(len(files), size=min(corrupt, len(files)), replace=False):
                path = root / files[pos]
                path.write_bytes(b"this is not an image" + rng.bytes(64))
                out.corrupt.append(files[pos])
    return out


def parquet_images(path: Union[str, os.PathLike], *, num_rows: int = 200, num_classes: int = 4, size: Size = 32,
                   encoding: str = "png", files: int = 1, row_group_size: int = 64,
                   image_column: str = "image", label_column: Optional[str] = "label",
                   label_as: str = "int", null_labels: int = 0, corrupt: int = 0, seed: int = 0) -> GeneratedSet:
    """Write seeded images into parquet: encoded bytes, or a fixed-shape uint8 tensor column.

    Args:
        path: a ``.parquet`` file when ``files == 1``, else a folder of ``part-NNNNN.parquet`` files.
        num_rows: rows in all; row ``i`` has class ``i % num_classes``.
        size: image side, or ``(low, high)`` for mixed sizes (encoded images only).
        encoding: ``png`` or ``jpg`` (a binary column of encoded files), or ``tensor`` (an
            ``arrow.fixed_shape_tensor`` uint8 column of shape ``[H, W, 3]``).
        files, row_group_size: how the rows are split into files and row groups.
        image_column, label_column: column names (``label_column=None``: no label column).
        label_as: ``int`` (class index) or ``str`` (class name) labels.
        null_labels: rows whose label is null (to test the refusal).
        corrupt: rows whose image bytes are garbage.
        seed: seed of everything drawn.

    Returns:
        A :class:`GeneratedSet` whose ``files[""]`` lists ``file#row`` locations in row order.
        Cost: O(total pixels).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if encoding not in ("png", "jpg", "tensor"):
        raise ValueError(f"encoding must be png, jpg or tensor, got {encoding!r}")
    if encoding == "tensor" and not isinstance(size, int):
        raise ValueError("a tensor column has one fixed shape: give an int size")
    path = Path(path)
    labels = np.arange(num_rows) % num_classes
    rng = np.random.default_rng([seed, 7])
    bad = set(rng.choice(num_rows, size=min(corrupt, num_rows), replace=False).tolist()) if corrupt else set()
    null = set(rng.choice(num_rows, size=min(null_labels, num_rows), replace=False).tolist()) if null_labels else set()
    out = GeneratedSet(root=path, classes=[class_name(c) for c in range(num_classes)] if label_column else [])
    targets = [path] if files == 1 else [path / f"part-{k:05d}.parquet" for k in range(files)]
    if files > 1:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, num_rows, files + 1).astype(int)
    locations = []
    for k, target in enumerate(targets):
        rows = range(bounds[k], bounds[k + 1])
        columns: dict[str, pa.Array] = {}
        if encoding == "tensor":
            pixels = np.stack([render(seed, int(labels[i]), i, num_classes, size, size) for i in rows]) \
                if len(rows) else np.zeros((0, size, size, 3), np.uint8)
            columns[image_column] = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels)
        else:
            blobs = []
            for i in rows:
                if i in bad:
                    blobs.append(b"not an image" + rng.bytes(32))
                else:
                    blobs.append(_item(seed, int(labels[i]), i, num_classes, size, (encoding,), ("RGB",))[0])
            columns[image_column] = pa.array(blobs, type=pa.binary())
        if label_column:
            values = [None if i in null else (int(labels[i]) if label_as == "int" else class_name(int(labels[i])))
                      for i in rows]
            columns[label_column] = pa.array(values, type=pa.int64() if label_as == "int" else pa.string())
        pq.write_table(pa.table(columns), target, row_group_size=row_group_size)
        rel = target.name if files > 1 else ""
        locations += [f"{rel}#{i - bounds[k]}" for i in rows]
    out.files[""] = locations
    out.labels[""] = labels.astype(np.int64) if label_column else np.full(num_rows, -1, np.int64)
    out.corrupt = [locations[i] for i in sorted(bad)]
    return out
