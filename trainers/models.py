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
embedding actors, a fresh process loading a checkpoint: :func:`save_network` writes it beside the
weights as ``network.json``).

Image encoders (``model.backbone``, :data:`BACKBONES`):

=============  ===============  ==============================================================
backbone       feature width    images it takes
=============  ===============  ==============================================================
``small_cnn``  ``embed_dim``    any size (three conv stages; 8x8 digits up to about 64 px)
``resnet18``   512              torchvision's, random init; >= 32 px, or any size with the CIFAR stem
``resnet50``   2048             as resnet18
``vit_b_16``   768              torchvision's ViT-B/16; square sides that are a multiple of 16
=============  ===============  ==============================================================

The CIFAR stem (``model.cifar_stem``, on by default for images of 64 px or less) replaces a ResNet's
7x7 stride-2 first convolution and its max-pool by one 3x3 stride-1 convolution (SimCLR's CIFAR
variant), so a 32x32 image still has a 4x4 map at the last stage. A backbone takes any number of
input channels (its first layer is built for them). The representation ``h`` is the backbone's
pooled feature (torchvision's classifier head removed).

The trained encoder as a product is :class:`Encoder`: images as float32 ``[B, C, H, W]`` in [0, 1]
(pixels / 255, no mean/std normalisation: the networks are trained from scratch on exactly that)
to ``h``; :func:`encoder_card` describes its input and output for exported files.
"""

from __future__ import annotations

from typing import Any, Optional

import json
from pathlib import Path

import torch
from torch import nn

BACKBONES = ("small_cnn", "resnet18", "resnet50", "vit_b_16")
# Feature width of the torchvision backbones (their pooled output, classifier head removed).
BACKBONE_WIDTH = {"resnet18": 512, "resnet50": 2048, "vit_b_16": 768}
CIFAR_STEM_MAX_SIDE = 64  # model.cifar_stem's default: on for images this small or smaller
NETWORK_FILE = "network.json"  # the network spec, beside the weights


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
                 proj_hidden: int = 256, proj_dim: int = 64, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else SmallCNN(in_channels, width, embed_dim)
        self.projector = Projector(embed_dim, proj_hidden, proj_dim)

    @classmethod
    def from_config(cls, model_cfg: dict[str, Any], shape: tuple[int, ...]) -> "SiameseNet":
        """The network of a ``model:`` section for images of ``shape = (C, H, W)``."""
        cfg = resolve_model(model_cfg, shape)
        return cls(embed_dim=cfg["embed_dim"], proj_hidden=cfg["proj_hidden"], proj_dim=cfg["proj_dim"],
                   encoder=image_backbone(cfg, shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.projector(h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x)

    def graph_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The projection: the space the loss compares views in, so hardness is measured there."""
        return self(x)[1]


def _encoder(shape: tuple[int, ...], model_cfg: dict[str, Any]) -> nn.Module:
    """The model's backbone for ``(C, H, W)`` samples, an MLP for ``(d,)`` vectors."""
    if len(shape) == 3:
        return image_backbone(model_cfg, shape)
    if len(shape) == 1:  # vectors: the projector's Linear-BN-ReLU-Linear block as the encoder
        return Projector(shape[0], model_cfg["proj_hidden"], model_cfg["embed_dim"])
    raise ValueError(f"samples must be images (C, H, W) or vectors (d,), got shape {shape}")


def backbone_problem(backbone: str, side_hw: tuple[int, int], cifar_stem: Optional[bool] = None) -> Optional[str]:
    """Why ``backbone`` cannot take images of ``(H, W)`` pixels (with the CIFAR stem as given), or
    ``None`` when it can. The text completes "model.backbone = X ...".
    """
    h, w = side_hw
    if backbone not in BACKBONES:
        return f"is not a backbone (allowed: {', '.join(BACKBONES)})"
    if backbone == "vit_b_16":
        if h != w or h % 16:
            return (f"takes square images whose side is a multiple of 16 (its 16x16 patches), got {h}x{w} "
                    f"(set data.image_size to 32, 48, 64, ... or 224)")
    if backbone.startswith("resnet") and cifar_stem is False and min(h, w) < 32:
        return (f"without the CIFAR stem shrinks {h}x{w} images 32-fold to nothing "
                f"(take model.cifar_stem = true, or images of 32 px or more)")
    return None


def config_problem(model_cfg: dict[str, Any]) -> Optional[str]:
    """What is wrong with a ``model:`` section of image data whatever the image size, in one line naming
    the field, or ``None``: an ``embed_dim`` other than a torchvision backbone's fixed width, a CIFAR stem
    on a backbone without one."""
    backbone = model_cfg.get("backbone") or "small_cnn"
    fixed, embed_dim = BACKBONE_WIDTH.get(backbone), model_cfg.get("embed_dim")
    if fixed is not None and embed_dim is not None and embed_dim != fixed:
        return (f"model.embed_dim = {embed_dim}: model.backbone = {backbone!r} gives {fixed} features "
                f"(leave model.embed_dim unset)")
    if model_cfg.get("cifar_stem") and not backbone.startswith("resnet"):
        return (f"model.cifar_stem = true: model.backbone = {backbone!r} has no CIFAR stem "
                f"(it applies to resnet18 and resnet50)")
    return None


def image_backbone(model_cfg: dict[str, Any], shape: tuple[int, ...]) -> nn.Module:
    """The image encoder ``model_cfg`` names, for samples of ``shape = (C, H, W)``: ``[B, C, H, W] -> [B, D]``
    with ``D`` = :func:`feature_width`. torchvision backbones start from random weights."""
    backbone = model_cfg.get("backbone") or "small_cnn"
    channels, h, w = (int(d) for d in shape)
    stem = model_cfg.get("cifar_stem")
    problem = backbone_problem(backbone, (h, w), stem)
    if problem:
        raise ValueError(f"model.backbone = {backbone!r} {problem}")
    if backbone == "small_cnn":
        return SmallCNN(channels, model_cfg["width"], model_cfg["embed_dim"])
    import torchvision.models as tvm

    if backbone == "vit_b_16":
        net = tvm.vit_b_16(weights=None, image_size=h)
        if channels != 3:
            old = net.conv_proj
            net.conv_proj = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride)
        net.heads = nn.Identity()
        return net
    net = getattr(tvm, backbone)(weights=None)
    if stem if stem is not None else max(h, w) <= CIFAR_STEM_MAX_SIDE:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


