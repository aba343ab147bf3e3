"""The fixed held-out split and random access by id (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.datasets import SampleStore
from pipelines.sources import load_source, split_indices, train_size


def test_digits_source_shapes_and_range():
    raw = load_source("builtin:digits")
    assert raw.x.shape == (1797, 1, 8, 8) and raw.x.dtype == np.float32
    assert 0.0 <= raw.x.min() and raw.x.max() <= 1.0
    assert set(np.unique(raw.labels)) == set(range(10))


def test_split_is_a_fixed_stratified_partition():
    labels = load_source("builtin:digits").labels
    train, test = split_indices(len(labels), 0.2, seed=0, labels=labels)
    assert len(train) == train_size("builtin:digits", 0.2) and len(test) == 1797 - len(train)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    again, _ = split_indices(len(labels), 0.2, seed=0, labels=labels)
    assert np.array_equal(train, again)
    other, _ = split_indices(len(labels), 0.2, seed=1, labels=labels)
    assert not np.array_equal(train, other)
    # stratified: every class keeps its share of the test split within one sample
    full = np.bincount(labels) * len(test) / len(labels)
    assert np.all(np.abs(np.bincount(labels[test], minlength=10) - full) < 1.0 + 1e-9)


def test_unstratified_split_without_labels():
    train, test = split_indices(100, 0.25, seed=3)
    assert len(test) == 25 and len(np.union1d(train, test)) == 100


def test_store_take_is_random_access_by_id():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    store = SampleStore.in_memory(x=x, label=np.arange(10) % 3)
    ids = np.array([7, 0, 7, 3])
    assert np.array_equal(store.take(ids), x[ids])
    assert np.array_equal(store.take(ids, "label"), (np.arange(10) % 3)[ids])
    assert store.has_labels and store.size == 10
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        store.take(np.array([10]))
    with pytest.raises(KeyError, match="no column"):
        store.column("embedding")


def test_store_rejects_ragged_columns():
    with pytest.raises(ValueError, match="one length"):
        SampleStore.in_memory(x=np.zeros((3, 2)), label=np.zeros(4))
