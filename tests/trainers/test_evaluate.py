"""Evaluation metrics against hand-computed cases and independent NumPy formulas (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.evaluate import alignment, knn_accuracy, linear_probe_accuracy, uniformity


def _unit(rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


# ----------------------------------------------------------------------------------------------
# kNN


def test_knn_hand_computed_vote():
    # Training points at angles 0, 10, 20 degrees (class 0) and 90, 100 degrees (class 1).
    angles = np.deg2rad([0, 10, 20, 90, 100])
    train = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1))
    labels = torch.tensor([0, 0, 0, 1, 1])
    # Query at 62 degrees: angular distances 28 (class 1), 38 (class 1), 42, 52, 62 (class 0).
    query = _unit([[math.cos(math.radians(62)), math.sin(math.radians(62))]])
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=1) == 1.0
    # k = 3 picks 90, 100 (class 1) and 20 (class 0): class 1 wins on count and on weight.
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.07) == 1.0
    # k = 5 with a huge temperature: every vote weighs ~1, so class 0 (three votes) wins.
    assert knn_accuracy(train, labels, query, torch.tensor([0]), k=5, temperature=1e6) == 1.0
    # k = 5 with a small temperature: the two nearest (class 1) dominate exp(sim / T).
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=5, temperature=0.01) == 1.0


def _knn_reference(train, train_labels, test, test_labels, k, temperature):
    correct = 0
    for x, y in zip(test, test_labels):
        sims = train @ x
        order = np.argsort(-sims)[:k]
        votes = {}
        for i in order:
            votes[train_labels[i]] = votes.get(train_labels[i], 0.0) + math.exp(sims[i] / temperature)
        correct += max(votes, key=votes.get) == y
    return correct / len(test)


@pytest.mark.parametrize("k", [1, 20, 200])
def test_knn_matches_loop_reference(k):
    rng = np.random.default_rng(k)
    centers = rng.normal(size=(4, 8))
    train_y, test_y = rng.integers(0, 4, 300), rng.integers(0, 4, 50)
    train = centers[train_y] + rng.normal(scale=1.0, size=(300, 8))
    test = centers[test_y] + rng.normal(scale=1.0, size=(50, 8))
    train, test = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (train, test))
    expected = _knn_reference(train, train_y, test, test_y, k, 0.07)
    got = knn_accuracy(torch.tensor(train), torch.tensor(train_y), torch.tensor(test), torch.tensor(test_y),
                       k=k, temperature=0.07)
    # float64 cosines (~1e-15 apart in torch and numpy) vs this data's smallest gap at the k-th
    # neighbour (2e-6) and smallest vote margin (10 %): the same neighbours and votes on any CPU
    assert got == pytest.approx(expected)
    assert expected > 0.4  # the clusters are separable enough for the check to mean something


# ----------------------------------------------------------------------------------------------
# alignment and uniformity


def test_alignment_closed_forms():
    z = _unit([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert alignment(z, z) == 0.0
    assert alignment(z, -z) == pytest.approx(4.0)  # antipodal pairs: ||2z||^2
    orthogonal = _unit([[0.0, 1.0], [-1.0, 0.0], [-0.8, 0.6]])
    assert alignment(z, orthogonal) == pytest.approx(2.0)
    assert alignment(z, orthogonal, alpha=1.0) == pytest.approx(math.sqrt(2.0))


def test_uniformity_closed_forms():
    # Two antipodal points: one pair at squared distance 4 -> log exp(-2 * 4) = -8.
    assert uniformity(_unit([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    # All points identical: every pair at distance 0 -> log 1 = 0 (the worst value).
    assert uniformity(_unit([[1.0, 1.0]] * 5)) == pytest.approx(0.0)
    # Square on the unit circle: 4 sides at d^2 = 2, 2 diagonals at d^2 = 4.
    square = _unit([[1, 0], [0, 1], [-1, 0], [0, -1]])
    expected = math.log((4 * math.exp(-4.0) + 2 * math.exp(-8.0)) / 6)
    assert uniformity(square) == pytest.approx(expected)


def test_uniformity_matches_numpy_and_prefers_spread_points():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 16))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sq = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    iu = np.triu_indices(64, k=1)
    expected = np.log(np.mean(np.exp(-2.0 * sq[iu])))
    # float64 squared distances <= 4 (2016 pairs): ~1e-14 apart however formed, far below rel 1e-9
    assert uniformity(torch.tensor(z)) == pytest.approx(expected, rel=1e-9)
    clumped = z * 0.05 + np.array([1.0] + [0.0] * 15)
    clumped /= np.linalg.norm(clumped, axis=1, keepdims=True)
    assert uniformity(torch.tensor(clumped)) > uniformity(torch.tensor(z))


# ----------------------------------------------------------------------------------------------
# linear probe


def test_linear_probe_separable_and_random_labels():
    rng = np.random.default_rng(1)
    centers = rng.normal(scale=3.0, size=(5, 12))
    train_y, test_y = rng.integers(0, 5, 400), rng.integers(0, 5, 100)
    train = torch.tensor(centers[train_y] + rng.normal(size=(400, 12)))
    test = torch.tensor(centers[test_y] + rng.normal(size=(100, 12)))
    assert linear_probe_accuracy(train, torch.tensor(train_y), test, torch.tensor(test_y)) > 0.95
    # Labels independent of the features: the probe cannot beat chance (0.2) by much.
    shuffled = torch.tensor(rng.integers(0, 5, 100))
    assert linear_probe_accuracy(train, torch.tensor(train_y), test, shuffled) < 0.45


def test_linear_probe_needs_a_linear_boundary_only():
    # XOR-like labels are not linearly separable; a probe must stay near chance on them.
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(600, 2))
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)
    acc = linear_probe_accuracy(torch.tensor(x[:400]), torch.tensor(y[:400]), torch.tensor(x[400:]),
                                torch.tensor(y[400:]))
    assert acc < 0.7


def test_expected_calibration_error_hand_example():
    from trainers.evaluate import expected_calibration_error

    # 4 samples, top probabilities 0.95, 0.95 (bin 15), 0.55 (bin 9), 0.3 (bin 5); 15 equal bins.
    # (the last row is not normalised on purpose: ECE only reads the top probability)
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.3, 0.2]])
    labels = torch.tensor([0, 1, 1, 1])
    # bin 15: accuracy 1/2, confidence 0.95 -> 2/4 * 0.45; bin 9: accuracy 1, confidence 0.55 ->
    # 1/4 * 0.45; bin 5: prediction 0, wrong, confidence 0.3 -> 1/4 * 0.3.
    expected = 0.5 * 0.45 + 0.25 * 0.45 + 0.25 * 0.3
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(expected)


def test_expected_calibration_error_limits():
    from trainers.evaluate import expected_calibration_error

    labels = torch.arange(5)
    assert expected_calibration_error(torch.eye(5), labels) == pytest.approx(0.0)  # sure and right
    wrong = torch.eye(5).roll(1, dims=1)
    assert expected_calibration_error(wrong, labels) == pytest.approx(1.0)  # sure and wrong
    # a calibrated forecaster: confidence 0.6, right 60 % of the time, all in one bin
    probs = torch.tensor([[0.6, 0.4]] * 10, dtype=torch.float64)
    hits = torch.tensor([0] * 6 + [1] * 4)
    # |mean of ten 0.6 - 6 / 10| in float64: an ulp or two of 0.6
    assert expected_calibration_error(probs, hits) == pytest.approx(0.0, abs=1e-12)


def test_retrieval_accuracy_counts_equal_candidates_as_hits():
    from trainers.evaluate import retrieval_accuracy

    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # query 0 retrieves candidate 2, which equals its true partner (candidate 0): a hit;
    # query 1 retrieves candidate 0 (wrong key); query 2 retrieves candidate 2: a hit.
    scores = torch.tensor([[0.0, 0.1, 0.9], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_accuracy(scores, keys, keys) == pytest.approx(2 / 3)
    distinct = torch.eye(3)
    assert retrieval_accuracy(scores, distinct, distinct) == pytest.approx(1 / 3)  # index match only
