"""SSCL / HCL / DCL: hand examples, reductions, NumPy reference, synthetic-negative invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.losses import (
    MIXINGS,
    SSCLLoss,
    info_nce,
    log_weighted_negatives,
    importance_weights,
    sscl_loss,
    synthetic_negatives,
)


def np_sscl(z_a, z_b, t, tau_plus, beta, syn=None) -> float:
    """DCL/HCL/SSCL from the formulas of ALGORITHMS.md 2.2, one anchor at a time.

    ``syn`` ([2B, S, D] unit vectors) are constants, as the detached synthetic negatives are.
    """
    o = np.concatenate([z_a, z_b])
    o = o / np.linalg.norm(o, axis=1, keepdims=True)
    n, half = o.shape[0], o.shape[0] // 2
    total = 0.0
    for a in range(n):
        p = (a + half) % n
        negatives = [o[b] for b in range(n) if b not in (a, p)]
        if syn is not None:
            negatives += list(syn[a])
        s = np.array([o[a] @ v / t for v in negatives])
        pos = np.exp(o[a] @ o[p] / t)
        e = np.exp(s)
        w = np.exp(beta * s) / np.mean(np.exp(beta * s))
        r = np.sum(w * e)
        n_neg = len(s)
        g = max((r - tau_plus * n_neg * pos) / (1 - tau_plus), n_neg * np.exp(-1 / t))
        total += -np.log(pos / (pos + g))
    return total / n


def np_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


def _unit_pair(seed: int, batch: int = 6, dim: int = 8, cone: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, batch, dim, dtype=torch.float64, generator=gen) + cone
    return z[0], z[1]


# ---------------------------------------------------------------- hand examples (ALGORITHMS 2.8)
def test_hand_example_nt_xent_dcl_hcl() -> None:
    eye = torch.eye(2, dtype=torch.float64)
    nt_xent = sscl_loss(eye, eye, 0.5, tau_plus=0.0, beta=0.0, n_synthetic=0)
    dcl = sscl_loss(eye, eye, 0.5, tau_plus=0.1, beta=0.0, n_synthetic=0)
    # the constants are rounded to 10 decimals (5e-11); the loss itself, on exact 0/1 cosines, to a few eps
    assert nt_xent.item() == pytest.approx(0.2395447662, abs=1e-9)
    assert nt_xent.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-12)
    assert dcl.item() == pytest.approx(0.0755923750, abs=1e-9)
    for beta in (0.5, 1.0, 4.0):
        hcl = sscl_loss(eye, eye, 0.5, tau_plus=0.1, beta=beta, n_synthetic=0)
        assert hcl.item() == pytest.approx(0.0755923750, abs=1e-9)


def test_floor_is_active_and_stops_negative_gradients() -> None:
    # tau_plus = 0.9 with aligned views: R - tau_plus N pos < 0, so G = N e^{-1/t} (constant).
    eye = torch.eye(3, dtype=torch.float64)
    z_b = eye.clone().requires_grad_()
    loss = sscl_loss(eye, z_b, 0.5, tau_plus=0.9, beta=1.0, n_synthetic=0)
    expected = math.log(1 + 4 * math.exp(-2) / math.exp(2))
    assert loss.item() == pytest.approx(expected, abs=1e-12)  # exact 0/1 cosines: a few eps of exp / log
    # aligned positives have zero tangential gradient, so only the negatives could move z_b
    # ((I - z z^T) g with z.g exact: zero up to eps |g| ~ 1e-16, far below allclose's atol 1e-8)
    loss.backward()
    assert torch.allclose(z_b.grad, torch.zeros_like(z_b))
    z_free = eye.clone().requires_grad_()
    sscl_loss(eye, z_free, 0.5, tau_plus=0.1, beta=1.0, n_synthetic=0).backward()
    assert z_free.grad.abs().max() > 1e-3


# ---------------------------------------------------------------- reductions (ALGORITHMS 2.7)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_reduces_to_info_nce(temperature: float) -> None:
    z_a, z_b = _unit_pair(0)
    loss = sscl_loss(z_a, z_b, temperature, tau_plus=0.0, beta=0.0, n_synthetic=0)
    # two float64 formulas of one value, logits <= 1/t = 10: they differ by ~(D + 2B) eps / t ~ 1e-14
    assert torch.allclose(loss, info_nce(z_a, z_b, temperature), atol=1e-12)


def test_reduces_to_cross_entropy_over_pos_and_negs() -> None:
    z_a, z_b = _unit_pair(1)
    o = F.normalize(torch.cat([z_a, z_b]), dim=1)
    n, half = o.shape[0], o.shape[0] // 2
    sim = o @ o.T / 0.5
    pos = torch.cat([torch.arange(half, n), torch.arange(half)])
    keep = ~torch.eye(n, dtype=torch.bool)
    keep[torch.arange(n), pos] = False
    logits = torch.cat([sim[torch.arange(n), pos][:, None], sim[keep].view(n, n - 2)], dim=1)
    expected = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    loss = sscl_loss(z_a, z_b, 0.5, tau_plus=0.0, beta=0.0, n_synthetic=0)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)  # float64, logits <= 2: ~1e-15 apart


@pytest.mark.parametrize(
    "tau_plus,beta,temperature", [(0.1, 0.0, 0.5), (0.05, 1.0, 0.5), (0.1, 2.0, 0.3), (0.0, 0.7, 1.0)]
)
def test_dcl_and_hcl_match_numpy_value_and_gradient(tau_plus: float, beta: float, temperature: float) -> None:
    rng = np.random.default_rng(int(beta * 10 + tau_plus * 100))
    z_a, z_b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    ta = torch.tensor(z_a, requires_grad=True)
    tb = torch.tensor(z_b, requires_grad=True)
    loss = sscl_loss(ta, tb, temperature, tau_plus, beta, n_synthetic=0)
    loss.backward()
    # float64 logits <= 1/t from D-term dot products: each side rounds by ~(D + 2B) eps / t ~ 1e-14
    assert loss.item() == pytest.approx(np_sscl(z_a, z_b, temperature, tau_plus, beta), abs=1e-10)
    ga = np_grad(lambda x: np_sscl(x, z_b, temperature, tau_plus, beta), z_a)
    gb = np_grad(lambda x: np_sscl(z_a, x, temperature, tau_plus, beta), z_b)
    # central differences, h = 1e-6: truncation h^2 |f'''| / 6 plus rounding ~1e-14 / h, ~1e-8
    assert np.allclose(ta.grad.numpy(), ga, atol=1e-7)
    assert np.allclose(tb.grad.numpy(), gb, atol=1e-7)


def test_gradcheck_hcl() -> None:
    z_a, z_b = _unit_pair(2, batch=3, dim=4)
    z_a.requires_grad_()
    z_b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: sscl_loss(a, b, 0.5, 0.1, 1.0, n_synthetic=0), (z_a, z_b)
    )


@pytest.mark.parametrize("mixing", MIXINGS)
def test_full_sscl_matches_numpy_with_the_same_synthetic_negatives(mixing: str) -> None:
    rng = np.random.default_rng(7)
    z_a, z_b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    args = dict(n_synthetic=6, n_hard=3, mixing=mixing)
    syn = synthetic_negatives(torch.tensor(z_a), torch.tensor(z_b), generator=torch.Generator().manual_seed(5), **args)
    ta = torch.tensor(z_a, requires_grad=True)
    tb = torch.tensor(z_b, requires_grad=True)
    loss = sscl_loss(ta, tb, 0.4, 0.1, 1.0, generator=torch.Generator().manual_seed(5), **args)
    loss.backward()
    syn = syn.numpy()
    # float64, logits <= 1/0.4: each side rounds by ~1e-15; finite differences below are good to ~1e-8
    assert loss.item() == pytest.approx(np_sscl(z_a, z_b, 0.4, 0.1, 1.0, syn), abs=1e-10)
    # the synthetic negatives are constants (detached) for the gradient
    ga = np_grad(lambda x: np_sscl(x, z_b, 0.4, 0.1, 1.0, syn), z_a)
    gb = np_grad(lambda x: np_sscl(z_a, x, 0.4, 0.1, 1.0, syn), z_b)
    assert np.allclose(ta.grad.numpy(), ga, atol=1e-7)
    assert np.allclose(tb.grad.numpy(), gb, atol=1e-7)


def test_synthetic_negatives_add_hard_terms() -> None:
    z_a, z_b = _unit_pair(3, batch=8, dim=6)
    hcl = sscl_loss(z_a, z_b, 0.5, 0.1, 1.0, n_synthetic=0)
    sscl = sscl_loss(z_a, z_b, 0.5, 0.1, 1.0, n_hard=4, n_synthetic=16, generator=torch.Generator().manual_seed(0))
    assert sscl.item() > hcl.item()


# ---------------------------------------------------------------- synthetic-negative invariants
def test_synthetic_negatives_are_unit_detached_and_harder_than_the_hard_threshold() -> None:
    z_a, z_b = _unit_pair(4, batch=10, dim=5, cone=2.0)  # every cosine > 0
    z_a.requires_grad_()
    n_hard = 4
    syn = synthetic_negatives(z_a, z_b, 16, n_hard, "hard", torch.Generator().manual_seed(1))
    assert syn.shape == (20, 16, 5) and not syn.requires_grad
    assert torch.allclose(syn.norm(dim=-1), torch.ones(20, 16, dtype=torch.float64))
    o = F.normalize(torch.cat([z_a, z_b]).detach(), dim=1)
    sim = o @ o.T
    n = o.shape[0]
    sim[torch.arange(n), torch.arange(n)] = -2.0
    sim[torch.arange(n), (torch.arange(n) + n // 2) % n] = -2.0
    threshold = sim.topk(n_hard, dim=1).values[:, -1]
    assert bool((threshold > 0).all())
    syn_cos = torch.einsum("ad,asd->as", o, syn)
    # equality is reached when a mix is its parent; both cosines then round by ~(D + 2) eps ~ 2e-15
    assert bool((syn_cos >= threshold[:, None] - 1e-12).all())


def test_identical_parents_give_the_parent_and_hard_set_excludes_the_positive() -> None:
    gen = torch.Generator().manual_seed(5)
    z_a = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    z_b = z_a + 1e-3 * torch.randn(6, 4, dtype=torch.float64, generator=gen)  # positive is nearest
    o = F.normalize(torch.cat([z_a, z_b]), dim=1)
    syn = synthetic_negatives(z_a, z_b, 5, 1, "hard", torch.Generator().manual_seed(0))
    n = o.shape[0]
    sim = o @ o.T
    sim[torch.arange(n), torch.arange(n)] = -2.0
    positive = (torch.arange(n) + n // 2) % n
    sim[torch.arange(n), positive] = -2.0
    hardest = o[sim.argmax(dim=1)]
    # a mix of two copies of a unit row, renormalised: a few eps from the row
    assert torch.allclose(syn, hardest[:, None, :].expand_as(syn), atol=1e-12)
    assert not torch.allclose(syn[:, 0], o[positive], atol=1e-2)


def test_duplicate_mixing_returns_hard_parents() -> None:
    z_a, z_b = _unit_pair(6, batch=5, dim=3)
    o = F.normalize(torch.cat([z_a, z_b]), dim=1)
    syn = synthetic_negatives(z_a, z_b, 7, 3, "duplicate", torch.Generator().manual_seed(2))
    # exact differences: the default |x|^2 + |y|^2 - 2 x.y form rounds to sqrt(eps) ~ 1e-8 for equal rows
    distance = torch.cdist(syn.reshape(-1, 3), o, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    # a copy of a unit row, renormalised: a few eps away (1e-12 leaves a 1e3 margin)
    assert torch.allclose(distance, torch.zeros_like(distance), atol=1e-12)


# ---------------------------------------------------------------- HCL weights
def test_weights_average_one_and_large_beta_keeps_the_hardest() -> None:
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(5, 9, dtype=torch.float64, generator=gen)
    w = importance_weights(s, 1.3)
    assert torch.allclose(w.mean(dim=1), torch.ones(5, dtype=torch.float64))
    r = torch.exp(log_weighted_negatives(s, 1.3))
    assert torch.allclose(r, (w * s.exp()).sum(dim=1))
    r_sharp = torch.exp(log_weighted_negatives(s, 50.0))
    ratio = r_sharp / (s.shape[1] * s.exp().max(dim=1).values)
    assert torch.allclose(ratio, torch.ones(5, dtype=torch.float64), atol=1e-2)


# ---------------------------------------------------------------- module
def test_module_seed_reproducible_and_validates() -> None:
    z_a, z_b = _unit_pair(9, batch=8, dim=4)
    first = SSCLLoss(seed=3, n_hard=4, n_synthetic=8)(z_a, z_b)
    second = SSCLLoss(seed=3, n_hard=4, n_synthetic=8)(z_a, z_b)
    other = SSCLLoss(seed=4, n_hard=4, n_synthetic=8)(z_a, z_b)
    # the same operations on the same data in one process: bitwise equal
    assert torch.equal(first, second) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="tau_plus"):
        SSCLLoss(tau_plus=1.0)
    with pytest.raises(ValueError, match="'sideways'"):
        SSCLLoss(mixing="sideways")


def test_gather_flag_without_process_group_is_local() -> None:
    z_a, z_b = _unit_pair(10)
    kwargs = dict(n_hard=3, n_synthetic=4)
    local = sscl_loss(z_a, z_b, generator=torch.Generator().manual_seed(0), **kwargs)
    flagged = sscl_loss(z_a, z_b, generator=torch.Generator().manual_seed(0), gather=True, mine_global=True, **kwargs)
    assert torch.allclose(local, flagged)
