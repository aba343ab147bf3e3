"""SSCL: synthetic hard negatives on top of the HCL / DCL estimator (Dong et al., arXiv 2304.02971).

The loss for anchor ``a`` with positive logit ``p = o_a.o_p / t`` and negative logits
``s_n = o_a.n / t`` over a pool of ``N'`` negatives is

    R_a = N' * sum_n exp((1 + beta) s_n) / sum_n exp(beta s_n)      (HCL importance weighting)
    G_a = max((R_a - tau_plus * N' * exp(p)) / (1 - tau_plus), N' * exp(-1 / t))   (DCL debias + floor)
    l_a = -log(exp(p) / (exp(p) + G_a))

and the pool is the ``2B - 2`` real negatives plus ``n_synthetic`` detached synthetic negatives per
anchor, each a normalised convex mix of two of the anchor's ``n_hard`` hardest real negatives.

Special cases: ``n_synthetic=0`` is HCL; additionally ``beta=0`` is DCL; additionally
``tau_plus=0`` is SimCLR NT-Xent (:func:`trainers.losses.info_nce`).

Choices where the sources disagree or are unverified (ALGORITHMS.md section 2):

* Mixing (``mixing``): default ``"hard"`` = both parents uniform from the hard set, one
  ``alpha ~ U(0, 1)`` per synthetic vector (the paper's abstract: negatives made "by mixing
  negative samples"). Switches reproduce the alternatives in the author code: ``"duplicate"``
  (the stored code's active line: a copy of one hard parent, no mixing), ``"hard_easy"`` (one
  hard and one of the ``n_hard`` easiest parents), ``"random"`` (two parents from all
  negatives), ``"per_dim"`` (two hard parents, ``alpha`` drawn per dimension) and ``"anchor"``
  (MoCHI's second type: anchor and hard parent, anchor weight ``~ U(0, 0.5)``).
* The HCL weights are **not** detached (both reference implementations keep them attached).
* The synthetic vectors are detached; the anchor is not.
* Hard-parent mining is local to the rank (a per-GPU estimator) unless ``mine_global=True``.
* ``n_hard`` larger than the ``2B - 2`` available negatives is clamped (the author code
  hard-codes ``2B = 512`` instead).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from trainers import dist
from trainers.losses._base import (
    EPS,
    ContrastiveLoss,
    check_bool,
    check_choice,
    check_int,
    check_non_negative,
    check_pair,
    check_positive,
    check_range,
    normalize,
)
from trainers.losses.infonce import two_view_bank, two_view_indices

MIXINGS = ("hard", "duplicate", "hard_easy", "random", "per_dim", "anchor")


def log_weighted_negatives(
    neg_logits: torch.Tensor, beta: float, n_neg: int | None = None
) -> torch.Tensor:
    """``log R`` of HCL: the log of the hardness-weighted sum of ``exp(s_n)``.

    ``R = sum_n w_n exp(s_n)`` with ``w_n = exp(beta s_n) / mean_n' exp(beta s_n')``, i.e.
    ``log N' + LSE((1 + beta) s) - LSE(beta s)``; ``beta = 0`` gives ``log sum_n exp(s_n)``.
    Both sums share one row shift (the row maximum, detached) and, for ``beta`` in {0, 1}, one
    exponential. Entries equal to ``-inf`` are excluded (they do not count in ``N'``).

    Args:
        neg_logits: negative logits ``s_n`` (similarity / temperature) per anchor.
        beta: hardness concentration, >= 0.
        n_neg: number of finite entries per row, if known (counted otherwise).

    Shape:
        neg_logits: ``[A, N']``; returns ``[A]``.
    """
    top = neg_logits.detach().amax(dim=1, keepdim=True)
    shifted = neg_logits - top
    e = torch.exp(shifted)
    if beta == 0:
        return torch.log(e.sum(dim=1)) + top.squeeze(1)
    if n_neg is None:
        n_neg = int(torch.isfinite(neg_logits[0]).sum())
    e_beta = e if beta == 1 else torch.exp(beta * shifted)
    weighted = (e_beta * e).sum(dim=1) / e_beta.sum(dim=1)
    return math.log(n_neg) + torch.log(weighted) + top.squeeze(1)


def importance_weights(neg_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """HCL importance weights ``w_n = exp(beta s_n) / mean_n' exp(beta s_n')`` (mean 1 per row).

    A diagnostic (the loss uses :func:`log_weighted_negatives`); the logits must be finite.

    Shape:
        neg_logits: ``[A, N']``; returns ``[A, N']``.
    """
    return torch.softmax(beta * neg_logits, dim=1) * neg_logits.shape[1]


def debiased_hard_nce(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    temperature: float,
    tau_plus: float = 0.1,
    beta: float = 1.0,
    n_neg: int | None = None,
) -> torch.Tensor:
    """Per-anchor HCL / DCL loss ``-log(exp(p) / (exp(p) + G))`` (formulas in the module docstring).

    Everything is computed relative to a detached per-anchor shift ``m = max(p, max_n s_n)``, so
    no exponential exceeds ``N'``. When the floor is active, ``G`` is constant and the negatives
    get no gradient (as in DCL / HCL). Negative logits equal to ``-inf`` are masked out.

    Args:
        pos_logits: positive logits ``p = o_a.o_p / t``.
        neg_logits: negative logits ``s_n = o_a.n / t`` (``-inf`` = not a negative).
        temperature: the ``t`` used to make the logits (sets the floor ``N' exp(-1/t)``).
        tau_plus: class prior of false negatives, in [0, 1).
        beta: hardness concentration, >= 0.
        n_neg: number of finite negative logits per row (the same for every row), if known.

    Shape:
        pos_logits: ``[A]``; neg_logits: ``[A, N']``; returns ``[A]``.
    """
    if n_neg is None:
        n_neg = int(torch.isfinite(neg_logits[0]).sum())
    shift = torch.maximum(pos_logits, neg_logits.detach().max(dim=1).values).detach()
    r = torch.exp(log_weighted_negatives(neg_logits, beta, n_neg) - shift)
    p = torch.exp(pos_logits - shift)
    floor = n_neg * torch.exp(-1.0 / temperature - shift)
    g = torch.maximum((r - tau_plus * n_neg * p) / (1.0 - tau_plus), floor)
    return -pos_logits + shift + torch.log(p + g)


class _Parents(NamedTuple):
    """Draws of one SSCL step: pool indices of both parents and the mixing weight of the first."""

    first: torch.Tensor
    second: torch.Tensor
    alpha: torch.Tensor


def _draw_columns(
    candidates: torch.Tensor, n: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``n`` uniform draws (with replacement) per row of ``candidates``.

    Shape:
        candidates: ``[A, k]``; returns ``[A, n]``.
    """
    rows, k = candidates.shape
    draw_device = generator.device if generator is not None else candidates.device
    pick = torch.randint(k, (rows, n), generator=generator, device=draw_device)
    return candidates.gather(1, pick.to(candidates.device))


def _skip_excluded(
    draws: torch.Tensor, self_idx: torch.Tensor, pos_idx: torch.Tensor
) -> torch.Tensor:
    """Map draws from ``[0, P - 2)`` onto the ``P`` pool columns minus self and positive.

    Shape:
        draws: ``[A, S]``; self_idx, pos_idx: ``[A]``; returns ``[A, S]``.
    """
    low = torch.minimum(self_idx, pos_idx)[:, None]
    high = torch.maximum(self_idx, pos_idx)[:, None]
    draws = draws + (draws >= low).to(draws.dtype)
    return draws + (draws >= high).to(draws.dtype)


def _draw_parents(
    neg_sim: torch.Tensor,
    self_idx: torch.Tensor,
    pos_idx: torch.Tensor,
    n_hard: int,
    n_synthetic: int,
    mixing: str,
    dim: int,
    generator: torch.Generator | None,
) -> _Parents:
    """Parent indices and mixing weights of the synthetic negatives (``mixing`` in ``MIXINGS``).

    Args:
        neg_sim: anchor-to-pool cosines with the self and positive columns set to ``-inf``.
        self_idx: pool column of each anchor itself.
        pos_idx: pool column of each anchor's positive.
        n_hard: size of the hard set (clamped to the ``P - 2`` negatives).
        n_synthetic: draws per anchor.
        mixing: recipe.
        dim: embedding dimension (for ``"per_dim"``).
        generator: random generator.

    Shape:
        neg_sim: ``[A, P]``; self_idx, pos_idx: ``[A]``; returns ``first, second: int64[A, S]``
        and ``alpha: [A, S, 1]`` (``[A, S, D]`` for ``"per_dim"``).
    """
    rows, pool_size = neg_sim.shape
    k = min(n_hard, pool_size - 2)
    if mixing == "random":
        span = torch.arange(pool_size - 2, device=neg_sim.device).expand(rows, -1)
        first = _skip_excluded(_draw_columns(span, n_synthetic, generator), self_idx, pos_idx)
        second = _skip_excluded(_draw_columns(span, n_synthetic, generator), self_idx, pos_idx)
    else:
        hard = neg_sim.topk(k, dim=1, sorted=False).indices
        first = _draw_columns(hard, n_synthetic, generator)
        if mixing == "hard_easy":
            easiest = neg_sim.masked_fill(torch.isinf(neg_sim), float("inf"))
            second = _draw_columns(easiest.topk(k, dim=1, largest=False).indices, n_synthetic, generator)
        elif mixing == "anchor":
            first, second = self_idx[:, None].expand(rows, n_synthetic), first
        elif mixing == "duplicate":
            second = first
        else:
            second = _draw_columns(hard, n_synthetic, generator)
    draw_device = generator.device if generator is not None else neg_sim.device
    alpha_shape = (rows, n_synthetic, dim if mixing == "per_dim" else 1)
    alpha = torch.rand(alpha_shape, generator=generator, device=draw_device, dtype=neg_sim.dtype)
    alpha = alpha.to(neg_sim.device)
    if mixing == "anchor":
        alpha = 0.5 * alpha
    elif mixing == "duplicate":
        alpha = torch.ones_like(alpha)
    return _Parents(first, second, alpha)


def _mask_self_and_positive(
    sim: torch.Tensor, self_idx: torch.Tensor, pos_idx: torch.Tensor
) -> torch.Tensor:
    return sim.scatter(1, torch.stack([self_idx, pos_idx], dim=1), float("-inf"))


def _mix(pool: torch.Tensor, parents: _Parents) -> torch.Tensor:
    """``normalize(alpha pool[first] + (1 - alpha) pool[second])``; shape ``[A, S, D]``."""
    alpha = parents.alpha
    return normalize(alpha * pool[parents.first] + (1.0 - alpha) * pool[parents.second])


def synthetic_negatives(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    n_synthetic: int = 32,
    n_hard: int = 64,
    mixing: str = "hard",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The detached synthetic negatives SSCL adds for each of the 2B anchors (local mining).

    For anchor ``a`` of ``o = [z_a; z_b]`` (rows normalised), ``H_a`` = the ``n_hard`` real
    negatives (self and positive excluded) with the largest cosine to ``o_a``. Each synthetic
    negative is ``normalize(alpha o_i + (1 - alpha) o_j)`` with ``i, j ~ U(H_a)`` and
    ``alpha ~ U(0, 1)`` for ``mixing="hard"`` (other mixings: module docstring). Draws are fresh
    per call and independent per anchor; :func:`sscl_loss` consumes ``generator`` identically,
    so with equal generator states it uses exactly these vectors.

    Args:
        z_a: first views (unnormalised).
        z_b: second views (unnormalised).
        n_synthetic: synthetic negatives per anchor.
        n_hard: size of the hard-parent set (clamped to ``2B - 2``).
        mixing: one of ``MIXINGS``.
        generator: random generator (default: torch's global one).

    Shape:
        z_a, z_b: ``[B, D]``; returns ``[2B, n_synthetic, D]`` (unit rows, no grad).

    Complexity: O(B^2 D) for the similarities, O(B^2 log n_hard) for top-k,
    O(B n_synthetic D) for the mixing.
    """
    check_pair(z_a, z_b)
    with torch.no_grad():
        anchors, _, self_idx, pos_idx = two_view_bank(normalize(z_a), normalize(z_b), gather=False)
        neg_sim = _mask_self_and_positive(anchors @ anchors.T, self_idx, pos_idx)
        parents = _draw_parents(
            neg_sim, self_idx, pos_idx, n_hard, n_synthetic, mixing, anchors.shape[1], generator
        )
        return _mix(anchors, parents)


class _MixWeights(NamedTuple):
    """Synthetic scores as ``c_first * S[a, first] + c_second * S[a, second]`` (bank columns)."""

    first: torch.Tensor
    second: torch.Tensor
    c_first: torch.Tensor
    c_second: torch.Tensor


def _mix_weights(parents: _Parents, parent_cos: torch.Tensor, to_bank: torch.Tensor | None) -> _MixWeights:
    """Closed form of ``o_a . normalize(alpha o_i + (1 - alpha) o_j)`` for unit parents.

    It equals ``(alpha o_a.o_i + (1 - alpha) o_a.o_j) / sqrt(alpha^2 + (1 - alpha)^2 +
    2 alpha (1 - alpha) o_i.o_j)``, so the synthetic scores are read off the real score matrix.

    Shape:
        parents: ``[A, S]`` pool indices and ``alpha [A, S, 1]``; parent_cos: ``[A, S]``;
        to_bank: ``int64[P]`` bank column of each pool row (``None``: pool = bank).
    """
    alpha = parents.alpha.squeeze(-1)
    squared = alpha**2 + (1.0 - alpha) ** 2 + 2.0 * alpha * (1.0 - alpha) * parent_cos
    norm = squared.clamp_min(EPS**2).sqrt()
    first, second = parents.first, parents.second
    if to_bank is not None:
        first, second = to_bank[first], to_bank[second]
    return _MixWeights(first, second, alpha / norm, (1.0 - alpha) / norm)


class _ScoresWithSynthetic(torch.autograd.Function):
    """Real scores ``Q K^T`` and synthetic scores ``Q . sg(n_syn)`` from one matmul.

    Forward: ``S = Q K^T``; ``weights = make_weights(sg(S))`` (mining and draws, no gradient);
    ``syn = c_first * S[a, first] + c_second * S[a, second]``.
    Backward: the synthetic negatives are detached, so their gradient reaches ``Q`` only; it is
    scattered into the ``[A, M]`` gradient of ``S`` before the usual two matmuls
    (``dQ = (dS + scatter(d syn)) K``, ``dK = dS^T Q``), as for plain NT-Xent.
    """

    @staticmethod
    def forward(ctx, queries, keys, make_weights):  # type: ignore[override]  # noqa: D102
        scores = queries @ keys.T
        weights = make_weights(scores)
        syn = weights.c_first * scores.gather(1, weights.first)
        syn = syn + weights.c_second * scores.gather(1, weights.second)
        ctx.save_for_backward(queries, keys)
        ctx.weights = weights
        return scores, syn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_scores, d_syn):  # type: ignore[override]  # noqa: D102
        queries, keys = ctx.saved_tensors
        w = ctx.weights
        if d_scores is None:
            d_scores = queries.new_zeros(queries.shape[0], keys.shape[0])
        d_rows = d_scores.clone()
        if d_syn is not None:
            d_rows.scatter_add_(1, w.first, d_syn * w.c_first)
            d_rows.scatter_add_(1, w.second, d_syn * w.c_second)
        d_queries = d_rows @ keys if ctx.needs_input_grad[0] else None
        d_keys = d_scores.T @ queries if ctx.needs_input_grad[1] else None
        return d_queries, d_keys, None


def sscl_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    tau_plus: float = 0.1,
    beta: float = 1.0,
    n_hard: int = 64,
    n_synthetic: int = 32,
    generator: torch.Generator | None = None,
    *,
    mixing: str = "hard",
    gather: bool = False,
    mine_global: bool = False,
) -> torch.Tensor:
    """SSCL loss: HCL + DCL estimator over real and synthetic hard negatives, mean over 2B anchors.

    The synthetic scores are read off the real score matrix through the closed form of the
    normalised mix (:func:`_mix_weights`), so they cost no extra matmul; ``"per_dim"`` mixing
    has no closed form and materialises the ``[2B, n_synthetic, D]`` vectors.

    Args:
        z_a: first views (unnormalised; normalised inside).
        z_b: second views (unnormalised).
        temperature: t > 0.
        tau_plus: false-negative class prior, in [0, 1).
        beta: hardness concentration, >= 0 (multiplies s / t).
        n_hard: hard parents per anchor (clamped to the available negatives).
        n_synthetic: synthetic negatives per anchor (0 turns SSCL into HCL).
        generator: random generator for the parent and alpha draws.
        mixing: synthetic-negative recipe, one of ``MIXINGS`` (default ``"hard"``).
        gather: real negatives from all ranks (``2 W B - 2`` of them).
        mine_global: with ``gather``, mine hard parents among all ranks' views instead of the
            local ones.

    Shape:
        z_a, z_b: ``[B, D]``; returns a scalar.

    Complexity: O(B * W B * D) time (plus O(B^2 log n_hard) top-k), O(B * W B + B n_synthetic)
    memory (``"per_dim"``: O(B n_synthetic D) more).
    """
    check_pair(z_a, z_b)
    z_a, z_b = normalize(z_a), normalize(z_b)
    anchors, bank, self_idx, pos_idx = two_view_bank(z_a, z_b, gather)
    scaled = anchors / temperature
    pos = (scaled[: z_a.shape[0]] * z_b).sum(dim=1).repeat(2)
    n_neg = bank.shape[0] - 2
    syn = None
    if n_synthetic == 0:
        logits = scaled @ bank.T
    else:
        if bank is anchors or mine_global:
            pool, to_bank, pool_self, pool_pos = bank, None, self_idx, pos_idx
        else:
            pool, to_bank = anchors, self_idx
            pool_self, pool_pos = two_view_indices(z_a.shape[0], 0, z_a.shape[0], z_a.device)

        def draw(scores: torch.Tensor) -> tuple[_Parents, torch.Tensor]:
            """Mine and draw the parents; returns them with the pool's cosine matrix."""
            with torch.no_grad():
                gram = scores * temperature if bank is anchors else pool.detach() @ pool.detach().T
                rows = gram[self_idx] if mine_global and bank is not anchors else gram
                pool_neg = _mask_self_and_positive(rows, pool_self, pool_pos)
                parents = _draw_parents(
                    pool_neg, pool_self, pool_pos, n_hard, n_synthetic, mixing, anchors.shape[1],
                    generator,
                )
                return parents, gram

        def make_weights(scores: torch.Tensor) -> _MixWeights:
            parents, gram = draw(scores)
            return _mix_weights(parents, gram[parents.first, parents.second], to_bank)

        if mixing == "per_dim":
            logits = scaled @ bank.T
            parents, _ = draw(logits.detach())
            syn = torch.einsum("ad,asd->as", scaled, _mix(pool.detach(), parents))
        else:
            logits, syn = _ScoresWithSynthetic.apply(scaled, bank, make_weights)
        n_neg += n_synthetic
    neg = _mask_self_and_positive(logits, self_idx, pos_idx)
    if syn is not None:
        neg = torch.cat([neg, syn], dim=1)
    return debiased_hard_nce(pos, neg, temperature, tau_plus, beta, n_neg).mean()


class SSCLLoss(ContrastiveLoss):
    """SSCL as a module (registry name ``sscl``); see the module docstring for the math.

    ``forward(z_a, z_b, targets=None)``: ``z_a``, ``z_b`` are the projections of the two
    augmented views (row i of each is a positive pair); ``targets`` is unused.

    Args:
        temperature: t > 0 (author default 0.5).
        tau_plus: false-negative prior in [0, 1) (0.1).
        beta: hardness concentration >= 0 (1.0).
        n_hard: hard parents per anchor, >= 1 (64).
        n_synthetic: synthetic negatives per anchor, >= 0 (32).
        mixing: one of ``MIXINGS`` (``"hard"``).
        seed: seed of the module's own generator for the synthetic draws; ``None`` uses torch's
            global generator.
        gather: real negatives from all ranks.
        mine_global: mine hard parents across ranks (default: per rank, as the author code).
    """

    name = "sscl"
    distributed_flags = ("gather", "mine_global")

    def __init__(
        self,
        temperature: float = 0.5,
        tau_plus: float = 0.1,
        beta: float = 1.0,
        n_hard: int = 64,
        n_synthetic: int = 32,
        mixing: str = "hard",
        seed: int | None = None,
        gather: bool = False,
        mine_global: bool = False,
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_range("tau_plus", tau_plus, 0.0, 1.0, high_open=True)
        check_non_negative("beta", beta)
        check_int("n_hard", n_hard, 1)
        check_int("n_synthetic", n_synthetic, 0)
        check_choice("mixing", mixing, MIXINGS)
        if seed is not None:
            check_int("seed", seed, 0)
        check_bool("gather", gather)
        check_bool("mine_global", mine_global)
        self.temperature = temperature
        self.tau_plus = tau_plus
        self.beta = beta
        self.n_hard = n_hard
        self.n_synthetic = n_synthetic
        self.mixing = mixing
        self.seed = seed
        self.gather = gather
        self.mine_global = mine_global
        self._generator: torch.Generator | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed + dist.rank())
        return self._generator

    def forward(
        self, z_a: torch.Tensor, z_b: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SSCL loss of the two views.

        Args:
            z_a: first views.
            z_b: second views.
            targets: unused.

        Shape:
            z_a, z_b: ``[B, D]``; returns a scalar.
        """
        return sscl_loss(
            z_a,
            z_b,
            self.temperature,
            self.tau_plus,
            self.beta,
            self.n_hard,
            self.n_synthetic,
            self._generator_for(z_a.device),
            mixing=self.mixing,
            gather=self.gather,
            mine_global=self.mine_global,
        )
