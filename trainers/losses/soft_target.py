"""Soft-target InfoNCE (Hugger & Uhlmann, arXiv 2404.14076) and soft-target builders.

Each sample's logits are contrasted with the soft targets carried by the batch:

    a_ic = l_ic / t - log q_c            (the log-q correction is not divided by t)
    s_ij = <a_i, y_j>                    (one [N, C] x [C, M] matmul)
    L    = mean_i [ -s_ii + LSE_j s_ij ]

with ``q`` the noise distribution (the empirical class frequencies of the training set in the
paper's code; uniform by default here). The negatives are the targets of the other samples; no
noise is drawn. Under data parallelism only the targets are gathered and the positive of local
sample i is target ``i + N * rank``.

Reductions (tested): one-hot targets forming a permutation of the classes give logit-adjusted
cross-entropy (plain cross-entropy for uniform q); a per-row logit shift leaves the loss
unchanged; identical targets give ``log N`` and zero gradient.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from trainers import dist
from trainers.losses._base import ContrastiveLoss, check_bool, check_positive, check_range

MIN_NOISE = 1e-12


def soft_target_info_nce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    noise: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    offset: int = 0,
    gather: bool = False,
) -> torch.Tensor:
    """Soft-target InfoNCE, exactly ALGORITHMS.md 1.3.

    Args:
        logits: classifier logits ``l_i`` (not normalised).
        targets: soft targets ``y_j``, rows on the simplex. May hold more rows than ``logits``
            (targets of other ranks); the positive of logits row i is targets row
            ``offset + i``.
        noise: noise distribution ``q`` (positive; entries are clamped at 1e-12 so an absent
            class cannot produce ``0 * inf``); ``None`` means uniform.
        temperature: t > 0, divides the logits only.
        offset: index of this block's first positive in ``targets``.
        gather: all-gather the targets across ranks and set ``offset = rank * N``.

    Shape:
        logits: ``[N, C]``; targets: ``[M, C]`` with ``M >= N``; noise: ``[C]``; returns a scalar.

    Complexity: O(N M C) time, O(N M) memory.
    """
    if logits.dim() != 2 or targets.dim() != 2 or targets.shape[1] != logits.shape[1]:
        raise ValueError(
            f"logits must be [N, C] and targets [M, C], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if gather and dist.world_size() > 1:
        targets = dist.gather(targets)
        offset = dist.rank() * logits.shape[0]
    targets = targets.to(logits.dtype)
    adjusted = logits / temperature
    if noise is not None:
        adjusted = adjusted - noise.to(logits).clamp_min(MIN_NOISE).log()
    scores = adjusted @ targets.T
    positives = torch.arange(logits.shape[0], device=logits.device) + offset
    return F.cross_entropy(scores, positives)


def soft_target_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Baseline soft-label cross-entropy ``-mean_i sum_c y_ic log softmax(l_i / t)_c``.

    Shape:
        logits, targets: ``[N, C]``; returns a scalar.
    """
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