def feature_width(model_cfg: dict[str, Any]) -> int:
    """Width of the representation ``h`` an image backbone gives: ``embed_dim`` for ``small_cnn``,
    the fixed width of a torchvision backbone otherwise."""
    backbone = model_cfg.get("backbone") or "small_cnn"
    return BACKBONE_WIDTH.get(backbone) or int(model_cfg["embed_dim"])


def resolve_model(model_cfg: dict[str, Any], x_shape: tuple[int, ...]) -> dict[str, Any]:
    """The ``model:`` section with every size filled in for samples of ``x_shape``.

    ``embed_dim``: a torchvision backbone's feature width (another value is refused), else the
    configured value (default 128). ``proj_hidden``: the feature width for a torchvision backbone
    (SimCLR's projector), twice ``embed_dim`` otherwise. ``cifar_stem``: on for images of
    :data:`CIFAR_STEM_MAX_SIDE` px or less (ResNets only).
    """
    out = {"backbone": "small_cnn", "width": 32, "embed_dim": None, "proj_hidden": None, "proj_dim": 64,
           "cifar_stem": None, **model_cfg}
    backbone = out["backbone"] or "small_cnn"
    if backbone not in BACKBONES:
        raise ValueError(f"model.backbone = {backbone!r} is not a backbone (allowed: {', '.join(BACKBONES)})")
    images = len(x_shape) == 3
    fixed = BACKBONE_WIDTH.get(backbone) if images else None
    problem = config_problem(out) if images else None
    if problem:
        raise ValueError(problem)
    out["embed_dim"] = int(fixed or out["embed_dim"] or 128)
    out["proj_hidden"] = int(out["proj_hidden"] or (fixed or 2 * out["embed_dim"]))
    if images:
        problem = backbone_problem(backbone, tuple(int(d) for d in x_shape[1:]), out["cifar_stem"])
        if problem:
            raise ValueError(f"model.backbone = {backbone!r} {problem}")
        if backbone.startswith("resnet") and out["cifar_stem"] is None:
            out["cifar_stem"] = max(int(d) for d in x_shape[1:]) <= CIFAR_STEM_MAX_SIDE
    return out


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
    return {"kind": kind, "model": resolve_model(dict(model_cfg), tuple(x_shape)),
            "x_shape": tuple(int(d) for d in x_shape),
            "v_shape": None if v_shape is None else tuple(int(d) for d in v_shape), "num_classes": num_classes}


