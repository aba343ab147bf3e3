"""Soft-target InfoNCE: hand example, reductions of ALGORITHMS.md 1.10, NumPy reference, builders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.losses import (
    SoftTargetInfoNCELoss,
    class_frequencies,
    label_smoothing_targets,
    mixup_inputs,
    mixup_targets,
    soft_target_cross_entropy,
    soft_target_info_nce,
)

LOGITS = [[2.0, 0.0], [0.0, 1.0]]
TARGETS = [[0.9, 0.1], [0.2, 0.8]]


def np_soft_infonce(logits: np.ndarray, targets: np.ndarray, q: np.ndarray, t: float) -> float:
    total = 0.0
    for i in range(logits.shape[0]):
        s = np.array([np.sum(targets[j] * (logits[i] / t - np.log(q))) for j in range(targets.shape[0])])
        m = s.max()
        total += -s[i] + m + np.log(np.exp(s - m).sum())
    return total / logits.shape[0]


def np_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_hand_example() -> None:
    logits, targets = _t(LOGITS), _t(TARGETS)
    # the constants are rounded to 6 decimals (5e-7); the closed form below matches to a few eps
    assert soft_target_info_nce(logits, targets).item() == pytest.approx(0.311802, abs=1e-6)
    assert soft_target_info_nce(logits, targets, _t([0.25, 0.75])).item() == pytest.approx(0.418237, abs=1e-6)
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(0.420095, abs=1e-6)
    per_sample = [math.log(1 + math.exp(-1.4)), math.log(1 + math.exp(-0.7))]
    assert soft_target_info_nce(logits, targets).item() == pytest.approx(np.mean(per_sample), abs=1e-12)


@pytest.mark.parametrize("n,c,t,uniform", [(4, 3, 1.0, True), (5, 6, 0.5, False), (3, 2, 2.0, False)])
def test_matches_numpy_value_and_gradient(n: int, c: int, t: float, uniform: bool) -> None:
    rng = np.random.default_rng(n * c)
    logits = rng.normal(size=(n, c))
    targets = rng.dirichlet(np.ones(c), size=n)
    q = np.full(c, 1.0 / c) if uniform else rng.dirichlet(np.ones(c))
    tl = torch.tensor(logits, requires_grad=True)
    loss = soft_target_info_nce(tl, _t(targets), None if uniform else _t(q), t)
    loss.backward()
    # float64 scores |s| <= ~10 (C-term sums): each side rounds by ~1e-14
    assert loss.item() == pytest.approx(np_soft_infonce(logits, targets, q, t), abs=1e-10)
    grad = np_grad(lambda x: np_soft_infonce(x, targets, q, t), logits)
    # central differences, h = 1e-6: truncation h^2 |f'''| / 6 plus rounding ~1e-14 / h, ~1e-8
    assert np.allclose(tl.grad.numpy(), grad, atol=1e-7)


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.softmax(torch.randn(4, 3, dtype=torch.float64, generator=gen), 1)
    q = _t([0.2, 0.5, 0.3])
    assert torch.autograd.gradcheck(lambda x: soft_target_info_nce(x, targets, q, 0.7), (logits,))


def test_one_hot_permutation_is_logit_adjusted_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    c, t = 5, 0.8
    logits = torch.randn(c, c, dtype=torch.float64, generator=gen)
    labels = torch.randperm(c, generator=gen)
    targets = F.one_hot(labels, c).double()
    # one-hot targets pick the same logits cross_entropy uses: the two LSEs differ by a few eps |logits / t|
    assert soft_target_info_nce(logits, targets, temperature=t).item() == pytest.approx(
        F.cross_entropy(logits / t, labels).item(), abs=1e-10
    )
    q = torch.softmax(torch.randn(c, dtype=torch.float64, generator=gen), 0)
    assert soft_target_info_nce(logits, targets, q, t).item() == pytest.approx(
        F.cross_entropy(logits / t - q.log(), labels).item(), abs=1e-10
    )


def test_large_batch_one_hot_approaches_cross_entropy_plus_log_q() -> None:
    gen = torch.Generator().manual_seed(2)
    c, n = 4, 3000
    q = _t([0.4, 0.3, 0.2, 0.1])
    labels = torch.multinomial(q, n, replacement=True, generator=gen)
    logits = torch.randn(n, c, dtype=torch.float64, generator=gen)
    loss = soft_target_info_nce(logits, F.one_hot(labels, c).double(), q)
    expected = F.cross_entropy(logits, labels) + q.log()[labels].mean()
    # not rounding: the sampled class counts differ from n q (sampling error, fixed seed)
    assert loss.item() - math.log(n) == pytest.approx(expected.item(), abs=2e-2)
    # with class counts exactly proportional to q the identity is exact
    exact = torch.repeat_interleave(torch.arange(c), (q * 1000).round().long())
    logits = torch.randn(exact.numel(), c, dtype=torch.float64, generator=gen)
    loss = soft_target_info_nce(logits, F.one_hot(exact, c).double(), q)
    expected = F.cross_entropy(logits, exact) + q.log()[exact].mean()
    # an identity now; both sides are means of 1000 float64 terms of size ~5: ~1e-13 apart
    assert loss.item() - math.log(exact.numel()) == pytest.approx(expected.item(), abs=1e-9)


def test_row_shift_invariance_and_identical_targets() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    targets = torch.softmax(torch.randn(5, 4, dtype=torch.float64, generator=gen), 1)
    q = torch.softmax(torch.randn(4, dtype=torch.float64, generator=gen), 0)
    base = soft_target_info_nce(logits, targets, q, 0.5)
    shifted = soft_target_info_nce(logits + torch.randn(5, 1, dtype=torch.float64, generator=gen), targets, q, 0.5)
    assert torch.allclose(base, shifted, atol=1e-12)  # float64 scores ~10: the shift changes rounding by ~1e-15
    same = targets[:1].expand(5, -1)
    x = logits.clone().requires_grad_()
    loss = soft_target_info_nce(x, same, q, 0.5)
    loss.backward()
    # five equal scores (up to an ulp): LSE - s = log 5 and softmax - 1/5 = 0, to a few eps
    assert loss.item() == pytest.approx(math.log(5), abs=1e-12)
    assert torch.allclose(x.grad, torch.zeros_like(x), atol=1e-12)


def test_absent_class_in_noise_does_not_give_nan() -> None:
    logits, targets = _t(LOGITS), _t([[1.0, 0.0], [1.0, 0.0]])
    loss = soft_target_info_nce(logits, targets, _t([1.0, 0.0]))
    assert torch.isfinite(loss)


def test_builders() -> None:
    labels = torch.tensor([0, 2, 1, 2])
    smooth = label_smoothing_targets(labels, 3, 0.3)
    assert torch.allclose(smooth.sum(1), torch.ones(4))
    assert smooth[0, 0].item() == pytest.approx(1 - 0.3 + 0.1) and smooth[0, 1].item() == pytest.approx(0.1)
    mixed = mixup_targets(labels, 3, 0.7)
    assert torch.allclose(mixed[0], torch.tensor([0.7, 0.0, 0.3]))  # sample 0 mixes with sample 3
    assert torch.allclose(mixed.sum(1), torch.ones(4))
    x = torch.arange(4.0)[:, None]
    assert torch.allclose(mixup_inputs(x, 0.7), 0.7 * x + 0.3 * x.flip(0))
    assert torch.allclose(class_frequencies(labels, 4), torch.tensor([0.25, 0.25, 0.5, 0.0]))


def test_module_logits_embeddings_and_labels() -> None:
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    labels = torch.randint(4, (6,), generator=gen)
    q = [0.1, 0.2, 0.3, 0.4]
    module = SoftTargetInfoNCELoss(temperature=0.5, noise=q, smoothing=0.1).double()
    expected = soft_target_info_nce(h @ w.T, label_smoothing_targets(labels, 4, 0.1, torch.float64), _t(q), 0.5)
    assert torch.allclose(module(h, w, labels), expected)
    assert torch.allclose(module(h @ w.T, None, label_smoothing_targets(labels, 4, 0.1, torch.float64)), expected)
    with pytest.raises(ValueError, match="targets"):
        module(h @ w.T)
    with pytest.raises(ValueError, match="noise"):
        SoftTargetInfoNCELoss(noise=[0.5, 0.0])
