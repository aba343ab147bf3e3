"""Data sources a job can name in ``data.source``, and the fixed held-out split.

Sources are deliberately tiny, pure functions returning numpy arrays; the Ray Data side
(:mod:`pipelines.datasets`) turns them into datasets and a :class:`~pipelines.datasets.SampleStore`.

=========================  ====================================================================
``builtin:digits``         scikit-learn's 1797 8x8 digits; labels used only for evaluation
                           (and as the classes of ``soft_infonce``'s conditional model)
``builtin:digits_pairs``   the same digits as pairs for bimodal training: u = the image,
                           v = its label as a one-hot vector
``generated:gaussian``     ``data.num_samples`` pairs (u, v) in R^d x R^d, jointly Gaussian with
                           identity marginals and a known cross-covariance (seed ``data.seed``)
=========================  ====================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np


@dataclass(frozen=True)
class RawData:
    """A whole source in memory.

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


SOURCES: dict[str, Callable[..., RawData]] = {
    "builtin:digits": _digits,
    "builtin:digits_pairs": _digits_pairs,
    "generated:gaussian": gaussian_pairs,
}
PAIRED = frozenset({"builtin:digits_pairs", "generated:gaussian"})  # sources with a v modality
NUM_CLASSES = {"builtin:digits": 10, "builtin:digits_pairs": 10}  # labelled sources: classes of the labels
LABELLED = frozenset(NUM_CLASSES)
GENERATED = frozenset({"generated:gaussian"})  # sized and seeded by data.num_samples / dim / seed
_SIZES = {"builtin:digits": 1797, "builtin:digits_pairs": 1797}


def check_source(name: str) -> None:
    """Raise ``ValueError`` naming the allowed sources when ``name`` is not one of them."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source, allowed: {', '.join(sorted(SOURCES))}")


def load_source(name: str, **params: Any) -> RawData:
    """Load a source; ``params`` (``num_samples``, ``dim``, ``seed``) size and seed generated ones."""
    check_source(name)
    return SOURCES[name](**params)


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
