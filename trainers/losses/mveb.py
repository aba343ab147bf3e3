"""MVEB: multi-view entropy bottleneck (Wen et al., arXiv 2403.19078; code wlj6816/MVEB).

Loss ``L = -A - lam * U`` with

* alignment ``A = (1/V) [<z_1, t_2> + <z_2, t_1> + sum_{v>=3} <z_v, (t_1 + t_2) / 2>]`` where
  ``<., .>`` is the batch mean of row-wise dot products, ``z_v`` the online views (unit rows,
  the two global crops first) and ``t_1, t_2`` the EMA target views of the two global crops
  (stop-gradient; the averaged target is not renormalised);
* entropy surrogate ``U = (1/V) sum_v -(1/B) sum_b <sg(s_b), z_{v,b}>`` with ``s`` the Stein
  score estimate of :func:`mveb_score`. Only the gradient of ``U`` is meaningful
  (``dU/dz_b = -s_b / B``, an entropy-ascent direction); its value is not an entropy.

Choices: the score is a per-device estimator (as in the author code) unless ``gather_score``;
it is solved in float64 with ``torch.linalg.solve`` (the code uses fp16/fp32 under autocast);
``eta`` is used as is (not scaled by the kernel diagonal).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from trainers import dist
from trainers.losses._base import (
    ContrastiveLoss,
    check_bool,
    check_non_negative,
    check_positive,
    check_range,
    normalize,
)


@torch.no_grad()
def vmf_concentration(z: torch.Tensor, min_width: float = 0.1) -> torch.Tensor:
    """vMF kernel concentration ``kappa = 1 / max(width, min_width)`` by the median heuristic.

    ``width`` is the ``floor(B^2 / 2)``-th largest of the ``B^2`` values ``1 - z_i.z_j``
    (diagonal zeros included), about their median.

    Args:
        z: unit rows (a leading batch of sets is allowed).
        min_width: lower clamp of the width (so ``kappa <= 1 / min_width``).

    Shape:
        z: ``[..., B, D]``; returns ``[...]`` (float64).

    Complexity: O(B^2 D) for the Gram matrix, O(B^2) for the selection.
    """
    z64 = z.detach().to(torch.float64)
    n = z64.shape[-2] ** 2
    dist_flat = (1.0 - z64 @ z64.transpose(-1, -2)).flatten(-2)
    k_largest = max(n // 2, 1)
    width = dist_flat.kthvalue(n - k_largest + 1, dim=-1).values
    return 1.0 / width.clamp_min(min_width)


@torch.no_grad()
def mveb_score(z: torch.Tensor, eta: float = 0.01, min_width: float = 0.1) -> torch.Tensor:
    """Stein gradient estimate of ``grad log p(z)`` with a vMF kernel (no gradient, float64).

    ``K_ij = exp(kappa z_i.z_j)``, ``g_i = kappa (sum_j K_ij) z_i`` and
    ``s = -(K + eta I)^{-1} g``, with ``kappa`` from :func:`vmf_concentration`. Exact collapse
    (all B rows equal) gives ``kappa = 1 / min_width`` and the purely radial
    ``s = -kappa B e^kappa / (B e^kappa + eta) z`` (the factor is 1 - 5.7e-8 at B = 8, kappa = 10, eta = 0.01:
    close to, not exactly, ``-kappa z``). Then ``cond(K + eta I) = (B e^kappa + eta) / eta`` (1.8e7),
    so a single row may carry rounding up to about that times ``(B + kappa D) eps`` of ``|s|``.
    Equivariant to rotations of the embedding space and to permutations of the rows.

    Args:
        z: unit rows; a leading batch dimension holds independent sets (e.g. views).
        eta: ridge added to the kernel matrix, > 0.
        min_width: lower clamp of the kernel width.

    Shape:
        z: ``[..., B, D]``; returns ``[..., B, D]`` in ``z``'s dtype.

    Complexity: O(B^2 D + B^3) time, O(B^2) memory, per set.
    """
    z64 = z.detach().to(torch.float64)
    kappa = vmf_concentration(z64, min_width)[..., None, None]
    kernel = torch.exp(kappa * (z64 @ z64.transpose(-1, -2)))
    stein = kappa * kernel.sum(dim=-1, keepdim=True) * z64
    eye = torch.eye(z64.shape[-2], dtype=torch.float64, device=z64.device)
    return -torch.linalg.solve(kernel + eta * eye, stein).to(z.dtype)


def mveb_loss(
    online: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    lam: float = 0.01,
    eta: float = 0.01,
    min_width: float = 0.1,
    *,
    gather_score: bool = False,
) -> torch.Tensor:
    """MVEB loss ``-A - lam * U`` (module docstring); ``lam = 0`` gives ``-A``.

    Inputs are used as given (no normalisation here: pass unit rows, as the projector's
    normalisation layer produces them); the targets are detached.

    Args:
        online: the V >= 2 online views, the two global crops first.
        targets: the EMA target outputs ``(t_1, t_2)`` of the two global crops.
        lam: weight of the entropy surrogate, >= 0 (paper 0.01).
        eta: ridge of the score estimator.
        min_width: kernel-width clamp of the score estimator.
        gather_score: estimate the score on the batch of all ranks (default: per rank).

    Shape:
        online: V tensors ``[B, D]``; targets: two tensors ``[B, D]``; returns a scalar.

    Complexity: O(V (B^2 D + B^3)).
    """
    if len(online) < 2 or len(targets) != 2:
        raise ValueError(
            f"mveb_loss needs >= 2 online views and exactly 2 target views, got {len(online)} "
            f"and {len(targets)}"
        )
    views = torch.stack(list(online))
    t_1, t_2 = (t.detach().to(views.dtype) for t in targets)
    partner = torch.stack([t_2, t_1] + [(t_1 + t_2) / 2] * (views.shape[0] - 2))
    alignment = (views * partner).sum(dim=-1).mean()
    if gather_score and dist.world_size() > 1:
        b = views.shape[1]
        start = dist.rank() * b
        score = mveb_score(dist.concat_all_gather(views, dim=1), eta, min_width)[:, start : start + b]
    else:
        score = mveb_score(views, eta, min_width)
    entropy_surrogate = -(score * views).sum(dim=-1).mean()
    return -alignment - lam * entropy_surrogate


def ema_momentum(progress: float, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine EMA momentum of the MVEB / BYOL target: ``final - (final - base)(cos(pi p) + 1) / 2``.

    Args:
        progress: fraction of training done, ``k / K_total`` in [0, 1] (fractional epochs OK).
        base: momentum at the start (0.996).
        final: momentum at the end (1.0).
    """
    check_range("progress", progress, 0.0, 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MVEBLoss(ContrastiveLoss):
    """MVEB as a module (registry name ``mveb``).

    ``forward(z_a, z_b, targets=None, local_views=None)``:

    * ``z_a``, ``z_b``: the online projections of global crops 1 and 2 (unnormalised; they are
      L2-normalised here, the code's normalisation layer).
    * ``targets``: the EMA target network's outputs for global crops 1 and 2, as a pair
      ``(t_1, t_2)`` or a tensor ``[2, B, D]`` (normalised and detached here). ``None`` means
      no target network: the detached online views stand in for it.
    * ``local_views``: optional extra online views (multi-crop local crops), aligned with
      ``(t_1 + t_2) / 2``.

    Pair it with :func:`ema_momentum` to update the target network.

    Args:
        lam: entropy weight, >= 0 (paper 0.01; 0 is predictor-free BYOL, which collapses).
        eta: score-estimator ridge, > 0 (0.01).
        min_width: kernel-width clamp in (0, 2] (0.1).
        gather_score: estimate the score on the gathered batch instead of per rank.
    """

    name = "mveb"
    distributed_flags = ("gather_score",)

    def __init__(
        self,
        lam: float = 0.01,
        eta: float = 0.01,
        min_width: float = 0.1,
        gather_score: bool = False,
    ) -> None:
        super().__init__()
        check_non_negative("lam", lam)
        check_positive("eta", eta)
        check_positive("min_width", min_width)
        check_range("min_width", min_width, 0.0, 2.0)
        check_bool("gather_score", gather_score)
        self.lam = lam
        self.eta = eta
        self.min_width = min_width
        self.gather_score = gather_score

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        targets: torch.Tensor | Sequence[torch.Tensor] | None = None,
        local_views: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """MVEB loss of the online views against the target views.

        Args:
            z_a: online global view 1.
            z_b: online global view 2.
            targets: ``(t_1, t_2)`` or ``[2, B, D]``; ``None`` = detached ``(z_a, z_b)``.
            local_views: extra online views.

        Shape:
            z_a, z_b, t_1, t_2, local views: ``[B, D]``; returns a scalar.
        """
        if targets is None:
            targets = (z_a.detach(), z_b.detach())
        if len(targets) != 2:
            raise ValueError(f"mveb targets must hold 2 target views, got {len(targets)}")
        online = [normalize(z) for z in (z_a, z_b, *(local_views or ()))]
        target_views = [normalize(t.detach()) for t in targets]
        return mveb_loss(
            online, target_views, self.lam, self.eta, self.min_width, gather_score=self.gather_score
        )
