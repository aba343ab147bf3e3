"""Bimodal contrastive losses of "A Mathematical Perspective on Contrastive Learning"
(Baptista, Stuart, Tran; arXiv 2505.24134), as reconstructed in ALGORITHMS.md section 3.

Paired embeddings ``e_u = g_u(u)``, ``e_v = g_v(v)`` define the score matrix
``S_ij = s(u_i, v_j)`` (true pairs on the diagonal) for a *tilt*:

* ``"cosine"``: ``<e_u / |e_u|, e_v / |e_v|> / t`` (CLIP);
* ``"inner"``: ``<e_u, e_v> / t`` (bilinear ``u^T A v`` for linear encoders);
* ``"l2"``: ``-|e_u - e_v|^2 / (2 t)`` (computed as ``|a|^2 + |b|^2 - 2ab`` clamped at 0).

The learned conditional of v given u is the marginal re-weighted by ``exp(s)``. Objectives, each
with ``-log`` normalisations so that values estimate population quantities:

* ``"v_given_u"``: ``L_{v|u} = mean_i [-S_ii + LSE_j S_ij] - log N`` (row softmax);
* ``"u_given_v"``: ``L_{u|v} = mean_j [-S_jj + LSE_i S_ij] - log N`` (column softmax);
* ``"clip"``: ``L_{v|u} + L_{u|v}`` (the sum; CLIP's code averages, the factor is irrelevant);
* ``"joint"``: ``-mean_i S_ii + LSE_{i != j} S_ij - log(N (N - 1))`` (one softmax over the
  off-diagonal pairs, exact draws from the product of marginals).

Unverified choices (the faithful option is the default, the alternative a switch):
``include_diagonal=False`` for the joint loss (``True``: LSE over all ``N^2`` pairs minus
``2 log N``, O(1/N) biased); ``weight=None`` for CLIP (the sum; a float ``w`` gives
``w L_{v|u} + (1 - w) L_{u|v}``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainers import dist
from trainers.losses._base import (
    ContrastiveLoss,
    check_bool,
    check_choice,
    check_pair,
    check_positive,
    check_range,
    normalize,
)

TILTS = ("cosine", "inner", "l2")
OBJECTIVES = ("clip", "v_given_u", "u_given_v", "joint")


def tilt_scores(
    e_u: torch.Tensor, e_v: torch.Tensor, tilt: str = "cosine", temperature: float = 0.1
) -> torch.Tensor:
    """Score matrix ``S_ij = s(u_i, v_j)`` of a tilt (module docstring).

    Args:
        e_u: u-embeddings.
        e_v: v-embeddings.
        tilt: one of ``TILTS``.
        temperature: t > 0.

    Shape:
        e_u: ``[N, n_e]``; e_v: ``[M, n_e]``; returns ``[N, M]``.

    Complexity: O(N M n_e).
    """
    check_choice("tilt", tilt, TILTS)
    if tilt == "cosine":
        return normalize(e_u) @ normalize(e_v).T / temperature
    if tilt == "inner":
        return e_u @ e_v.T / temperature
    squared = (e_u * e_u).sum(1, keepdim=True) + (e_v * e_v).sum(1) - 2.0 * e_u @ e_v.T
    return -squared.clamp_min(0.0) / (2.0 * temperature)


def _conditional(scores: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``mean_i [-S_i,offset+i + LSE_j S_ij] - log M`` over the rows of a ``[N, M]`` block."""
    positives = torch.arange(scores.shape[0], device=scores.device) + offset
    return F.cross_entropy(scores, positives) - math.log(scores.shape[1])


def _joint(scores: torch.Tensor, include_diagonal: bool) -> torch.Tensor:
    n = scores.shape[0]
    diagonal = scores.diagonal()
    if include_diagonal:
        return -diagonal.mean() + torch.logsumexp(scores.flatten(), 0) - 2.0 * math.log(n)
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    off = scores.masked_fill(eye, float("-inf")).flatten()
    return -diagonal.mean() + torch.logsumexp(off, 0) - math.log(n * (n - 1))


def _combine(v_given_u: torch.Tensor, u_given_v: torch.Tensor, weight: float | None) -> torch.Tensor:
    if weight is None:
        return v_given_u + u_given_v
    return weight * v_given_u + (1.0 - weight) * u_given_v


def bimodal_loss_from_scores(
    scores: torch.Tensor,
    objective: str = "clip",
    *,
    include_diagonal: bool = False,
    weight: float | None = None,
) -> torch.Tensor:
    """A bimodal objective of a square score matrix with the true pairs on the diagonal.

    Args:
        scores: ``S_ij = s(u_i, v_j)``.
        objective: one of ``OBJECTIVES``.
        include_diagonal: joint loss over all ``N^2`` pairs instead of the off-diagonal ones.
        weight: CLIP weighting (``None``: the sum of the two conditionals).

    Shape:
        scores: ``[N, N]``; returns a scalar.
    """
    check_choice("objective", objective, OBJECTIVES)
    if objective == "v_given_u":
        return _conditional(scores)
    if objective == "u_given_v":
        return _conditional(scores.T)
    if objective == "joint":
        return _joint(scores, include_diagonal)
    return _combine(_conditional(scores), _conditional(scores.T), weight)


