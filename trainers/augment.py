"""Augmentation presets and random views, with torchvision v2 transforms.

======================  ==========================================================================
``augment.preset``      what one view of a sample is
======================  ==========================================================================
``digits``              crop-and-resize (scale 0.5..1), affine jitter (15 degrees, 10 % shift,
                        shear 10), Gaussian pixel noise 0.05; no flips (a mirrored digit is another
                        glyph or none)
``natural``             SimCLR's recipe: random resized crop (scale ``augment.crop_min``..1;
                        SimCLR's 0.08), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
                        p 0.8, grayscale with p 0.2, and with ``augment.blur`` a Gaussian blur (kernel ~10 % of the side, sigma 0.1..2) with
                        p 0.5; colour steps only on 3-channel images
======================  ==========================================================================

Both take ``uint8`` tensors (or float in [0, 1]) of shape ``[C, H, W]``; ``natural`` returns the
input's dtype (uint8 stays uint8, so a feed ships a quarter of the bytes), ``digits`` returns float32
in [0, 1] (its noise needs floats). torchvision v2 applies *one* set of random parameters to a whole
batched tensor, so views are drawn per sample. Randomness comes from torch's global generator, which
the feed seeds per batch from ``(train.seed, rank, step)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torchvision.transforms import v2

PRESETS = ("digits", "natural")


Size = Union[int, Sequence[int]]


def digits_augment(size: Size = 8) -> v2.Transform:
    """Augmentations for small grey-scale glyphs: crop-and-resize, affine jitter, pixel noise."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.75, 1.33), antialias=True),
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1), shear=10),
        v2.ToDtype(torch.float32, scale=True),  # uint8 -> [0, 1]; float input passes unchanged
        v2.GaussianNoise(mean=0.0, sigma=0.05, clip=True),
    ])


CROP_MIN = 0.08  # SimCLR's smallest crop, as a fraction of the area: augment.crop_min's default


def natural_augment(size: Size, channels: int = 3, blur: bool = False, crop_min: float = CROP_MIN) -> v2.Transform:
    """SimCLR's augmentations for natural images (see the module docstring); ``crop_min`` is the
    smallest crop as a fraction of the image's area (SimCLR's 0.08; larger where the object is small)."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=(crop_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if channels == 3:
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    if blur:
        side = size if isinstance(size, int) else min(size)
        kernel = max(3, int(0.1 * side) // 2 * 2 + 1)  # odd, about a tenth of the side
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(steps)


def build_augment(preset: str, size: Size, channels: int = 3, blur: bool = False,
                  crop_min: float = CROP_MIN) -> v2.Transform:
    """The transform of ``augment.preset`` for ``[channels, *size]`` samples (an int size: square);
    ``blur`` and ``crop_min`` are the natural preset's (``augment.blur``, ``augment.crop_min``)."""
    if preset == "digits":
        return digits_augment(size)
    if preset == "natural":
        return natural_augment(size, channels, blur, crop_min)
    raise ValueError(f"augment.preset must be one of {', '.join(PRESETS)}, got {preset!r}")


def resolve_preset(preset: str, source_kind: str, channels: int) -> str:
    """``auto`` -> ``digits`` for the built-in digits (1 channel), ``natural`` for everything else."""
    if preset != "auto":
        return preset
    return "digits" if source_kind.startswith("builtin:digits") or channels == 1 else "natural"


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; float tensors unchanged.

    Shape:
        x: any shape -> the same shape.
    """
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def one_view(x: torch.Tensor, transform: Optional[v2.Transform]) -> torch.Tensor:
    """One augmented view of every sample, each drawn independently (``None``: no augmentation).

    Shape:
        x: ``[B, C, H, W]`` (uint8, or float in [0, 1]) -> ``[B, C, H', W']`` (see the presets for dtypes).
    """
    if transform is None:
        return x
    return torch.stack([transform(sample) for sample in x])


def two_views(x: torch.Tensor, transform: Optional[v2.Transform]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of every sample (shapes as :func:`one_view`)."""
    return one_view(x, transform), one_view(x, transform)
