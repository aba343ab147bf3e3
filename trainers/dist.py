"""Collective helpers for cross-rank negatives.

Every helper works as the identity when ``torch.distributed`` is not available or not
initialised (a single process, a unit test, the driver), so the loss code never branches on
"am I distributed?".

Gradient rules:

* :func:`gather` is differentiable. Forward: all-gather along dim 0. Backward: the incoming
  gradient (for the whole gathered tensor) is **summed over ranks** (all-reduce SUM) and this
  rank's slice is returned. Why: under data parallelism every rank r computes its own loss
  ``L_r`` from the gathered tensor, so the objective is ``sum_r L_r`` (DDP then averages the
  parameter gradients, i.e. optimises ``mean_r L_r``). The local input ``x_r`` appears in the
  gathered tensor of *every* rank, hence ``d(sum_r' L_r')/dx_r = sum_r' dL_r'/d(gathered)[slice r]``.
  Returning only the local gradient slice (as the naive autograd of ``all_gather`` would) drops
  the contributions of the other ranks' anchors; lightly shipped exactly that bug (issue #1528).
  With this rule, mean-over-ranks of the local losses has the same value and the same gradients
  as one process computing the loss on the global batch (tested in
  ``tests/losses/test_dist.py``).
* :func:`concat_all_gather` is **not** differentiable: it runs under ``torch.no_grad`` and
  returns a detached tensor. Use it for statistics (kernel widths, score estimators, queues).

All ranks must pass tensors of the same shape (use ``drop_last=True`` batching).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as torch_dist

F = TypeVar("F", bound=Callable[..., Any])


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group, 0 when not distributed."""
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return torch_dist.get_world_size() if is_distributed() else 1


def rank_zero_only(fn: F) -> F:
    """Decorator: run ``fn`` on rank 0 only; other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if rank() == 0 else None

    return wrapper  # type: ignore[return-value]


def _all_gather_cat(x: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


class _GatherWithSumBackward(torch.autograd.Function):
    """All-gather along dim 0; backward all-reduces (sums) and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.local_rows = x.shape[0]
        return _all_gather_cat(x, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        start = rank() * ctx.local_rows
        return grad[start : start + ctx.local_rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather of ``x`` along dim 0 (rank order).

    Backward rule: the gradient of the gathered tensor is summed over ranks (all-reduce SUM)
    and this rank's slice ``[rank * B, (rank + 1) * B)`` is returned; see the module docstring
    for why. Identity when not distributed.

    Args:
        x: local tensor, same shape on every rank.

    Shape:
        x: ``[B, ...]``; returns ``[world_size * B, ...]``.

    Complexity: O(world_size * x.numel()) communication and memory.
    """
    if world_size() == 1:
        return x
    return _GatherWithSumBackward.apply(x)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """All-gather ``x`` and concatenate along ``dim``, **without gradient** (detached output).

    Identity (detached) when not distributed.

    Args:
        x: local tensor, same shape on every rank.
        dim: dimension along which rank blocks are concatenated, in rank order.

    Shape:
        x: ``[..., B, ...]``; returns the same with ``world_size * B`` along ``dim``.
    """
    if world_size() == 1:
        return x.detach()
    return _all_gather_cat(x.detach(), dim=dim)