def bimodal_loss(
    e_u: torch.Tensor,
    e_v: torch.Tensor,
    objective: str = "clip",
    tilt: str = "cosine",
    temperature: float = 0.1,
    *,
    gather: bool = False,
    include_diagonal: bool = False,
    weight: float | None = None,
) -> torch.Tensor:
    """Bimodal contrastive loss of paired embeddings (module docstring).

    With ``gather=True`` the candidates come from every rank: for the conditional and CLIP
    objectives each rank scores its local rows (and columns) against the gathered batch, so the
    mean over ranks equals the single-process loss on the global batch (exact, O(B W B) memory
    per rank); the joint objective needs all pairs, so each rank computes the full global
    ``[W B, W B]`` matrix (exact, O((W B)^2) memory).

    Args:
        e_u: u-embeddings (unnormalised).
        e_v: v-embeddings of the paired samples.
        objective: one of ``OBJECTIVES``.
        tilt: one of ``TILTS``.
        temperature: t > 0.
        gather: cross-rank candidates (:func:`trainers.dist.gather`).
        include_diagonal: see :func:`bimodal_loss_from_scores`.
        weight: see :func:`bimodal_loss_from_scores`.

    Shape:
        e_u, e_v: ``[N, n_e]``; returns a scalar.

    Complexity: O(N * W N * n_e) (joint with gather: O((W N)^2 n_e)).
    """
    check_pair(e_u, e_v)
    check_choice("objective", objective, OBJECTIVES)
    if not (gather and dist.world_size() > 1):
        scores = tilt_scores(e_u, e_v, tilt, temperature)
        return bimodal_loss_from_scores(
            scores, objective, include_diagonal=include_diagonal, weight=weight
        )
    all_u, all_v = dist.gather(e_u), dist.gather(e_v)
    if objective == "joint":
        return _joint(tilt_scores(all_u, all_v, tilt, temperature), include_diagonal)
    offset = dist.rank() * e_u.shape[0]
    v_given_u = _conditional(tilt_scores(e_u, all_v, tilt, temperature), offset)
    if objective == "v_given_u":
        return v_given_u
    u_given_v = _conditional(tilt_scores(all_u, e_v, tilt, temperature).T, offset)
    if objective == "u_given_v":
        return u_given_v
    return _combine(v_given_u, u_given_v, weight)


class Retrieval(NamedTuple):
    """Result of :func:`retrieve`: best candidate per query and the top-1 accuracy of the pairs."""

    index: torch.Tensor
    accuracy: torch.Tensor


@torch.no_grad()
def retrieve(
    e_u: torch.Tensor,
    e_v: torch.Tensor,
    tilt: str = "cosine",
    temperature: float = 0.1,
    direction: str = "v_given_u",
) -> Retrieval:
    """Mode-seeking retrieval: ``argmax_j S_ij`` per query, and how often it is the true pair.

    For ``direction="v_given_u"`` queries are the rows of ``e_u`` and candidates the rows of
    ``e_v`` (true pair of query i: candidate i); ``"u_given_v"`` swaps the roles. With C class
    prototypes as candidates this is classification.

    Args:
        e_u: u-embeddings.
        e_v: v-embeddings.
        tilt: one of ``TILTS``.
        temperature: t > 0 (does not change the argmax for positive t).
        direction: ``"v_given_u"`` or ``"u_given_v"``.

    Shape:
        e_u: ``[N, n_e]``; e_v: ``[M, n_e]``; returns index ``int64[N]`` (or ``[M]``) and a
        scalar accuracy (only meaningful when the queries have their pair among the candidates
        at the same position, ``N == M``).
    """
    check_choice("direction", direction, ("v_given_u", "u_given_v"))
    scores = tilt_scores(e_u, e_v, tilt, temperature)
    if direction == "u_given_v":
        scores = scores.T
    index = scores.argmax(dim=1)
    truth = torch.arange(index.shape[0], device=index.device)
    accuracy = (index == truth).to(scores.dtype).mean()
    return Retrieval(index, accuracy)