def label_smoothing_targets(
    labels: torch.Tensor, num_classes: int, smoothing: float = 0.1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One-hot targets with label smoothing: off value ``eps / C``, on value ``1 - eps + eps / C``.

    Shape:
        labels: ``int64[N]``; returns ``[N, C]``.
    """
    off = smoothing / num_classes
    one_hot = F.one_hot(labels, num_classes).to(dtype)
    return one_hot * (1.0 - smoothing) + off


def mixup_targets(
    labels: torch.Tensor,
    num_classes: int,
    lam: float,
    smoothing: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Targets of batch-mode mixup (timm ``Mixup(mode="batch")``): mix with the flipped batch.

    ``y_i = lam * smooth(labels_i) + (1 - lam) * smooth(labels_{N-1-i})``.

    Shape:
        labels: ``int64[N]``; returns ``[N, C]``.
    """
    smooth = label_smoothing_targets(labels, num_classes, smoothing, dtype)
    return lam * smooth + (1.0 - lam) * smooth.flip(0)


def mixup_inputs(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Batch-mode mixup of the inputs: ``lam * x + (1 - lam) * x.flip(0)``.

    Shape:
        x: ``[N, ...]``; returns the same shape.
    """
    return lam * x + (1.0 - lam) * x.flip(0)


def class_frequencies(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Empirical class frequencies ``q_c = #{labels = c} / n`` (the paper's noise distribution).

    Shape:
        labels: ``int64[n]``; returns ``float[C]``.
    """
    counts = torch.bincount(labels, minlength=num_classes).to(torch.get_default_dtype())
    return counts / counts.sum()


class SoftTargetInfoNCELoss(ContrastiveLoss):
    """Soft-target InfoNCE as a module (registry name ``soft_infonce``).

    ``forward(z_a, z_b=None, targets)``:

    * ``z_b is None``: ``z_a`` are the classifier logits ``[N, C]``.
    * otherwise ``z_a`` are sample embeddings ``h_i`` ``[N, d]`` and ``z_b`` the class embeddings
      ``[C, d]`` (the rows of the last linear layer); the logits are ``z_a @ z_b.T``, which makes
      a soft target's embedding the probability-weighted mean of the class embeddings.
    * ``targets`` (required): soft targets ``[N, C]`` (rows on the simplex), or integer labels
      ``[N]`` which are turned into one-hot targets smoothed by ``smoothing`` (``smoothing=0``
      gives the hard-target InfoNCE baseline).

    Args:
        temperature: t > 0 (paper: 1.0).
        noise: noise distribution ``q`` as a sequence of C positive numbers (normalised to sum
            1), e.g. from :func:`class_frequencies`; ``None`` means uniform.
        smoothing: label smoothing in [0, 1) applied to integer targets.
        gather: gather the targets (never the logits) across ranks.
    """

    name = "soft_infonce"
    distributed_flags = ("gather",)

    def __init__(
        self,
        temperature: float = 1.0,
        noise: Sequence[float] | None = None,
        smoothing: float = 0.0,
        gather: bool = False,
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_range("smoothing", smoothing, 0.0, 1.0, high_open=True)
        check_bool("gather", gather)
        q = None
        if noise is not None:
            q = torch.as_tensor(noise, dtype=torch.float64).flatten()
            if q.numel() == 0 or not bool(torch.all(q > 0)) or not bool(torch.isfinite(q).all()):
                raise ValueError(f"noise must be a non-empty sequence of finite values > 0, got {noise!r}")
            q = q / q.sum()
        self.temperature = temperature
        self.noise = None if q is None else q.tolist()
        self.smoothing = smoothing
        self.gather = gather
        self.register_buffer("noise_probs", q, persistent=False)

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Soft-target InfoNCE of logits (or embeddings vs class embeddings) against targets.

        Args:
            z_a: logits, or sample embeddings when ``z_b`` is given.
            z_b: class embeddings, or ``None``.
            targets: soft targets or integer labels (required).

        Shape:
            z_a: ``[N, C]`` or ``[N, d]``; z_b: ``[C, d]``; targets: ``[N, C]`` or ``[N]``;
            returns a scalar.
        """
        if targets is None:
            raise ValueError("soft_infonce needs targets (soft targets [N, C] or labels [N]), got None")
        logits = z_a if z_b is None else z_a @ z_b.T
        if targets.dim() == 1:
            targets = label_smoothing_targets(targets, logits.shape[1], self.smoothing, logits.dtype)
        if self.noise_probs is not None and self.noise_probs.numel() != logits.shape[1]:
            raise ValueError(
                f"noise has {self.noise_probs.numel()} classes but the logits have {logits.shape[1]}"
            )
        return soft_target_info_nce(
            logits, targets, self.noise_probs, self.temperature, gather=self.gather
        )
