"""trainers.dist and cross-rank losses: two gloo processes with gather == one process, global batch."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainers import dist
from trainers.losses import soft_target_info_nce

sys.path.insert(0, str(Path(__file__).parent))
import losses_dist_worker as worker  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker.run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_helpers_are_identity_without_process_group() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert dist.rank() == 0 and dist.world_size() == 1 and not dist.is_distributed()
    assert dist.gather(x) is x
    gathered = dist.concat_all_gather(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert dist.rank_zero_only(lambda: 7)() == 7


def test_ranks_and_world_size(ranks: list[dict]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == WORLD for r in ranks)


def test_gather_forward_and_sum_backward(ranks: list[dict]) -> None:
    full = worker.global_inputs()["weights"]
    rows = full.shape[0] // WORLD
    base = torch.arange(full.numel(), dtype=full.dtype).view_as(full)
    for r, result in enumerate(ranks):
        assert torch.equal(result["gather_value"], full)
        assert torch.equal(result["concat_all_gather"], full)
        assert result["concat_requires_grad"] is False
        # rank r' multiplies the gathered tensor by (r' + 1) * base: the gradient reaching x_r is
        # the sum over ranks of their coefficients on slice r.
        expected = sum(base * (k + 1) for k in range(WORLD))[r * rows : (r + 1) * rows]
        assert torch.allclose(result["gather_grad"], expected)


@pytest.mark.parametrize("name", list(worker.two_view_cases(gather=False)))
def test_two_view_losses_match_single_process(ranks: list[dict], name: str) -> None:
    inputs = worker.global_inputs()
    z_a = inputs["z_a"].clone().requires_grad_()
    z_b = inputs["z_b"].clone().requires_grad_()
    loss = worker.two_view_cases(gather=False)[name](z_a, z_b)
    loss.backward()
    distributed_loss = torch.stack([r[name][0] for r in ranks]).mean()
    grad_a = torch.cat([r[name][1] for r in ranks]) / WORLD
    grad_b = torch.cat([r[name][2] for r in ranks]) / WORLD
    # the same float64 operations with the reductions split over two ranks (scores <= ~10, 2WB terms):
    # ~(D + log2 2WB) eps |values| ~ 1e-14 apart
    assert torch.allclose(distributed_loss, loss.detach(), atol=1e-12)
    assert torch.allclose(grad_a, z_a.grad, atol=1e-12)
    assert torch.allclose(grad_b, z_b.grad, atol=1e-12)
    if name.startswith("joint"):
        # the joint loss needs all pairs: every rank computes the global value
        assert all(torch.allclose(r[name][0], loss.detach(), atol=1e-12) for r in ranks)
    else:
        # the local losses differ from the global one: the gather is what makes the mean agree
        assert not torch.allclose(ranks[0][name][0], loss.detach())


def test_soft_target_gathers_targets(ranks: list[dict]) -> None:
    inputs = worker.global_inputs()
    logits = inputs["logits"].clone().requires_grad_()
    loss = soft_target_info_nce(logits, inputs["targets"], temperature=0.7)
    loss.backward()
    distributed_loss = torch.stack([r["soft_infonce"][0] for r in ranks]).mean()
    grad = torch.cat([r["soft_infonce"][1] for r in ranks]) / WORLD
    # float64, one LSE split over two ranks: ~1e-15 apart
    assert torch.allclose(distributed_loss, loss.detach(), atol=1e-12)
    assert torch.allclose(grad, logits.grad, atol=1e-12)


def test_soft_target_offset_emulates_ranks() -> None:
    inputs = worker.global_inputs()
    logits, targets = inputs["logits"], inputs["targets"]
    n = logits.shape[0] // WORLD
    per_rank = [
        soft_target_info_nce(logits[r * n : (r + 1) * n], targets, temperature=0.7, offset=r * n)
        for r in range(WORLD)
    ]
    full = soft_target_info_nce(logits, targets, temperature=0.7)
    # float64 means of the same per-row terms, taken in another order: ~1e-15 apart
    assert torch.allclose(torch.stack(per_rank).mean(), full, atol=1e-12)