@torch.no_grad()
def generate(
    e_query: torch.Tensor,
    e_pool: torch.Tensor,
    n_samples: int = 1,
    tilt: str = "cosine",
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample from the learned conditional by resampling a pool drawn from the marginal.

    The learned conditional of v given u is ``exp(s(u, v)) mu_v(dv) / Z(u)``; with a pool
    ``v_1..v_P ~ mu_v`` this draws pool index j with probability ``softmax_j S(u, v_j)``
    (self-normalised importance resampling, exact as P grows). Use an L2 tilt with a one-sided
    loss when the conditional covariance matters. For u given v pass the v-embeddings as
    queries and a u-pool, with the scores symmetric in their arguments for every tilt.

    Args:
        e_query: query embeddings (e.g. ``g_u(u)``).
        e_pool: embeddings of the pool (e.g. ``g_v(v_j)`` of training samples).
        n_samples: draws per query (with replacement).
        tilt: one of ``TILTS``.
        temperature: t > 0.
        generator: random generator.

    Shape:
        e_query: ``[N, n_e]``; e_pool: ``[P, n_e]``; returns ``int64[N, n_samples]``.

    Complexity: O(N P n_e) time, O(N P) memory.
    """
    probs = torch.softmax(tilt_scores(e_query, e_pool, tilt, temperature), dim=1)
    draw_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(draw_device), n_samples, replacement=True, generator=generator).to(
        probs.device
    )


class _BimodalLoss(ContrastiveLoss):
    """Shared validation and forward of the bimodal registry losses.

    ``forward(z_a, z_b, targets=None)``: ``z_a`` = u-embeddings ``g_u(u)``, ``z_b`` =
    v-embeddings ``g_v(v)`` of the paired samples (row i of each is a true pair; the two
    towers may be different networks, or one Siamese network for two views); ``targets`` is
    unused.
    """

    distributed_flags = ("gather",)
    objective = "clip"

    def _validate(self, temperature: float, tilt: str, gather: bool) -> None:
        check_positive("temperature", temperature)
        check_choice("tilt", tilt, TILTS)
        check_bool("gather", gather)

    def _loss(self, z_a: torch.Tensor, z_b: torch.Tensor, objective: str) -> torch.Tensor:
        return bimodal_loss(
            z_a,
            z_b,
            objective,
            self.tilt,
            self.temperature,
            gather=self.gather,
            include_diagonal=getattr(self, "include_diagonal", False),
            weight=getattr(self, "weight", None),
        )


class ClipLoss(_BimodalLoss):
    """CLIP / symmetric InfoNCE ``L_{v|u} + L_{u|v}`` (registry name ``clip``).

    Args:
        temperature: t > 0 (0.1).
        tilt: one of ``TILTS`` (``"cosine"``).
        weight: ``None`` for the sum, or a float in [0, 1] for ``w L_{v|u} + (1 - w) L_{u|v}``.
        gather: candidates from all ranks.
    """

    name = "clip"

    def __init__(
        self,
        temperature: float = 0.1,
        tilt: str = "cosine",
        weight: float | None = None,
        gather: bool = False,
    ) -> None:
        super().__init__()
        self._validate(temperature, tilt, gather)
        if weight is not None:
            check_range("weight", weight, 0.0, 1.0)
        self.temperature = temperature
        self.tilt = tilt
        self.weight = weight
        self.gather = gather

    def forward(
        self, z_a: torch.Tensor, z_b: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CLIP loss of paired u- and v-embeddings.

        Shape:
            z_a, z_b: ``[N, n_e]``; returns a scalar.
        """
        return self._loss(z_a, z_b, "clip")


class ConditionalLoss(_BimodalLoss):
    """One-sided conditional loss ``L_{v|u}`` or ``L_{u|v}`` (registry name ``conditional``).

    Use it with ``tilt="l2"`` to learn a conditional that can be sampled (:func:`generate`).

    Args:
        direction: ``"v_given_u"`` (retrieve / generate v from u) or ``"u_given_v"``.
        temperature: t > 0 (0.1).
        tilt: one of ``TILTS`` (``"cosine"``).
        gather: candidates from all ranks.
    """

    name = "conditional"

    def __init__(
        self,
        direction: str = "v_given_u",
        temperature: float = 0.1,
        tilt: str = "cosine",
        gather: bool = False,
    ) -> None:
        super().__init__()
        check_choice("direction", direction, ("v_given_u", "u_given_v"))
        self._validate(temperature, tilt, gather)
        self.direction = direction
        self.temperature = temperature
        self.tilt = tilt
        self.gather = gather

    def forward(
        self, z_a: torch.Tensor, z_b: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Conditional loss of paired u- and v-embeddings.

        Shape:
            z_a, z_b: ``[N, n_e]``; returns a scalar.
        """
        return self._loss(z_a, z_b, self.direction)


class JointLoss(_BimodalLoss):
    """Joint-distribution loss, one softmax over the pairs (registry name ``joint``).

    Args:
        temperature: t > 0 (0.1).
        tilt: one of ``TILTS`` (``"cosine"``).
        include_diagonal: softmax over all ``N^2`` pairs instead of the off-diagonal ones.
        gather: all pairs of the global batch (each rank computes the full matrix).
    """

    name = "joint"

    def __init__(
        self,
        temperature: float = 0.1,
        tilt: str = "cosine",
        include_diagonal: bool = False,
        gather: bool = False,
    ) -> None:
        super().__init__()
        self._validate(temperature, tilt, gather)
        check_bool("include_diagonal", include_diagonal)
        self.temperature = temperature
        self.tilt = tilt
        self.include_diagonal = include_diagonal
        self.gather = gather

    def forward(
        self, z_a: torch.Tensor, z_b: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Joint loss of paired u- and v-embeddings.

        Shape:
            z_a, z_b: ``[N, n_e]``; returns a scalar.
        """
        return self._loss(z_a, z_b, "joint")
