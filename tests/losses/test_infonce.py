"""info_nce against an independent NumPy reference, closed forms and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.losses import InfoNCELoss, info_nce


def np_logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def np_nt_xent(z_a: np.ndarray, z_b: np.ndarray, t: float) -> float:
    """SimCLR NT-Xent written from the definition, one anchor at a time."""
    o = np.concatenate([z_a, z_b])
    o = o / np.linalg.norm(o, axis=1, keepdims=True)
    n, half = o.shape[0], o.shape[0] // 2
    total = 0.0
    for a in range(n):
        positive = (a + half) % n
        others = np.array([o[a] @ o[b] / t for b in range(n) if b != a])
        total += -o[a] @ o[positive] / t + np_logsumexp(others)
    return total / n


def np_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences in float64."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


@pytest.mark.parametrize("batch,dim,temperature", [(2, 3, 0.1), (5, 4, 0.5), (7, 2, 1.3)])
def test_matches_numpy_value_and_gradient(batch: int, dim: int, temperature: float) -> None:
    rng = np.random.default_rng(batch * 10 + dim)
    z_a, z_b = rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))
    ta = torch.tensor(z_a, requires_grad=True)
    tb = torch.tensor(z_b, requires_grad=True)
    loss = info_nce(ta, tb, temperature)
    loss.backward()
    # float64 logits <= 1/t = 10 from D-term dot products: each side rounds by ~(D + 2B) eps / t ~ 1e-14
    assert loss.item() == pytest.approx(np_nt_xent(z_a, z_b, temperature), abs=1e-10)
    grad_a = np_grad(lambda x: np_nt_xent(x, z_b, temperature), z_a)
    grad_b = np_grad(lambda x: np_nt_xent(z_a, x, temperature), z_b)
    # central differences, h = 1e-6: truncation h^2 |f'''| / 6 plus rounding ~1e-14 / h, ~1e-8 at t = 0.1
    assert np.allclose(ta.grad.numpy(), grad_a, atol=1e-7)
    assert np.allclose(tb.grad.numpy(), grad_b, atol=1e-7)


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    z_b = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.3), (z_a, z_b))


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_collapse_gives_log_2b_minus_1(batch: int) -> None:
    z = torch.ones(batch, 6, dtype=torch.float64)
    # all logits are 1/0.07 = 14.3 up to an ulp or two: the rounding left is ~10 eps * 14.3 ~ 3e-14
    assert info_nce(z, 2 * z, 0.07).item() == pytest.approx(math.log(2 * batch - 1), abs=1e-9)


def test_orthogonal_aligned_views_hand_value() -> None:
    # z_a = z_b = I_B: every positive logit is 1/t and the 2B - 2 negatives are orthogonal
    # (logit 0), so every anchor has l = log(1 + (2B - 2) e^{-1/t}).
    b, t = 4, 0.5
    eye = torch.eye(b, dtype=torch.float64)
    expected = math.log(1 + (2 * b - 2) * math.exp(-1 / t))
    # logits exactly 0 and 1/t (one-hot rows): only exp / log rounding, a few eps
    assert info_nce(eye, eye, t).item() == pytest.approx(expected, abs=1e-12)


def test_symmetric_in_views_and_invariant_to_scale_and_rotation() -> None:
    gen = torch.Generator().manual_seed(1)
    z_a = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    z_b = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=gen))
    base = info_nce(z_a, z_b, 0.2)
    assert torch.allclose(info_nce(z_b, z_a, 0.2), base)
    assert torch.allclose(info_nce(3.0 * z_a, 0.5 * z_b, 0.2), base)
    assert torch.allclose(info_nce(z_a @ q, z_b @ q, 0.2), base)
    perm = torch.randperm(6, generator=gen)
    assert torch.allclose(info_nce(z_a[perm], z_b[perm], 0.2), base)


def test_module_and_gather_flag_without_process_group() -> None:
    gen = torch.Generator().manual_seed(2)
    z_a, z_b = torch.randn(2, 5, 3, generator=gen)
    expected = info_nce(z_a, z_b, 0.25)
    assert torch.allclose(InfoNCELoss(0.25)(z_a, z_b), expected)
    assert torch.allclose(InfoNCELoss(0.25, gather=True)(z_a, z_b), expected)


def test_float32_matches_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    b, d, t = 32, 16, 0.05
    z_a = torch.randn(b, d, dtype=torch.float64, generator=gen)
    z_b = torch.randn(b, d, dtype=torch.float64, generator=gen)
    # each float32 logit (a normalised D-term dot product, / t) is off by <= (D + 2) eps32 / t; the
    # loss, -pos + LSE (both 1-Lipschitz in the logits), by twice that plus the LSE's own rounding
    eps32 = torch.finfo(torch.float32).eps
    loss = info_nce(z_a, z_b, t).item()
    tolerance = 2 * (d + 2) * eps32 / t + math.log2(2 * b) * eps32 * abs(loss)
    assert info_nce(z_a.float(), z_b.float(), t).item() == pytest.approx(loss, rel=0, abs=tolerance)
