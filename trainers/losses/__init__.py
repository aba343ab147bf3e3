"""Contrastive losses of hardbatch: pure functions plus thin ``nn.Module`` wrappers.

Every registry class takes its hyper-parameters in ``__init__`` (validated there, ``ValueError``
naming the bad value), exposes them with ``params()`` (defaults) / ``hparams()`` (current values,
including the cross-rank flags) and computes ``forward(z_a, z_b, targets=None) -> scalar``.

========================  =====================================  =================================
registry name             class                                  pure function
========================  =====================================  =================================
``infonce``               :class:`InfoNCELoss`                   :func:`info_nce`
``soft_infonce``          :class:`SoftTargetInfoNCELoss`         :func:`soft_target_info_nce`
``sscl``                  :class:`SSCLLoss`                      :func:`sscl_loss`
``mveb``                  :class:`MVEBLoss`                      :func:`mveb_loss`, :func:`mveb_score`
``clip``                  :class:`ClipLoss`                      :func:`bimodal_loss` (``"clip"``)
``conditional``           :class:`ConditionalLoss`               :func:`bimodal_loss` (``"v_given_u"``)
``joint``                 :class:`JointLoss`                     :func:`bimodal_loss` (``"joint"``)
========================  =====================================  =================================
"""

from __future__ import annotations

from typing import Any, Mapping

from trainers.losses._base import ContrastiveLoss, normalize
from trainers.losses.bimodal import (
    OBJECTIVES,
    TILTS,
    ClipLoss,
    ConditionalLoss,
    JointLoss,
    Retrieval,
    bimodal_loss,
    bimodal_loss_from_scores,
    generate,
    retrieve,
    tilt_scores,
)
from trainers.losses.infonce import InfoNCELoss, info_nce
from trainers.losses.mveb import MVEBLoss, ema_momentum, mveb_loss, mveb_score, vmf_concentration
from trainers.losses.soft_target import (
    SoftTargetInfoNCELoss,
    class_frequencies,
    label_smoothing_targets,
    mixup_inputs,
    mixup_targets,
    soft_target_cross_entropy,
    soft_target_info_nce,
)
from trainers.losses.sscl import (
    MIXINGS,
    SSCLLoss,
    debiased_hard_nce,
    importance_weights,
    log_weighted_negatives,
    sscl_loss,
    synthetic_negatives,
)

LOSSES: dict[str, type[ContrastiveLoss]] = {
    cls.name: cls
    for cls in (
        InfoNCELoss,
        SoftTargetInfoNCELoss,
        SSCLLoss,
        MVEBLoss,
        ClipLoss,
        ConditionalLoss,
        JointLoss,
    )
}


def build_loss(name: str, config: Mapping[str, Any] | None = None) -> ContrastiveLoss:
    """Build a registry loss from its name and config section (validated, unknown keys rejected).

    Args:
        name: a key of :data:`LOSSES`.
        config: hyper-parameters for the class constructor.
    """
    if name not in LOSSES:
        raise ValueError(f"loss name must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name].from_config(config)


__all__ = [
    "LOSSES",
    "MIXINGS",
    "OBJECTIVES",
    "TILTS",
    "ClipLoss",
    "ConditionalLoss",
    "ContrastiveLoss",
    "InfoNCELoss",
    "JointLoss",
    "MVEBLoss",
    "Retrieval",
    "SSCLLoss",
    "SoftTargetInfoNCELoss",
    "bimodal_loss",
    "bimodal_loss_from_scores",
    "build_loss",
    "class_frequencies",
    "debiased_hard_nce",
    "ema_momentum",
    "generate",
    "importance_weights",
    "info_nce",
    "label_smoothing_targets",
    "log_weighted_negatives",
    "mixup_inputs",
    "mixup_targets",
    "mveb_loss",
    "mveb_score",
    "normalize",
    "retrieve",
    "soft_target_cross_entropy",
    "soft_target_info_nce",
    "sscl_loss",
    "synthetic_negatives",
    "tilt_scores",
    "vmf_concentration",
]
