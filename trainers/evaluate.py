"""Evaluation of representations on a held-out split: kNN, linear probe, alignment and uniformity.

Labels are used here and nowhere in training. Everything that grows with the data runs in chunks:
embeddings are computed ``batch_size`` samples at a time from a SampleStore (decoded with the
evaluation-time transform), the kNN monitor keeps a running top-k over chunks of the bank (never the
dense test x train similarity matrix), and uniformity sums its pairs block by block.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def embed(model: nn.Module, x: np.ndarray, batch_size: int = 1024, projected: bool = False,
          normalize: bool = True, encode: str = "encode") -> torch.Tensor:
    """Encoder outputs ``h`` (or loss-space outputs ``z``) of ``x`` in eval mode, L2-normalised by default.

    Args:
        model: a network of :mod:`trainers.models` (its ``encode`` gives ``(h, z)``).
        x: samples (float, or uint8 pixels which are scaled to [0, 1]).
        projected: return ``z`` instead of ``h``.
        normalize: L2-normalise the rows.
        encode: the method giving ``(h, z)``: ``encode``, or ``encode_v`` for a bimodal network's v side;
            or one giving a single tensor, such as ``graph_embedding`` (then ``projected`` is ignored).

    Shape:
        x: ``[N, *shape]`` -> ``[N, D]``. Cost: O(N) forward passes, ``batch_size`` at a time.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        outs = []
        for start in range(0, len(x), batch_size):
            chunk = torch.as_tensor(np.array(x[start:start + batch_size]))  # a copy: store arrays are read-only
            chunk = chunk.float().div_(255.0) if chunk.dtype == torch.uint8 else chunk
            out = getattr(model, encode)(chunk.to(device))
            outs.append((out if torch.is_tensor(out) else out[int(projected)]).float().cpu())
        out = torch.cat(outs)
        return F.normalize(out, dim=1) if normalize else out
    finally:
        model.train(was_training)


