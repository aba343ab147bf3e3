"""Encoders and projectors: the trainable parts of a Siamese contrastive model.

Both views go through the same :class:`SiameseNet` (shared weights). Its encoder output ``h`` is the
representation that is evaluated (kNN, linear probe); the projector output ``z`` is what the loss
sees and what the proximity graph is built from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A three-stage CNN for small images (8x8 digits up to 32x32).

    Shape:
        x: ``[B, C, H, W]`` -> ``[B, embed_dim]``.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, embed_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Projector(nn.Module):
    """SimCLR's MLP projector: Linear-BN-ReLU-Linear.

    Shape:
        h: ``[B, in_dim]`` -> ``[B, out_dim]``.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SiameseNet(nn.Module):
    """Encoder plus projector, shared by both views.

    Shape:
        x: ``[B, C, H, W]`` -> ``(h [B, embed_dim], z [B, proj_dim])``.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, embed_dim: int = 128,
                 proj_hidden: int = 256, proj_dim: int = 64):
        super().__init__()
        self.encoder = SmallCNN(in_channels, width, embed_dim)
        self.projector = Projector(embed_dim, proj_hidden, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.projector(h)


def build_model(model_cfg: dict[str, Any], in_channels: int) -> SiameseNet:
    """The model named by a ``model:`` config section (as a plain dict)."""
    return SiameseNet(in_channels=in_channels, width=model_cfg["width"], embed_dim=model_cfg["embed_dim"],
                      proj_hidden=model_cfg["proj_hidden"], proj_dim=model_cfg["proj_dim"])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (what checkpoints store)."""
    return getattr(model, "module", model)


def save_weights(model: nn.Module, path) -> None:
    torch.save(unwrap(model).state_dict(), path)


def load_weights(model: nn.Module, path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state)
    return model