def build_network(spec: dict[str, Any]) -> nn.Module:
    """The network described by a :func:`network_spec` dict."""
    kind, model_cfg = spec["kind"], spec["model"]
    if kind in ("siamese", "ema"):
        if len(spec["x_shape"]) != 3:
            raise ValueError(f"a Siamese network takes images (C, H, W), got samples of shape {spec['x_shape']}")
        return SiameseNet.from_config(model_cfg, tuple(spec["x_shape"]))
    if kind == "classifier":
        return ClassifierNet(spec["x_shape"], model_cfg, spec["num_classes"])
    if kind == "bimodal":
        return BimodalNet(spec["x_shape"], spec["v_shape"], model_cfg)
    raise ValueError(f"network kind must be siamese, ema, classifier or bimodal, got {kind!r}")


def build_model(model_cfg: dict[str, Any], in_channels: int, side: int = 8) -> SiameseNet:
    """The Siamese network a ``model:`` section (a plain dict) names, for ``side`` x ``side`` images."""
    return SiameseNet.from_config(model_cfg, (in_channels, side, side))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP and ``torch.compile`` wrappers (what checkpoints store)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_weights(model: nn.Module, path) -> None:
    """The bare module's weights, moved to the CPU: a file any process loads, with or without a GPU
    (``torch.compile``'s wrapper prefix removed too)."""
    torch.save(cpu_state(model), path)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` of the bare module (no DDP or ``torch.compile`` wrapper) with every tensor on the CPU."""
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def save_network(model: nn.Module, spec: dict[str, Any], directory) -> None:
    """``model.pt`` (CPU weights) and ``network.json`` (its spec) in ``directory``: all
    :func:`load_network` needs, in any process."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / "model.pt")
    (directory / NETWORK_FILE).write_text(json.dumps(spec, indent=1))


def load_network(directory, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network saved by :func:`save_network` in ``directory`` and its spec, in eval mode."""
    directory = Path(directory)
    spec_file = directory / NETWORK_FILE
    if not spec_file.exists():
        raise FileNotFoundError(f"{directory} has no {NETWORK_FILE}: not a hardbatch checkpoint")
    spec = json.loads(spec_file.read_text())
    spec["x_shape"] = tuple(spec["x_shape"])
    spec["v_shape"] = None if spec.get("v_shape") is None else tuple(spec["v_shape"])
    net = build_network(spec)
    net.load_state_dict(torch.load(directory / "model.pt", map_location=map_location, weights_only=True))
    return net.eval(), spec


class Encoder(nn.Module):
    """The trained representation as a stand-alone module: ``x -> h``, the features evaluated by kNN
    and the linear probe (no projector, no head).

    Input: images as float32 ``[B, C, H, W]`` with pixels / 255 in [0, 1] (or vectors ``[B, d]`` for a
    vector u side); :func:`encoder_card` says which.

    Shape:
        x: ``[B, *x_shape]`` -> ``[B, embed_dim]``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        net = unwrap(net)
        self.encoder = net.u_tower.encoder if isinstance(net, BimodalNet) else net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def encoder_card(spec: dict[str, Any]) -> dict[str, Any]:
    """What :class:`Encoder` takes and gives, as plain JSON: input shape, dtype and scaling, output width."""
    shape = [int(d) for d in spec["x_shape"]]
    images = len(shape) == 3
    model = spec["model"]
    return {"input": {"shape": shape, "dtype": "float32", "layout": "NCHW" if images else "ND",
                      "scaling": "pixel / 255, in [0, 1]; no mean/std normalisation" if images else "none"},
            "embedding_dim": feature_width(model) if images else int(model["embed_dim"]),
            "backbone": model.get("backbone", "small_cnn") if images else "mlp",
            "network_kind": spec["kind"]}


def load_weights(model: nn.Module, path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state)
    return model
