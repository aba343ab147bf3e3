"""MVEB: Stein score estimator (equivariances, collapse, statistics), loss, autograd identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.losses import MVEBLoss, ema_momentum, mveb_loss, mveb_score, normalize, vmf_concentration


EPS = np.finfo(np.float64).eps


def np_kernel(z: np.ndarray, min_width: float = 0.1) -> tuple[float, np.ndarray]:
    """kappa and the vMF kernel matrix K, from ALGORITHMS.md 5.3."""
    b = z.shape[0]
    sim = z @ z.T
    distances = np.sort((1.0 - sim).ravel())[::-1]
    width = max(distances[b * b // 2 - 1], min_width)  # the floor(B^2/2)-th largest
    kappa = 1.0 / width
    return kappa, np.exp(kappa * sim)


def np_score(z: np.ndarray, eta: float = 0.01, min_width: float = 0.1) -> np.ndarray:
    """Stein score with a vMF kernel, from ALGORITHMS.md 5.3."""
    kappa, kernel = np_kernel(z, min_width)
    stein = kappa * kernel.sum(axis=1, keepdims=True) * z
    return -np.linalg.solve(kernel + eta * np.eye(z.shape[0]), stein)


def score_error_bound(z, eta: float = 0.01, min_width: float = 0.1) -> float:
    """Largest error of any float64 evaluation of the score (any BLAS, vector ISA or thread count).

    A backward-stable solve (B eps) of a system whose entries exp(kappa z_i.z_j) carry the rounding
    of a D-term dot product (kappa D eps) is off by up to cond(K + eta I) (B + kappa D) eps ||s||.
    """
    z = np.asarray(z, dtype=np.float64)
    b, d = z.shape
    kappa, kernel = np_kernel(z, min_width)
    cond = np.linalg.cond(kernel + eta * np.eye(b))
    return float(cond * (b + kappa * d) * EPS * np.linalg.norm(np_score(z, eta, min_width)))


def _unit(seed: int, b: int, d: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return normalize(torch.randn(b, d, dtype=torch.float64, generator=gen))


def _vmf_s2(n: int, kappa: float, rng: np.random.Generator) -> np.ndarray:
    """Exact vMF samples on S^2 around e_3 (inverse CDF of the cosine)."""
    u = rng.uniform(size=n)
    w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * kappa)) / kappa
    phi = rng.uniform(0.0, 2.0 * np.pi, size=n)
    r = np.sqrt(np.clip(1.0 - w**2, 0.0, None))
    return np.stack([r * np.cos(phi), r * np.sin(phi), w], axis=1)


def _tangential(s: np.ndarray, z: np.ndarray) -> np.ndarray:
    return s - (s * z).sum(1, keepdims=True) * z


@pytest.mark.parametrize("b,d,eta", [(6, 3, 0.01), (16, 8, 0.1), (9, 4, 1.0)])
def test_score_matches_numpy(b: int, d: int, eta: float) -> None:
    z = _unit(b, b, d)
    # two solves (MKL in torch, OpenBLAS in numpy), each within the error bound
    bound = score_error_bound(z, eta)
    assert np.allclose(mveb_score(z, eta).numpy(), np_score(z.numpy(), eta), rtol=0, atol=2 * bound)


def test_score_float32_is_solved_in_float64() -> None:
    z = _unit(1, 32, 6).float()
    s32 = mveb_score(z)
    assert s32.dtype == torch.float32
    # the float64 solve of the same (float32-valued) rows, then one rounding to float32: one float32
    # ulp apart (a float32 solve is ~1e-5 off here, cond(K + eta I) = 770)
    reference = mveb_score(z.double())
    bound = score_error_bound(z.double())
    assert torch.allclose(s32.double(), reference, rtol=torch.finfo(torch.float32).eps, atol=2 * bound)


def test_kernel_width_is_the_clamped_median() -> None:
    z = _unit(2, 10, 5)
    distances = np.sort((1 - z.numpy() @ z.numpy().T).ravel())[::-1]
    assert vmf_concentration(z).item() == pytest.approx(1 / max(distances[49], 0.1))
    collapsed = torch.tensor([[0.6, 0.8, 0.0]] * 4, dtype=torch.float64)
    assert vmf_concentration(collapsed).item() == pytest.approx(10.0)
    assert vmf_concentration(collapsed, min_width=0.5).item() == pytest.approx(2.0)


def test_rotation_and_permutation_equivariance() -> None:
    z = _unit(3, 12, 5)
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=gen))
    perm = torch.randperm(12, generator=gen)
    s = mveb_score(z)
    # rotated or permuted rows round differently: two evaluations, each within the error bound
    bound = score_error_bound(z)
    assert torch.allclose(mveb_score(z @ q.T), s @ q.T, rtol=0, atol=2 * bound)
    assert torch.allclose(mveb_score(z[perm]), s[perm], rtol=0, atol=2 * bound)


def test_collapse_is_radial() -> None:
    # B equal unit rows: kappa = 1 / min_width and K = e^kappa 11^T, so the exact solution of
    # (K + eta I) s = -kappa (K 1) z is s = -kappa f z with f = B e^kappa / (B e^kappa + eta) = 1 - 5.7e-8.
    b, d, kappa, eta = 8, 3, 10.0, 0.01
    z = torch.tensor([[0.6, 0.8, 0.0]] * b, dtype=torch.float64)
    s = mveb_score(z, eta)
    exact = -kappa * b * math.exp(kappa) / (b * math.exp(kappa) + eta) * z
    # the row mean is s along 1, the eigenvector of the large eigenvalue: its rounding is not
    # amplified by cond(K + eta I) = 1.8e7, so it matches to (B + kappa D) eps (and tells f from 1)
    assert torch.allclose(s.mean(0), exact[0], rtol=0, atol=(b + kappa * d) * EPS * kappa)
    # a single row carries the solve's forward error: radial within that bound (~4e-6), no more
    bound = score_error_bound(z, eta)
    assert (s - exact).abs().max().item() <= bound
    assert np.abs(_tangential(s.numpy(), z.numpy())).max() <= bound


def test_large_eta_switches_the_entropy_term_off() -> None:
    z, eta = _unit(4, 16, 3), 1e6
    s = mveb_score(z, eta=eta).numpy()
    # s = -(1/eta) (I + K/eta)^{-1} g with g radial, so its tangential part is at most ||K|| / eta of s
    _, kernel = np_kernel(z.numpy())
    assert np.linalg.norm(_tangential(s, z.numpy())) <= np.linalg.norm(kernel, 2) / eta * np.linalg.norm(s)


def test_statistical_vmf_score() -> None:
    rng = np.random.default_rng(0)
    mu, kappa0 = np.array([0.0, 0.0, 1.0]), 5.0
    z = _vmf_s2(1024, kappa0, rng)
    est = _tangential(mveb_score(torch.from_numpy(z)).numpy(), z)
    true = kappa0 * (mu[None, :] - (z @ mu)[:, None] * z)
    cosine = (est * true).sum(1) / (np.linalg.norm(est, axis=1) * np.linalg.norm(true, axis=1))
    # statistical (median 0.965 for this seed); the solve's rounding, cond 2.4e6, is < 1e-6 of s
    assert np.median(cosine) > 0.9
    uniform = rng.normal(size=(1024, 3))
    uniform /= np.linalg.norm(uniform, axis=1, keepdims=True)
    uniform_norm = np.linalg.norm(_tangential(mveb_score(torch.from_numpy(uniform)).numpy(), uniform), axis=1)
    assert np.mean(uniform_norm) < 0.5 * np.mean(np.linalg.norm(est, axis=1))


def test_autograd_identity() -> None:
    z = _unit(5, 10, 4).requires_grad_()
    t = _unit(6, 10, 4)
    # lam = 1 with the alignment removed: L = -U, so dL/dz = s / B (and U's gradient is -s / B)
    lam = 1.0
    loss = mveb_loss([z, z], [t, t], lam) + (z * t).sum(1).mean()
    loss.backward()
    s = mveb_score(z.detach())
    # the loss solves a batch of two sets, this an unbatched one: each within the error bound
    assert torch.allclose(z.grad, 2 * lam * s / (2 * 10), rtol=0, atol=2 * score_error_bound(z.detach()) / 10)


@pytest.mark.parametrize("views,lam", [(2, 0.01), (4, 0.5), (3, 0.0)])
def test_loss_matches_numpy_value_and_hand_gradient(views: int, lam: float) -> None:
    rng = np.random.default_rng(views)
    b, d = 8, 5

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    z = unit(rng.normal(size=(views, b, d)))
    t1, t2 = unit(rng.normal(size=(2, b, d)))
    partners = [t2, t1] + [(t1 + t2) / 2] * (views - 2)
    scores = [np_score(z[v]) for v in range(views)]
    alignment = np.mean([np.mean((z[v] * partners[v]).sum(1)) for v in range(views)])
    surrogate = np.mean([-np.mean((scores[v] * z[v]).sum(1)) for v in range(views)])
    online = [torch.tensor(z[v], requires_grad=True) for v in range(views)]
    loss = mveb_loss(online, [torch.tensor(t1), torch.tensor(t2)], lam)
    loss.backward()
    # torch and numpy solves, each within the error bound, plus sums of V B unit-vector dot products
    atol = lam * 2 * max(score_error_bound(z[v]) for v in range(views)) + 2 * (views * b + d) * EPS
    assert loss.item() == pytest.approx(-alignment - lam * surrogate, rel=0, abs=atol)
    for v in range(views):
        expected = -partners[v] / (views * b) + lam * scores[v] / (views * b)
        assert np.allclose(online[v].grad.numpy(), expected, rtol=0, atol=atol / (views * b))


def test_lam_zero_is_minus_alignment_and_targets_are_detached() -> None:
    z1, z2, t1, t2 = (_unit(10 + i, 6, 3) for i in range(4))
    t1.requires_grad_()
    loss = mveb_loss([z1, z2], [t1, t2], lam=0.0)
    alignment = ((z1 * t2).sum(1).mean() + (z2 * t1).sum(1).mean()) / 2
    # the same 12 dot products of unit rows, summed in another order: (12 + 3) eps ~ 3e-15 apart
    assert loss.item() == pytest.approx(-alignment.item(), abs=1e-12)
    assert not loss.requires_grad


def test_module_normalises_and_accepts_target_layouts() -> None:
    gen = torch.Generator().manual_seed(7)
    z_a, z_b, t_1, t_2, local = torch.randn(5, 6, 4, dtype=torch.float64, generator=gen)
    module = MVEBLoss(lam=0.1)
    expected = mveb_loss(
        [normalize(z_a), normalize(z_b), normalize(local)], [normalize(t_1), normalize(t_2)], 0.1
    )
    assert torch.allclose(module(z_a, z_b, (t_1, t_2), local_views=[local]), expected)
    assert torch.allclose(module(z_a, z_b, torch.stack([t_1, t_2]), local_views=[local]), expected)
    self_target = mveb_loss([normalize(z_a), normalize(z_b)], [normalize(z_a), normalize(z_b)], 0.1)
    assert torch.allclose(module(z_a, z_b), self_target)
    with pytest.raises(ValueError, match="2 target views"):
        module(z_a, z_b, (t_1,))


def test_ema_momentum_schedule() -> None:
    assert ema_momentum(0.0) == pytest.approx(0.996)
    assert ema_momentum(0.5) == pytest.approx(0.998)
    assert ema_momentum(1.0) == pytest.approx(1.0)
    values = [ema_momentum(p / 20) for p in range(21)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert ema_momentum(0.25, base=0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    with pytest.raises(ValueError, match="progress"):
        ema_momentum(1.5)