@torch.no_grad()
def embed_ids(model: nn.Module, store, ids: np.ndarray, batch_size: int = 512, projected: bool = False,
              normalize: bool = True, encode: str = "encode", column: str = "x") -> torch.Tensor:
    """:func:`embed` of the store's samples ``ids``, decoded ``batch_size`` at a time (never all at once).

    Shape:
        returns ``[len(ids), D]``. Cost: O(len(ids)) decodes and forward passes; memory O(batch_size).
    """
    ids = np.asarray(ids)
    parts = [embed(model, store.take(ids[a:a + batch_size], column), batch_size, projected, normalize, encode)
             for a in range(0, len(ids), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN classification accuracy with cosine similarity (the InstDisc monitor).

    Each of the ``k`` nearest training samples votes for its class with weight ``exp(sim / T)``.
    Features must be L2-normalised. The neighbours are found chunk by chunk: ``chunk`` queries against
    ``chunk`` bank rows at a time, merging a running top-k, so memory is O(chunk * (chunk + k)) whatever
    the sizes. Cost: O(N_test * N_train * D) time.

    Shape:
        train_feats: ``[N, D]``; train_labels: ``[N]``; test_feats: ``[M, D]``; test_labels: ``[M]``.
    """
    k = min(k, len(train_feats))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0.0
    for q0 in range(0, len(test_feats), chunk):
        query = test_feats[q0:q0 + chunk]
        best_sim = torch.full((len(query), 0), -math.inf, dtype=query.dtype)
        best_idx = torch.zeros((len(query), 0), dtype=torch.long)
        for b0 in range(0, len(train_feats), chunk):
            sims = query @ train_feats[b0:b0 + chunk].T
            top_sim, top_idx = sims.topk(min(k, sims.shape[1]), dim=1)
            both_sim = torch.cat([best_sim, top_sim], dim=1)
            both_idx = torch.cat([best_idx, top_idx + b0], dim=1)
            keep = both_sim.topk(min(k, both_sim.shape[1]), dim=1)
            best_sim, best_idx = keep.values, both_idx.gather(1, keep.indices)
        weights = (best_sim / temperature).exp()
        votes = torch.zeros(len(query), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[best_idx], weights)
        correct += float((votes.argmax(1) == test_labels[q0:q0 + chunk]).double().sum())
    return correct / max(len(test_feats), 1)


def alignment(z_a: torch.Tensor, z_b: torch.Tensor, alpha: float = 2.0) -> float:
    """Alignment of positive pairs (Wang and Isola, 2020): ``E ||z_a - z_b||^alpha``; lower is better.

    Features must be L2-normalised, so the value lies in [0, 2^alpha]. Cost: O(N * D).

    Shape:
        z_a, z_b: ``[N, D]``, row i of both is one positive pair.
    """
    return (z_a - z_b).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: torch.Tensor, t: float = 2.0, chunk: int = 2048) -> float:
    """Uniformity (Wang and Isola, 2020): ``log E_{i<j} exp(-t ||z_i - z_j||^2)``; lower is better.

    The mean runs over all distinct pairs, summed block by block (``chunk`` x ``chunk`` distances at
    a time) in float64. Features must be L2-normalised, so the value lies in [-4t, 0].
    Cost: O(N^2 * D) time, O(chunk^2) memory.

    Shape:
        z: ``[N, D]`` with N >= 2.
    """
    z = z.double()
    n = len(z)
    parts = []
    for a in range(0, n, chunk):
        for b in range(a, n, chunk):
            d2 = torch.cdist(z[a:a + chunk], z[b:b + chunk]).pow(2)
            if a == b:  # the diagonal block: pairs i < j only
                rows, cols = torch.triu_indices(len(d2), len(d2), offset=1)
                d2 = d2[rows, cols]
            parts.append(torch.logsumexp(-t * d2.reshape(-1), dim=0))
    return torch.logsumexp(torch.stack(parts), dim=0).item() - math.log(n * (n - 1) / 2)


def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                          test_labels: torch.Tensor, c: float = 1.0, max_iter: int = 1000) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted on frozen features.

    The features are standardised with the training split's mean and standard deviation, then an
    L2-regularised logistic regression (scikit-learn, L-BFGS, inverse strength ``c``) is fitted on the
    training split and scored on the held-out split. Cost: O(max_iter * N * D * classes).

    Shape:
        train_feats: ``[N, D]``; train_labels: ``[N]``; test_feats: ``[M, D]``; test_labels: ``[M]``.
    """
    from sklearn.linear_model import LogisticRegression

    x_train = train_feats.double().numpy()
    x_test = test_feats.double().numpy()
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit((x_train - mean) / std, train_labels.numpy())
    return float((probe.predict((x_test - mean) / std) == test_labels.numpy()).mean())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width bins on the top-class probability.

    ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|`` where bin b holds the samples whose top
    probability lies in ``((b - 1) / bins, b / bins]`` (the first bin also takes 0). Cost: O(N C).

    Shape:
        probs: ``[N, C]`` rows on the simplex; labels: ``[N]``.
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(correct))
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double())
    used = total > 0
    gaps = (hits[used] - conf[used]).abs()  # n_b * |acc_b - conf_b|
    return float(gaps.sum() / len(labels))


def retrieval_accuracy(scores: torch.Tensor, query_keys: torch.Tensor, candidate_keys: torch.Tensor) -> float:
    """Top-1 retrieval accuracy where a hit is a best-scored candidate whose key equals the query's.

    Row i of ``scores`` scores query i against every candidate. For v-from-u retrieval the keys are
    the v values themselves (query i's key is its true partner ``v_i``); for u-from-v retrieval they
    are the partners' v values too. Comparing keys rather than indices counts duplicated candidates
    as hits (digits pairs: v = the label, so v-from-u retrieval is classification); with
    continuous v it is the usual index match.

    Shape:
        scores: ``[N, M]``; query_keys: ``[N, d]``; candidate_keys: ``[M, d]``.
    """
    best = scores.argmax(dim=1)
    return float((candidate_keys[best] == query_keys).all(dim=1).double().mean())
