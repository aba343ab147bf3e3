"""Evaluation of representations on a labelled held-out split.

Labels are used here and nowhere in training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def embed(model: nn.Module, x: np.ndarray, batch_size: int = 1024, projected: bool = False) -> torch.Tensor:
    """L2-normalised encoder outputs (or projector outputs) of ``x`` in eval mode.

    Shape:
        x: ``[N, C, H, W]`` -> ``[N, D]``.
    """
    was_training = model.training
    model.eval()
    try:
        outs = []
        for start in range(0, len(x), batch_size):
            h, z = model(torch.tensor(x[start:start + batch_size]))  # a copy: store arrays are read-only
            outs.append(z if projected else h)
        return F.normalize(torch.cat(outs), dim=1)
    finally:
        model.train(was_training)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted kNN classification accuracy with cosine similarity (the InstDisc monitor).

    Each of the ``k`` nearest training samples votes for its class with weight ``exp(sim / T)``.
    Features must be L2-normalised. Cost: O(N_test * N_train * D).

    Shape:
        train_feats: ``[N, D]``; train_labels: ``[N]``; test_feats: ``[M, D]``; test_labels: ``[M]``.
    """
    k = min(k, len(train_feats))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    sims = test_feats @ train_feats.T
    top_sim, top_idx = sims.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    votes = torch.zeros(len(test_feats), num_classes, dtype=weights.dtype)
    votes.scatter_add_(1, train_labels[top_idx], weights)
    return (votes.argmax(1) == test_labels).double().mean().item()
