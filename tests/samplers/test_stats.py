"""Tests of samplers.stats.batch_stats against closed forms and a naive loop."""

from __future__ import annotations

import numpy as np
import pytest

from samplers.stats import batch_stats


def naive(batches, emb, labels):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    hard, hard_max, same = [], [], []
    for batch in batches:
        batch = np.asarray(batch).ravel()
        cos = [e[a] @ e[b] for i, a in enumerate(batch) for b in batch[i + 1 :]]
        hard.append(np.mean(cos))
        hard_max.append(np.mean([max(e[a] @ e[b] for b in batch if b != a) for a in batch]))
        same.append(np.mean([labels[a] == labels[b] for i, a in enumerate(batch) for b in batch[i + 1 :]]))
    return np.mean(hard), np.mean(hard_max), np.mean(same)


def test_closed_forms():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    labels = np.array(["a", "a", "b", "c"])
    out = batch_stats(np.array([[0, 1], [2, 3], [0, 2]]), emb, labels)
    assert out["hardness"] == pytest.approx(2 / 3)
    assert out["hardness_max"] == pytest.approx(2 / 3)
    assert out["same_class_rate"] == pytest.approx(1 / 3)
    assert out["num_batches"] == 3
    assert "same_class_rate" not in batch_stats(np.array([[0, 1]]), emb)


def test_matches_naive_loop_for_plans_lists_and_ragged_batches():
    rng = np.random.default_rng(0)
    d = 5
    emb = rng.normal(size=(200, d))
    labels = rng.integers(0, 4, size=200)
    # batch_stats works in float32: each cosine is off by <= (d + 2) eps32 / 2 and summing B^2 of them
    # (pairwise) adds ~log2(B^2) eps32; absolute, since the mean cosine of random rows is near 0
    atol = (d + 2 + 2 * np.log2(24)) * np.finfo(np.float32).eps
    plans = np.stack([rng.permutation(200)[:24].reshape(3, 8) for _ in range(6)])
    out = batch_stats(plans, emb, labels)
    np.testing.assert_allclose(
        [out["hardness"], out["hardness_max"], out["same_class_rate"]], naive(plans, emb, labels), rtol=0, atol=atol
    )
    assert out["num_batches"] == 6
    ragged = [rng.permutation(200)[:size] for size in (5, 9, 17)]
    out = batch_stats(ragged, emb, labels)
    np.testing.assert_allclose(
        [out["hardness"], out["hardness_max"], out["same_class_rate"]], naive(ragged, emb, labels), rtol=0, atol=atol
    )


def test_invalid_inputs():
    emb = np.eye(3)
    with pytest.raises(ValueError, match="at least 2"):
        batch_stats(np.array([[0], [1]]), emb)
    with pytest.raises(ValueError, match="labels"):
        batch_stats(np.array([[0, 1]]), emb, labels=np.zeros(2))
