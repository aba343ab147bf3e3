"""The trainable networks: encoders, projectors, and the three shapes a loss is trained in.

=================  =====================  ==================================================
kind               network                what the loss sees
=================  =====================  ==================================================
``siamese``/``ema`` :class:`SiameseNet`    projections of two views through shared weights
``classifier``     :class:`ClassifierNet` class logits (soft-target InfoNCE's conditional model)
``bimodal``        :class:`BimodalNet`    the u tower's and the v tower's projections
=================  =====================  ==================================================

Every network has ``encode(x) -> (h, z)`` for its first input (the images, or u): ``h`` is the
representation that is evaluated (kNN, linear probe), ``z`` the loss-space output; and
``graph_embedding(x)``, the (unnormalised) vectors the proximity graph is built from. A *network
spec* (:func:`network_spec`) is the plain dict that rebuilds a network anywhere (train workers,
embedding actors).
"""

from __future__ import annotations

from typing import Any, Optional

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
    """SimCLR's MLP projector: Linear-BN-ReLU-Linear (also the encoder of vector samples).

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

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x)

    def graph_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The projection: the space the loss compares views in, so hardness is measured there."""
        return self(x)[1]


def _encoder(shape: tuple[int, ...], model_cfg: dict[str, Any]) -> nn.Module:
    """A CNN for ``(C, H, W)`` samples, an MLP for ``(d,)`` vectors."""
    if len(shape) == 3:
        return SmallCNN(shape[0], model_cfg["width"], model_cfg["embed_dim"])
    if len(shape) == 1:  # vectors: the projector's Linear-BN-ReLU-Linear block as the encoder
        return Projector(shape[0], model_cfg["proj_hidden"], model_cfg["embed_dim"])
    raise ValueError(f"samples must be images (C, H, W) or vectors (d,), got shape {shape}")


class Tower(nn.Module):
    """Encoder plus projector for one modality.

    Shape:
        x: ``[B, *shape]`` -> ``(h [B, embed_dim], z [B, proj_dim])``.
    """

    def __init__(self, shape: tuple[int, ...], model_cfg: dict[str, Any]):
        super().__init__()
        self.encoder = _encoder(tuple(shape), model_cfg)
        self.projector = Projector(model_cfg["embed_dim"], model_cfg["proj_hidden"], model_cfg["proj_dim"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.projector(h)


class ClassifierNet(nn.Module):
    """Encoder plus a linear head over classes: the conditional model of soft-target InfoNCE.

    The head's rows are the class embeddings ``w_c`` (ALGORITHMS.md 1.4), so a soft target's
    embedding is the probability-weighted mean of the rows.

    Shape:
        x: ``[B, C, H, W]`` -> ``(h [B, embed_dim], logits [B, num_classes])``.
    """

    def __init__(self, shape: tuple[int, ...], model_cfg: dict[str, Any], num_classes: int):
        super().__init__()
        self.encoder = _encoder(tuple(shape), model_cfg)
        self.head = nn.Linear(model_cfg["embed_dim"], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.head(h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x)

    def graph_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features: samples the classifier finds alike are each other's neighbours."""
        return self.encoder(x)


class BimodalNet(nn.Module):
    """Two towers, one per modality, meeting in a shared ``proj_dim`` space.

    Shape:
        u: ``[B, *u_shape]``, v: ``[B, *v_shape]`` -> ``(z_u [B, proj_dim], z_v [B, proj_dim])``.
    """

    def __init__(self, u_shape: tuple[int, ...], v_shape: tuple[int, ...], model_cfg: dict[str, Any]):
        super().__init__()
        self.u_tower = Tower(u_shape, model_cfg)
        self.v_tower = Tower(v_shape, model_cfg)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u_tower(u)[1], self.v_tower(v)[1]

    def encode(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u_tower(u)

    def encode_v(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.v_tower(v)

    def graph_embedding(self, u: torch.Tensor) -> torch.Tensor:
        """The u tower's projection: the graph's nodes are pairs, compared by their u side."""
        return self.u_tower(u)[1]


def network_spec(kind: str, model_cfg: dict[str, Any], x_shape: tuple[int, ...],
                 v_shape: Optional[tuple[int, ...]] = None, num_classes: Optional[int] = None) -> dict[str, Any]:
    """The plain dict :func:`build_network` rebuilds a network from (picklable, loggable).

    Args:
        kind: ``siamese``, ``ema``, ``classifier`` or ``bimodal`` (``LossConfig.kind``).
        model_cfg: the ``model:`` config section.
        x_shape: shape of one sample of the first input (images or u).
        v_shape: shape of one v sample (``bimodal``).
        num_classes: classes of the head (``classifier``).
    """
    if kind == "bimodal" and v_shape is None:
        raise ValueError("a bimodal network needs v_shape")
    if kind == "classifier" and not num_classes:
        raise ValueError("a classifier network needs num_classes")
    return {"kind": kind, "model": dict(model_cfg), "x_shape": tuple(int(d) for d in x_shape),
            "v_shape": None if v_shape is None else tuple(int(d) for d in v_shape), "num_classes": num_classes}


def build_network(spec: dict[str, Any]) -> nn.Module:
    """The network described by a :func:`network_spec` dict."""
    kind, model_cfg = spec["kind"], spec["model"]
    if kind in ("siamese", "ema"):
        if len(spec["x_shape"]) != 3:
            raise ValueError(f"a Siamese network takes images (C, H, W), got samples of shape {spec['x_shape']}")
        return build_model(model_cfg, spec["x_shape"][0])
    if kind == "classifier":
        return ClassifierNet(spec["x_shape"], model_cfg, spec["num_classes"])
    if kind == "bimodal":
        return BimodalNet(spec["x_shape"], spec["v_shape"], model_cfg)
    raise ValueError(f"network kind must be siamese, ema, classifier or bimodal, got {kind!r}")


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
