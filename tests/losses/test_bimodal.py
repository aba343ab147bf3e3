"""Bimodal losses: hand values, Jensen, gauges, NumPy reference, Gaussian optima, retrieval, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.losses import (
    OBJECTIVES,
    TILTS,
    ClipLoss,
    bimodal_loss,
    bimodal_loss_from_scores,
    generate,
    retrieve,
    tilt_scores,
)


def np_lse(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def np_scores(e_u: np.ndarray, e_v: np.ndarray, tilt: str, t: float) -> np.ndarray:
    n, m = e_u.shape[0], e_v.shape[0]
    s = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            a, b = e_u[i], e_v[j]
            if tilt == "cosine":
                s[i, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) / t
            elif tilt == "inner":
                s[i, j] = a @ b / t
            else:
                s[i, j] = -np.sum((a - b) ** 2) / (2 * t)
    return s


def np_objective(s: np.ndarray, objective: str) -> float:
    n = s.shape[0]
    v_given_u = np.mean([-s[i, i] + np_lse(s[i]) for i in range(n)]) - math.log(n)
    u_given_v = np.mean([-s[j, j] + np_lse(s[:, j]) for j in range(n)]) - math.log(n)
    if objective == "v_given_u":
        return v_given_u
    if objective == "u_given_v":
        return u_given_v
    if objective == "clip":
        return v_given_u + u_given_v
    off = np.array([s[i, j] for i in range(n) for j in range(n) if i != j])
    return -np.mean(np.diag(s)) + np_lse(off) - math.log(n * (n - 1))


def np_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


# ---------------------------------------------------------------- hand values and identities
def test_scaled_identity_hand_values() -> None:
    n, c = 4, 2.0
    s = c * torch.eye(n, dtype=torch.float64)
    conditional = -c + math.log((math.exp(c) + n - 1) / n)
    # -1.0455414 is rounded to 7 decimals (5e-8); the losses of S = c I (exact scores <= 2) round by a few eps
    assert conditional == pytest.approx(-1.0455414, abs=1e-7)
    assert bimodal_loss_from_scores(s, "v_given_u").item() == pytest.approx(conditional, abs=1e-12)
    assert bimodal_loss_from_scores(s, "u_given_v").item() == pytest.approx(conditional, abs=1e-12)
    assert bimodal_loss_from_scores(s, "clip").item() == pytest.approx(2 * conditional, abs=1e-12)
    assert bimodal_loss_from_scores(s, "joint").item() == pytest.approx(-2.0, abs=1e-12)
    assert bimodal_loss_from_scores(s, "joint", include_diagonal=True).item() == pytest.approx(
        -1.0455414, abs=1e-7
    )


def test_jensen_all_pairs_joint_bounds_the_conditional() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = 2 * torch.randn(6, 6, dtype=torch.float64, generator=gen)
        joint = bimodal_loss_from_scores(s, "joint", include_diagonal=True)
        assert joint.item() > bimodal_loss_from_scores(s, "v_given_u").item()
    equal_rows = torch.stack([torch.randn(6, dtype=torch.float64, generator=gen).roll(k) for k in range(6)])
    equal_rows = torch.stack([equal_rows[0].roll(k) for k in range(6)])
    # one LSE over 36 scores vs six over 6 (|S| < 10): ~log2(36) eps |S| ~ 1e-14 apart
    assert bimodal_loss_from_scores(equal_rows, "joint", include_diagonal=True).item() == pytest.approx(
        bimodal_loss_from_scores(equal_rows, "v_given_u").item(), abs=1e-12
    )


def test_gauge_invariances() -> None:
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(5, 5, dtype=torch.float64, generator=gen)
    rows = torch.randn(5, 1, dtype=torch.float64, generator=gen)
    cols = torch.randn(1, 5, dtype=torch.float64, generator=gen)
    assert torch.allclose(bimodal_loss_from_scores(s + rows, "v_given_u"), bimodal_loss_from_scores(s, "v_given_u"))
    assert torch.allclose(bimodal_loss_from_scores(s + cols, "u_given_v"), bimodal_loss_from_scores(s, "u_given_v"))
    for objective in ("joint", "clip"):
        assert torch.allclose(
            bimodal_loss_from_scores(s + 3.7, objective), bimodal_loss_from_scores(s, objective)
        )
    assert not torch.allclose(bimodal_loss_from_scores(s + rows, "clip"), bimodal_loss_from_scores(s, "clip"))
    assert not torch.allclose(bimodal_loss_from_scores(s + rows, "joint"), bimodal_loss_from_scores(s, "joint"))


# ---------------------------------------------------------------- NumPy reference, gradcheck
@pytest.mark.parametrize("tilt", TILTS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_matches_numpy_value_and_gradient(objective: str, tilt: str) -> None:
    rng = np.random.default_rng(len(objective) * 7 + len(tilt))
    e_u, e_v, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 0.7
    tu = torch.tensor(e_u, requires_grad=True)
    tv = torch.tensor(e_v, requires_grad=True)
    loss = bimodal_loss(tu, tv, objective, tilt, t)
    loss.backward()

    def f(a, b):
        return np_objective(np_scores(a, b, tilt, t), objective)

    # float64 scores |S| <= ~10 of 3-term dot products / distances: each side rounds by ~1e-14
    assert loss.item() == pytest.approx(f(e_u, e_v), abs=1e-10)
    # central differences, h = 1e-6: truncation h^2 |f'''| / 6 plus rounding ~1e-14 / h, ~1e-8
    assert np.allclose(tu.grad.numpy(), np_grad(lambda x: f(x, e_v), e_u), atol=1e-7)
    assert np.allclose(tv.grad.numpy(), np_grad(lambda x: f(e_u, x), e_v), atol=1e-7)


@pytest.mark.parametrize("tilt", TILTS)
def test_gradcheck(tilt: str) -> None:
    gen = torch.Generator().manual_seed(2)
    e_u = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    e_v = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    for objective in OBJECTIVES:
        assert torch.autograd.gradcheck(lambda a, b: bimodal_loss(a, b, objective, tilt, 0.5), (e_u, e_v))


def test_weighted_clip_and_module() -> None:
    gen = torch.Generator().manual_seed(3)
    e_u, e_v = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    s = tilt_scores(e_u, e_v, "cosine", 0.2)
    weighted = 0.3 * bimodal_loss_from_scores(s, "v_given_u") + 0.7 * bimodal_loss_from_scores(s, "u_given_v")
    assert torch.allclose(ClipLoss(0.2, weight=0.3)(e_u, e_v), weighted)
    assert torch.allclose(ClipLoss(0.2)(e_u, e_v), bimodal_loss_from_scores(s, "clip"))


def test_l2_scores_are_clamped_squared_distances() -> None:
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    s = tilt_scores(x, x + torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64), "l2", 0.5)
    # small integers: |a|^2 + |b|^2 - 2 a.b = 5 + 5 - 10 is exact in float64 in any order
    assert s[0, 0].item() == 0.0 and s[1, 1].item() == pytest.approx(-25.0)


# ---------------------------------------------------------------- Gaussian analysis (ALGORITHMS 3.5)
def _gaussian_pairs(n: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    v = rho * u + math.sqrt(1 - rho**2) * torch.randn(n, 1, dtype=torch.float64, generator=gen)
    return u, v


def _minimise(params: list[torch.Tensor], loss_fn) -> None:
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)


def test_bilinear_clip_recovers_rho() -> None:
    batches, size, rho = 20, 1000, 0.6
    u, v = _gaussian_pairs(batches * size, rho, 0)
    u, v = u.view(batches, size, 1), v.view(batches, size, 1)
    a = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)

    def loss_fn():
        return torch.stack([bimodal_loss(a * u[k], v[k], "clip", "inner", 1.0) for k in range(batches)]).mean()

    _minimise([a], loss_fn)
    assert a.item() == pytest.approx(rho, abs=0.03)


def test_one_sided_l2_recovers_the_exact_conditional() -> None:
    batches, size, rho = 20, 1000, 0.6
    u, v = _gaussian_pairs(batches * size, rho, 1)
    u, v = u.view(batches, size, 1), v.view(batches, size, 1)
    g = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)

    def loss_fn():
        losses = [bimodal_loss(g * u[k], h * v[k], "v_given_u", "l2", 1.0) for k in range(batches)]
        return torch.stack(losses).mean()

    _minimise([g, h], loss_fn)
    assert g.item() == pytest.approx(1 / math.sqrt(1 - rho**2), abs=0.05)  # 1.25
    assert h.item() == pytest.approx(rho / math.sqrt(1 - rho**2), abs=0.05)  # 0.75


def _largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return math.degrees(math.acos(cosines.min().item()))


def test_linear_encoders_span_the_top_canonical_subspace() -> None:
    gen = torch.Generator().manual_seed(4)
    d_u, d_v, n_e = 5, 4, 2
    canonical = torch.tensor([0.9, 0.7, 0.2, 0.1], dtype=torch.float64)
    mix_u = torch.randn(d_u, d_u, dtype=torch.float64, generator=gen) + 2 * torch.eye(d_u, dtype=torch.float64)
    mix_v = torch.randn(d_v, d_v, dtype=torch.float64, generator=gen) + 2 * torch.eye(d_v, dtype=torch.float64)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        white_u = torch.randn(n, d_u, dtype=torch.float64, generator=gen)
        noise = torch.randn(n, d_v, dtype=torch.float64, generator=gen)
        white_v = canonical * white_u[:, :d_v] + (1 - canonical**2).sqrt() * noise
        return white_u @ mix_u.T, white_v @ mix_v.T

    enc_u = torch.nn.Linear(d_u, n_e, bias=False).double()
    enc_v = torch.nn.Linear(d_v, n_e, bias=False).double()
    torch.nn.init.normal_(enc_u.weight, std=0.1, generator=gen)
    torch.nn.init.normal_(enc_v.weight, std=0.1, generator=gen)
    steps = 250
    optimizer = torch.optim.Adam([*enc_u.parameters(), *enc_v.parameters()], lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / steps)
    for _ in range(steps):
        u, v = sample(256)
        loss = bimodal_loss(enc_u(u), enc_v(v), "clip", "inner", 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    # score u^T G^T H v: the column space of G^T must be that of Sigma_uu^{-1/2} U_r, which for
    # u = M_u w (w white, canonical coordinates first) is span(M_u^{-T} e_1..e_r); same for v.
    target_u = torch.linalg.inv(mix_u).T[:, :n_e]
    target_v = torch.linalg.inv(mix_v).T[:, :n_e]
    assert _largest_principal_angle(enc_u.weight.detach().T, target_u) < 10.0
    assert _largest_principal_angle(enc_v.weight.detach().T, target_v) < 10.0


# ---------------------------------------------------------------- retrieval and generation
def test_retrieve_recovers_a_permutation() -> None:
    gen = torch.Generator().manual_seed(5)
    e_u = torch.nn.functional.normalize(torch.randn(10, 4, generator=gen), dim=1)  # inner = cosine
    perm = torch.randperm(10, generator=gen)
    e_v = e_u[perm] + 0.01 * torch.randn(10, 4, generator=gen)
    for tilt in TILTS:
        result = retrieve(e_u, e_v, tilt)
        assert torch.equal(perm[result.index], torch.arange(10))
        assert result.accuracy.item() == pytest.approx((perm == torch.arange(10)).float().mean().item())
    aligned = retrieve(e_u, e_u + 0.01 * torch.randn(10, 4, generator=gen), direction="u_given_v")
    assert aligned.accuracy.item() == 1.0


def test_generate_resamples_the_gaussian_conditional() -> None:
    rho = 0.6
    gen = torch.Generator().manual_seed(6)
    pool = torch.randn(100_000, 1, dtype=torch.float64, generator=gen)
    g, h = 1 / math.sqrt(1 - rho**2), rho / math.sqrt(1 - rho**2)
    query = torch.tensor([[g * 1.0]], dtype=torch.float64)  # u = 1
    index = generate(query, h * pool, n_samples=20_000, tilt="l2", temperature=1.0, generator=gen)
    assert index.shape == (1, 20_000)
    samples = pool[index[0], 0]
    assert samples.mean().item() == pytest.approx(rho, abs=0.03)
    assert samples.var().item() == pytest.approx(1 - rho**2, abs=0.04)
