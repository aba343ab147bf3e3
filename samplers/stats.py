"""Batch statistics: how hard the negatives of sampled batches are.

For one batch of ids with unit-normalised embeddings e, the *hardness* is the mean cosine
e_i . e_j over the distinct pairs i < j of the batch (every other instance is a negative of the
anchor in instance discrimination), and ``hardness_max`` averages, over the anchors, the cosine
of the anchor's hardest (most similar) negative. With labels, ``same_class_rate`` is the
fraction of distinct pairs that share a label (likely false negatives). Every statistic is
computed per batch and averaged over batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from samplers.graph import normalize_rows

_MAX_GRAM_ELEMENTS = 1 << 24  # Gram-matrix entries computed at once


def _as_batches(plan_or_batches: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    """int64 [n, B] when all batches have the same size, else a list of 1-D arrays.

    A 3-D array [S, W, b] (plans of S steps) gives S batches of W * b ids (the global batch); a
    2-D array gives one batch per row (so a single plan [W, b] gives W per-rank batches; pass
    ``[plan]`` to score it as one global batch); a list gives one batch per entry, flattened.
    """
    if isinstance(plan_or_batches, np.ndarray):
        arr = plan_or_batches
        if arr.ndim == 3:
            arr = arr.reshape(arr.shape[0], -1)
        elif arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"plan_or_batches must be 1-D, 2-D or 3-D, got shape {arr.shape}")
        return arr.astype(np.int64, copy=False)
    batches = [np.asarray(b, dtype=np.int64).reshape(-1) for b in plan_or_batches]
    if batches and len({b.size for b in batches}) == 1:
        return np.stack(batches)
    return batches


def batch_stats(
    plan_or_batches: np.ndarray | Sequence[np.ndarray],
    embeddings: np.ndarray,
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Hardness (and same-class rate) of batches.

    Args:
        plan_or_batches: int [n, B] batches (one per row), int [S, W, b] plans (one global batch
            per step), or a sequence of id arrays (one batch each, sizes may differ).
        embeddings: float [N, d] (normalised inside; zero rows have cosine 0).
        labels: optional [N] labels of any dtype.

    Returns:
        Dict with ``hardness`` (mean pairwise cosine), ``hardness_max`` (mean over anchors of the
        hardest negative's cosine), ``num_batches``, and with labels ``same_class_rate``.

    Raises:
        ValueError: on empty input or batches with fewer than 2 ids.

    Complexity: O(n B^2 d) time, Gram matrices computed in chunks of <= 2**24 entries.
    """
    batches = _as_batches(plan_or_batches)
    if len(batches) == 0:
        raise ValueError("plan_or_batches must contain at least one batch")
    emb = normalize_rows(embeddings)
    label_ids = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] != emb.shape[0]:
            raise ValueError(f"labels must have one entry per embedding row ({emb.shape[0]}), got {labels.shape}")
        label_ids = np.unique(labels, return_inverse=True)[1].reshape(-1)
    if isinstance(batches, np.ndarray):
        hard, hard_max, same = _stats_equal(batches, emb, label_ids)
    else:
        parts = [_stats_equal(b[None], emb, label_ids) for b in batches]
        hard, hard_max = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        same = None if label_ids is None else np.concatenate([p[2] for p in parts])
    out = {"hardness": float(hard.mean()), "hardness_max": float(hard_max.mean()), "num_batches": len(hard)}
    if same is not None:
        out["same_class_rate"] = float(same.mean())
    return out


def _stats_equal(
    batches: np.ndarray, emb: np.ndarray, label_ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-batch hardness, hardest-negative mean and same-class rate of [n, B] batches."""
    n, size = batches.shape
    if size < 2:
        raise ValueError(f"batches must hold at least 2 ids to have pairs, got batch size {size}")
    pairs = size * (size - 1) / 2
    chunk = max(1, _MAX_GRAM_ELEMENTS // (size * size))
    hard = np.empty(n)
    hard_max = np.empty(n)
    diag = np.eye(size, dtype=bool)
    for lo in range(0, n, chunk):
        x = emb[batches[lo : lo + chunk]]
        gram = np.matmul(x, x.transpose(0, 2, 1))
        hard[lo : lo + chunk] = (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (2 * pairs)
        gram[:, diag] = -np.inf
        hard_max[lo : lo + chunk] = gram.max(axis=2).mean(axis=1)
    same = None
    if label_ids is not None:
        n_labels = int(label_ids.max()) + 1
        flat = np.arange(n)[:, None] * n_labels + label_ids[batches]
        counts = np.bincount(flat.ravel(), minlength=n * n_labels).reshape(n, n_labels)
        same = (counts * (counts - 1) / 2).sum(axis=1) / pairs
    return hard, hard_max, same
