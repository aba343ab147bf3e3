"""Worker of tests/losses/test_dist.py: one gloo rank computing gathered losses on its slice.

Imported by the test (its folder is put on ``sys.path``, which ``torch.multiprocessing.spawn``
hands to the children), never collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from trainers import dist
from trainers.losses import bimodal_loss, info_nce, soft_target_info_nce, sscl_loss

GLOBAL_BATCH = 8
DIM = 5
CLASSES = 6


def global_inputs() -> dict[str, torch.Tensor]:
    """The global batch every rank (and the single-process reference) starts from."""
    gen = torch.Generator().manual_seed(1234)
    z_a = torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64)
    z_b = torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64)
    logits = torch.randn(GLOBAL_BATCH, CLASSES, generator=gen, dtype=torch.float64)
    targets = torch.softmax(torch.randn(GLOBAL_BATCH, CLASSES, generator=gen, dtype=torch.float64), 1)
    weights = torch.randn(GLOBAL_BATCH * 2, DIM, generator=gen, dtype=torch.float64)
    return {"z_a": z_a, "z_b": z_b, "logits": logits, "targets": targets, "weights": weights}


def two_view_cases(gather: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Losses of (z_a, z_b) with the cross-rank flag set to ``gather``."""
    return {
        "info_nce": lambda a, b: info_nce(a, b, 0.2, gather=gather),
        "sscl_hcl": lambda a, b: sscl_loss(a, b, 0.5, 0.1, 1.0, n_synthetic=0, gather=gather),
        # one hard parent: every synthetic negative is the (global) hardest negative, whatever
        # the random draws, so the result is deterministic
        "sscl_global_mining": lambda a, b: sscl_loss(
            a, b, 0.5, 0.1, 1.0, n_hard=1, n_synthetic=3, gather=gather, mine_global=True
        ),
        "clip_cosine": lambda a, b: bimodal_loss(a, b, "clip", "cosine", 0.3, gather=gather),
        "clip_l2": lambda a, b: bimodal_loss(a, b, "clip", "l2", 2.0, gather=gather),
        "v_given_u_inner": lambda a, b: bimodal_loss(a, b, "v_given_u", "inner", 1.0, gather=gather),
        "joint_cosine": lambda a, b: bimodal_loss(a, b, "joint", "cosine", 0.5, gather=gather),
    }


def run(local_rank: int, world: int, port: int, out_dir: str) -> None:
    """Entry point of ``torch.multiprocessing.spawn``: writes ``rank{r}.pt`` into ``out_dir``."""
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=world
    )
    try:
        inputs = global_inputs()
        b = GLOBAL_BATCH // world
        rows = slice(local_rank * b, (local_rank + 1) * b)
        result: dict[str, object] = {"rank": dist.rank(), "world_size": dist.world_size()}

        x = inputs["weights"][local_rank * 2 * b : (local_rank + 1) * 2 * b].clone().requires_grad_()
        gathered = dist.gather(x)
        coefficients = torch.arange(gathered.numel(), dtype=x.dtype).view_as(gathered) * (local_rank + 1)
        (gathered * coefficients).sum().backward()
        result["gather_value"] = gathered.detach()
        result["gather_grad"] = x.grad
        result["concat_all_gather"] = dist.concat_all_gather(x)
        result["concat_requires_grad"] = dist.concat_all_gather(x).requires_grad

        for name, fn in two_view_cases(gather=True).items():
            z_a = inputs["z_a"][rows].clone().requires_grad_()
            z_b = inputs["z_b"][rows].clone().requires_grad_()
            loss = fn(z_a, z_b)
            loss.backward()
            result[name] = (loss.detach(), z_a.grad, z_b.grad)

        logits = inputs["logits"][rows].clone().requires_grad_()
        loss = soft_target_info_nce(logits, inputs["targets"][rows], temperature=0.7, gather=True)
        loss.backward()
        result["soft_infonce"] = (loss.detach(), logits.grad)
        torch.save(result, Path(out_dir) / f"rank{local_rank}.pt")
    finally:
        torch_dist.destroy_process_group()
