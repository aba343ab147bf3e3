"""SimCLR NT-Xent (InfoNCE over 2B views) with optional cross-rank negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers import dist
from trainers.losses._base import ContrastiveLoss, check_bool, check_pair, check_positive, normalize


def two_view_indices(
    local_batch: int, offset: int, global_batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self and positive columns of the local anchors ``[z_a; z_b]`` in the bank ``[Z_a; Z_b]``.

    The bank stacks all ranks' first views, then all ranks' second views, so local row ``i`` of
    ``z_a`` sits at column ``offset + i`` and its positive at ``global_batch + offset + i``.

    Args:
        local_batch: B, rows of ``z_a`` on this rank.
        offset: ``rank * B`` (0 without gathering).
        global_batch: ``world_size * B`` (B without gathering).
        device: device of the index tensors.

    Shape:
        returns two ``int64[2B]`` tensors ``(self_idx, pos_idx)``.
    """
    local = torch.arange(local_batch, device=device) + offset
    self_idx = torch.cat([local, local + global_batch])
    pos_idx = torch.cat([local + global_batch, local])
    return self_idx, pos_idx


def two_view_bank(
    z_a: torch.Tensor, z_b: torch.Tensor, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local anchors, the (possibly gathered) bank, and the self / positive column indices.

    Args:
        z_a: first views, unit rows.
        z_b: second views, unit rows.
        gather: take the bank from all ranks with :func:`trainers.dist.gather`.

    Shape:
        z_a, z_b: ``[B, D]``. Returns anchors ``[2B, D]``, bank ``[2 W B, D]`` and two
        ``int64[2B]`` index tensors.
    """
    anchors = torch.cat([z_a, z_b])
    if gather and dist.world_size() > 1:
        bank = torch.cat([dist.gather(z_a), dist.gather(z_b)])
        offset = dist.rank() * z_a.shape[0]
    else:
        bank, offset = anchors, 0
    self_idx, pos_idx = two_view_indices(z_a.shape[0], offset, bank.shape[0] // 2, z_a.device)
    return anchors, bank, self_idx, pos_idx


def info_nce(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1, *, gather: bool = False
) -> torch.Tensor:
    """SimCLR NT-Xent loss over the 2B views of a two-view batch.

    Rows are L2-normalised inside. For anchor ``a`` of ``o = [z_a; z_b]`` the positive is the
    other view of the same instance and the negatives are the other ``2B - 2`` rows:
    ``l_a = -o_a.o_p / t + LSE_{b != a}(o_a.o_b / t)``, averaged over the 2B anchors.

    With ``gather=True`` the candidates (positive and negatives) come from every rank
    (``2 W B - 2`` negatives); the anchors stay local. The mean over ranks of the local losses
    then equals the single-process loss on the global batch, gradients included.

    Args:
        z_a: first view embeddings (unnormalised).
        z_b: second view embeddings (unnormalised).
        temperature: softmax temperature, > 0.
        gather: use cross-rank negatives (:func:`trainers.dist.gather`).

    Shape:
        z_a, z_b: ``[B, D]``; returns a scalar.

    Complexity: O(B * W B * D) time, O(B * W B) memory.
    """
    check_pair(z_a, z_b)
    anchors, bank, self_idx, pos_idx = two_view_bank(normalize(z_a), normalize(z_b), gather)
    logits = (anchors / temperature) @ bank.T
    logits = logits.scatter(1, self_idx[:, None], float("-inf"))
    return F.cross_entropy(logits, pos_idx)


class InfoNCELoss(ContrastiveLoss):
    """SimCLR NT-Xent as a module (registry name ``infonce``).

    ``forward(z_a, z_b, targets=None)``: ``z_a`` and ``z_b`` are the projections of the two
    augmented views of the same B instances (row i of each is a positive pair); ``targets`` is
    unused (self-supervised).

    Args:
        temperature: softmax temperature, > 0 (SimCLR uses 0.1 to 0.5).
        gather: negatives from all ranks (see :func:`info_nce`).
    """

    name = "infonce"
    distributed_flags = ("gather",)

    def __init__(self, temperature: float = 0.1, gather: bool = False) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_bool("gather", gather)
        self.temperature = temperature
        self.gather = gather

    def forward(
        self, z_a: torch.Tensor, z_b: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """NT-Xent of the two views.

        Args:
            z_a: first views.
            z_b: second views.
            targets: unused.

        Shape:
            z_a, z_b: ``[B, D]``; returns a scalar.
        """
        return info_nce(z_a, z_b, self.temperature, gather=self.gather)
