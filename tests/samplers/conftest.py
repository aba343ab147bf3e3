"""Fixtures shared by the sampler tests (numerical core only: no Ray, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits


def _two_clusters(n_per: int = 500, dim: int = 8, noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = np.zeros(dim)
    centre[0] = 1.0
    x = np.concatenate([centre + noise * rng.normal(size=(n_per, dim)), -centre + noise * rng.normal(size=(n_per, dim))])
    return x.astype(np.float32), np.repeat([0, 1], n_per)


@pytest.fixture(scope="session")
def two_clusters() -> tuple[np.ndarray, np.ndarray]:
    """500 points each around +e1 and -e1 in D = 8, noise 0.05: (embeddings, cluster labels)."""
    return _two_clusters()


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits: centred raw pixels (the graph build normalises them) and labels."""
    x, y = load_digits(return_X_y=True)
    return (x - x.mean(axis=0)).astype(np.float32), y


@pytest.fixture(scope="session")
def random_bank() -> np.ndarray:
    """A 600 x 16 Gaussian embedding bank."""
    return np.random.default_rng(123).normal(size=(600, 16)).astype(np.float32)
