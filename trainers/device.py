"""The device and precision of a training step, with no Ray: what the worker loop (:mod:`trainers.loop`)
and the GPU tests share.

The device is always an argument (the one Ray Train gives the worker: ``ray.train.torch.get_device()``),
never a global, so the CPU suite runs the same code the GPU path does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def mean_across_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks, reduced on ``device``: the worker's own device, since NCCL
    takes CUDA tensors only and gloo CPU ones. ``value`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def prepare_network(task, train_cfg: dict[str, Any], prepare=None) -> torch.nn.Module:
    """The task's fresh network, in NHWC layout when ``train.channels_last``, passed through ``prepare``
    (Ray Train's ``prepare_model``: to the worker's device, DDP-wrapped), then ``torch.compile``d when
    ``train.compile``. ``prepare`` defaults to moving nothing (tests, one process)."""
    model = task.build()
    if train_cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if prepare is not None:
        model = prepare(model)
    if train_cfg.get("compile"):
        model = torch.compile(model)
    return model


class Stepper:
    """One optimiser step of a loss, in the run's precision: a plain backward and step in fp32 and bf16,
    a gradient scaler for fp16 (whose small exponent range underflows unscaled gradients). The scaler's
    state goes into checkpoints (``scaler.pt``) so a resumed fp16 run keeps its scale."""

    FILE = "scaler.pt"

    def __init__(self, optimizer: torch.optim.Optimizer, precision: str, device: torch.device):
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def save(self, directory: Path) -> None:
        if self.scaler.is_enabled():
            torch.save(self.scaler.state_dict(), Path(directory, self.FILE))

    def load(self, directory: Path) -> None:
        path = Path(directory, self.FILE)
        if self.scaler.is_enabled() and path.exists():
            self.scaler.load_state_dict(torch.load(path, weights_only=True))
