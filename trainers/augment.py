"""Two random views of every sample, with torchvision v2 transforms.

torchvision v2 applies *one* set of random parameters to a whole batched tensor, so the views are
drawn per sample. Randomness comes from torch's global generator, which each worker seeds from
``(train.seed, rank)``.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def digits_augment(size: int = 8) -> v2.Transform:
    """Augmentations for small grey-scale glyphs: crop-and-resize, affine jitter, pixel noise.

    No flips: a mirrored digit is another glyph (or none).
    """
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.75, 1.33), antialias=True),
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1), shear=10),
        v2.GaussianNoise(mean=0.0, sigma=0.05, clip=True),
    ])


def one_view(x: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    """One augmented view of every sample, each drawn independently.

    Shape:
        x: ``[B, C, H, W]`` float in [0, 1] -> a tensor of the same shape.
    """
    return torch.stack([transform(sample) for sample in x])


def two_views(x: torch.Tensor, transform: v2.Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of every sample (shapes as :func:`one_view`)."""
    return one_view(x, transform), one_view(x, transform)
