"""Data sources a job can name in ``data.source``, and the fixed held-out split.

Sources are deliberately tiny, pure functions returning numpy arrays; the Ray Data side
(:mod:`pipelines.datasets`) turns them into datasets and a :class:`~pipelines.datasets.SampleStore`.
Labels, where a source has them, are used only for evaluation and batch statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class RawData:
    """A whole source in memory.

    Attributes:
        x: samples, ``float32 [N, C, H, W]`` for images.
        labels: ``int64 [N]`` class ids used only for evaluation, or ``None``.
    """

    x: np.ndarray
    labels: Optional[np.ndarray]


def _digits() -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # [1797, 1, 8, 8] in [0, 1]
    return RawData(x=x, labels=bunch.target.astype(np.int64))


SOURCES: dict[str, Callable[[], RawData]] = {"builtin:digits": _digits}
_SIZES = {"builtin:digits": 1797}


def check_source(name: str) -> None:
    """Raise ``ValueError`` naming the allowed sources when ``name`` is not one of them."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source, allowed: {', '.join(sorted(SOURCES))}")


def load_source(name: str) -> RawData:
    check_source(name)
    return SOURCES[name]()


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


def train_size(name: str, test_fraction: float) -> Optional[int]:
    """Size of the training split when it is known without reading the data, else ``None``."""
    total = _SIZES.get(name)
    return None if total is None else total - math.ceil(total * test_fraction)
