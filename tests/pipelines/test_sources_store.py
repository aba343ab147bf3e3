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


def test_declared_class_counts_match_the_labels():
    from pipelines.sources import LABELLED, NUM_CLASSES

    for name in LABELLED:  # config validation checks soft_infonce's noise against these counts
        assert int(load_source(name).labels.max()) + 1 == NUM_CLASSES[name], name


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


def test_digits_pairs_carry_the_label_as_a_one_hot_v():
    pairs, digits = load_source("builtin:digits_pairs"), load_source("builtin:digits")
    assert np.array_equal(pairs.x, digits.x) and pairs.paired and not digits.paired
    assert pairs.v.shape == (1797, 10) and pairs.v.dtype == np.float32
    assert np.array_equal(pairs.v.argmax(1), pairs.labels) and np.all(pairs.v.sum(1) == 1.0)


def test_gaussian_pairs_have_the_stated_cross_covariance():
    from pipelines.sources import canonical_correlations, gaussian_pairs

    raw = gaussian_pairs(num_samples=200_000, dim=4, seed=3)
    cross, rho = raw.meta["cross_covariance"], raw.meta["canonical_correlations"]
    # a few float64 operations per value: ~1e-16 relative (assert_allclose's rtol is 1e-7)
    np.testing.assert_allclose(rho, [0.9, 0.675, 0.45, 0.225])
    np.testing.assert_allclose(rho, canonical_correlations(4))
    u, v = raw.x.astype(np.float64), raw.v.astype(np.float64)
    joint = np.cov(np.hstack([u, v]).T)
    # identity marginals and the stated cross block, to sampling error (~ 1 / sqrt(N) = 0.002)
    np.testing.assert_allclose(joint[:4, :4], np.eye(4), atol=0.01)
    np.testing.assert_allclose(joint[4:, 4:], np.eye(4), atol=0.01)
    np.testing.assert_allclose(joint[:4, 4:], cross, atol=0.01)
    # the singular values of the cross-covariance (identity marginals: the coherence) are the rho;
    # a backward-stable SVD of a 4 x 4 product of rotations is off by a few eps ||C|| ~ 1e-15
    np.testing.assert_allclose(np.linalg.svd(cross, compute_uv=False), rho, atol=1e-12)
    again = gaussian_pairs(num_samples=10, dim=4, seed=3)
    assert np.array_equal(again.x, gaussian_pairs(num_samples=10, dim=4, seed=3).x)
    assert not np.array_equal(again.x, gaussian_pairs(num_samples=10, dim=4, seed=4).x)


def test_generated_sources_are_sized_by_their_parameters():
    assert load_source("generated:gaussian", num_samples=50, dim=3, seed=0).x.shape == (50, 3)
    assert train_size("generated:gaussian", 0.2, num_samples=50) == 40
    assert train_size("builtin:digits_pairs", 0.2) == train_size("builtin:digits", 0.2)
