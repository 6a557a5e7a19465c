r"""Ranking losses: cascade selection losses (DFTopK, LCRON) over soft masks, and LambdaLoss.

Cascade ranking (retrieval -> pre-ranking -> ...) trains every stage to keep the items
that the final stage would rank in its top K. With a soft top-k mask
:math:`P_s = \mathrm{mask}(x^{(s)}, m_s)` (the relaxed membership of each item in the
top m_s of stage s) and the ground-truth top-K indicator y:

* DFTopK (Zhu et al. 2025): a BCE per stage between P_s (at budget m_s = K) and y, plus a
  joint BCE on the product of the stages' masks, combined with learned uncertainty
  weights L = sum_s L_s / (2 w_s^2) + L_joint + log prod_s w_s;
* LCRON (Wang et al. 2025): the same structure with each stage at its own output size
  m_s: the joint term -sum_i [y_i log prod_s P_s,i + (1 - y_i) log(1 - prod_s P_s,i)]
  is the relaxed log-probability that a ground-truth item survives every stage
  (L_e2e), and the per-stage terms are the relaxed Recall@K@m_s (L_single).

Both use the registry's mask operators by name (DFTopK's own operator once it is in
the registry is ``method="dftopk"``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_choice,
    check_generator,
    check_positive,
    check_temperature,
    check_tensor,
    has_values,
)
from ..registry import resolve


class CascadeTerms(NamedTuple):
    """The parts of a cascade loss.

    Attributes:
        stages: (S,) the per-stage BCE losses (each a mean over rows and items).
        joint: the joint BCE on the product of the stages' masks (0-dim).
        masks: the soft masks of the stages, one (..., n) tensor each.
    """

    stages: Tensor
    joint: Tensor
    masks: tuple[Tensor, ...]


def _bce(p: Tensor, y: Tensor) -> Tensor:
    """Mean binary cross-entropy exactly as torch's, but NaN (not an error) where p is NaN.

    torch's clamps the logarithm at -100 and its gradient's denominator at 1e-12, so it is
    finite where p is exactly 0 or 1 (sparse masks), where the mask's Jacobian is zero
    anyway. torch raises on a NaN input; here a NaN score (so a NaN mask row) makes the
    loss NaN, as for every other operator of the library.
    """
    dtype = torch.promote_types(p.dtype, torch.float32)
    p, y = p.to(dtype), y.to(dtype)
    nan = torch.isnan(p)
    terms = F.binary_cross_entropy(torch.where(nan, 0.5, p).clamp(0.0, 1.0), y, reduction="none")
    return torch.where(nan, math.nan, terms).mean()


def _log_bce(p: Tensor, y: Tensor) -> Tensor:
    # LCRON's form: -y log(p + 1e-6) - (1 - y) log(1 - p + 1e-6), mean over items. Masks of
    # the unbounded operators (relaxed permutations, subset samples) can exceed 1: p is
    # clipped to [0, 1] first, as in _bce, so that the logarithm stays finite.
    dtype = torch.promote_types(p.dtype, torch.float32)
    p, y = p.to(dtype).clamp(0.0, 1.0), y.to(dtype)
    return (-(y * torch.log(p + 1e-6) + (1 - y) * torch.log(1 - p + 1e-6))).mean()


def _cascade_terms(
    stage_scores: Sequence[Tensor],
    target: Tensor,
    budgets: Sequence[float | Tensor] | None,
    method: str | Callable[..., Tensor],
    temperature: float | None,
    generator: torch.Generator | None,
    bce: Callable[[Tensor, Tensor], Tensor] = _bce,
) -> CascadeTerms:
    if len(stage_scores) == 0:
        raise ValueError("stage_scores must hold at least one stage")
    first = check_tensor(stage_scores[0], "stage_scores[0]")
    if not isinstance(target, Tensor) or target.shape != first.shape:
        raise ValueError(
            f"target must be a tensor of the shape {tuple(first.shape)} of the scores, got "
            f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}"
        )
    yt = target.to(torch.promote_types(first.dtype, torch.float32))
    if has_values(yt) and yt.numel() and bool(((yt < 0) | (yt > 1)).any()):
        raise ValueError("target must hold values in [0, 1] (the ground-truth top-K indicator)")
    if budgets is None:
        budgets = [yt.sum(-1)] * len(stage_scores)
    if len(budgets) != len(stage_scores):
        raise ValueError(f"budgets must have one entry per stage ({len(stage_scores)}), got {len(budgets)}")
    op = resolve(method)
    t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    masks = []
    for s, (x, k) in enumerate(zip(stage_scores, budgets, strict=True)):
        x = check_tensor(x, f"stage_scores[{s}]")
        if x.shape != first.shape:
            raise ValueError(
                f"stage_scores[{s}] must have the shape {tuple(first.shape)}, got {tuple(x.shape)}"
            )
        # Masks of half-precision scores are formed in float32: the BCE's gradient near a
        # mask value of 0 or 1 is far beyond float16's range.
        xw = x.to(torch.promote_types(x.dtype, torch.float32))
        masks.append(op(xw, k, -1, temperature=t, generator=generator))
    stages = torch.stack([bce(p, yt) for p in masks])
    joint = bce(math.prod(masks[1:], start=masks[0]), yt)
    return CascadeTerms(stages, joint, tuple(masks))


def dftopk_cascade_loss(
    stage_scores: Sequence[Tensor],
    target: Tensor,
    *,
    k: float | Tensor | None = None,
    method: str | Callable[..., Tensor] = "sparse",
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> CascadeTerms:
    r"""DFTopK's cascade losses: per-stage and joint BCE between soft top-K masks and the ground truth.

    .. math::

        P_s = \mathrm{mask}(x^{(s)}, K),\quad
        L_s = \mathrm{BCE}(P_s, y),\quad
        L_{\mathrm{joint}} = \mathrm{BCE}\Big(\prod_s P_s,\ y\Big)

    with y the 0/1 indicator of the ground-truth top K (the items a later stage ranks in
    its top K). Combine the terms with :class:`CascadeLoss` (learned uncertainty weights,
    as in the paper's code) or by hand. DFTopK's operator is
    sigmoid((x - (x_(K) + x_(K+1))/2)/tau); here any mask operator of the registry serves.

    Args:
        stage_scores: one (..., n) score tensor per stage (e.g. retrieval, pre-ranking),
            over the same candidate items.
        target: (..., n) ground-truth indicator in [0, 1].
        k: the mask budget K; None uses the number of ground-truth items per row.
        method: a mask operator of :data:`softtopk.registry.OPERATORS`, or a callable.
        temperature: the operator's temperature; None uses the registry default.
        generator: the ``torch.Generator`` a stochastic method (``"perturbed"``, ``"subset"``)
            draws its noise from; None uses the global generator. Ignored by the other methods.

    Returns:
        :class:`CascadeTerms` (per-stage losses, joint loss, the masks).

    Example:
        >>> import torch, softtopk
        >>> x1, x2 = torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[0.0, 3.0, 2.0, 1.0]])
        >>> y = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
        >>> terms = softtopk.losses.dftopk_cascade_loss([x1, x2], y, temperature=0.01)
        >>> terms.stages
        tensor([ 0., 50.])

    Reference:
        Zhu et al. "Differentiable Fast Top-K Selection for Large-Scale Recommendation"
        (DFTopK), arXiv 2510.11472, 2025.
    """
    budgets = None if k is None else [k] * len(stage_scores)
    return _cascade_terms(stage_scores, target, budgets, method, temperature, generator)


def lcron_loss(
    stage_scores: Sequence[Tensor],
    target: Tensor,
    ms: Sequence[float | Tensor],
    *,
    method: str | Callable[..., Tensor] = "sparse",
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> CascadeTerms:
    r"""LCRON-style end-to-end cascade loss: the relaxed probability that ground truth survives every stage.

    .. math::

        P_s = \mathrm{mask}(x^{(s)}, m_s),\quad
        L_{e2e} = -\tfrac1n \sum_i \Big[y_i \log\Big(\prod_s P_{s,i} + \epsilon\Big)
                  + (1 - y_i) \log\Big(1 - \prod_s P_{s,i} + \epsilon\Big)\Big],\quad
        L_{\mathrm{single},s} = \mathrm{BCE}_\epsilon(P_s, y)

    P_s,i is the relaxed probability that item i is in the top m_s of stage s (LCRON
    reads it off a NeuralSort permutation matrix, normalised by its detached column sum;
    a soft top-k mask gives it directly and in O(n) instead of O(n^2)); epsilon = 1e-6 as
    in the LCRON code (DFTopK's BCE clamps the log at -100 instead). The product over
    stages lower-bounds the probability that the item survives the cascade. The released
    LCRON code sets every m_s to K (the ground-truth size); the paper's m_s are the
    stages' output sizes.

    Args:
        stage_scores: one (..., n) score tensor per stage.
        target: (..., n) ground-truth top-K indicator in [0, 1].
        ms: the budget of each stage (a number or a per-row tensor).
        method: a mask operator of :data:`softtopk.registry.OPERATORS`, or a callable.
        temperature: the operator's temperature; None uses the registry default.
        generator: the ``torch.Generator`` a stochastic method (``"perturbed"``, ``"subset"``)
            draws its noise from; None uses the global generator. Ignored by the other methods.

    Returns:
        :class:`CascadeTerms`: ``stages`` are the L_single, ``joint`` is L_e2e.

    Example:
        >>> import torch, softtopk
        >>> x1, x2 = torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[0.0, 3.0, 2.0, 1.0]])
        >>> y = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
        >>> softtopk.losses.lcron_loss([x1, x2], y, [3, 3], temperature=0.01).joint  # 2 log(1e6) / 4
        tensor(6.9078)

    Reference:
        Wang et al. "Learning Cascade Ranking as One Network" (LCRON), ICML 2025.
    """
    return _cascade_terms(stage_scores, target, list(ms), method, temperature, generator, _log_bce)


class CascadeLoss(nn.Module):
    r"""Cascade loss with learned uncertainty weights (DFTopK's and LCRON's combination).

    .. math::

        L = \sum_s \frac{L_s}{2 w_s^2} + L_{\mathrm{joint}} + \log \prod_s w_s

    The weights w_s are parameters (initialised to 1) trained with the model (Kendall et
    al. 2018's multi-task weighting, as in both papers' code).

    Args:
        num_stages: S, the number of stages.
        recipe: ``"dftopk"`` (every mask at budget K, the ground-truth size) or
            ``"lcron"`` (stage s at budget ``ms[s]``).
        ms: the stage budgets for ``"lcron"``.
        method, temperature, generator: the mask operator, as in :func:`dftopk_cascade_loss`.

    Example:
        >>> import torch, softtopk
        >>> criterion = softtopk.losses.CascadeLoss(2, recipe="lcron", ms=[3, 2])
        >>> x1, x2, y = torch.randn(5, 8), torch.randn(5, 8), torch.zeros(5, 8)
        >>> y[:, :2] = 1
        >>> criterion([x1, x2], y).shape
        torch.Size([])
    """

    def __init__(
        self,
        num_stages: int,
        *,
        recipe: str = "dftopk",
        ms: Sequence[float] | None = None,
        method: str | Callable[..., Tensor] = "sparse",
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_stages, bool) or not isinstance(num_stages, numbers.Integral) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
        self.recipe = check_choice(recipe, "recipe", ("dftopk", "lcron"))
        if recipe == "lcron" and (ms is None or len(ms) != num_stages):
            raise ValueError(f"recipe='lcron' needs ms with one budget per stage ({num_stages}), got {ms!r}")
        resolve(method)
        check_temperature(temperature)
        self.num_stages, self.ms, self.method, self.temperature = int(num_stages), ms, method, temperature
        self.generator = check_generator(generator)
        self.weights = nn.Parameter(torch.ones(int(num_stages)))

    def terms(self, stage_scores: Sequence[Tensor], target: Tensor) -> CascadeTerms:
        if len(stage_scores) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stages, got {len(stage_scores)}")
        if self.recipe == "lcron":
            return lcron_loss(
                stage_scores,
                target,
                self.ms,
                method=self.method,
                temperature=self.temperature,
                generator=self.generator,
            )
        return dftopk_cascade_loss(
            stage_scores, target, method=self.method, temperature=self.temperature, generator=self.generator
        )

    def forward(self, stage_scores: Sequence[Tensor], target: Tensor) -> Tensor:
        terms = self.terms(stage_scores, target)
        return uncertainty_weighted(terms.stages, terms.joint, self.weights)

    def extra_repr(self) -> str:
        return (
            f"num_stages={self.num_stages}, recipe={self.recipe!r}, ms={self.ms}, method={self.method!r}, "
            f"temperature={self.temperature}"
        )


def uncertainty_weighted(stages: Tensor, joint: Tensor, weights: Tensor) -> Tensor:
    r"""sum_s L_s / (2 w_s^2) + L_joint + log prod_s abs(w_s) (the combination of DFTopK and LCRON).

    .. math::

        L = \sum_s \frac{L_s}{2 w_s^2} + L_{\mathrm{joint}} + \sum_s \log |w_s|

    Example:
        >>> import torch, softtopk
        >>> softtopk.losses.uncertainty_weighted(torch.tensor([2.0, 4.0]), torch.tensor(1.0), torch.ones(2))
        tensor(4.)
    """
    if weights.shape != stages.shape:
        raise ValueError(
            f"weights must have the shape {tuple(stages.shape)} of stages, got {tuple(weights.shape)}"
        )
    return (stages / (2 * weights.square())).sum() + joint + weights.abs().log().sum()


def lambda_loss(
    scores: Tensor,
    relevance: Tensor,
    *,
    k: int | None = None,
    truncation: str = "either",
    weighting: str = "ndcg2++",
    temperature: float = 1.0,
    mu: float = 10.0,
    reduction: str = "mean",
) -> Tensor:
    r"""LambdaLoss (Wang et al. 2018): pairwise logistic loss weighted by NDCG changes.

    For the pairs with rel_i > rel_j, with the ranks r of the current scores (no
    gradient through the sort), G_i = (2^{rel_i} - 1)/maxDCG, D_i = log2(1 + r_i):

    .. math::

        \ell = -\sum_{\mathrm{rel}_i > \mathrm{rel}_j} w_{ij}\,
               \log_2 \sigma\big((s_i - s_j) / t\big),\qquad
        \rho_{ij} = \Big|\frac{1}{D_i} - \frac{1}{D_j}\Big|,\quad
        \delta_{ij} = \Big|\frac{1}{D(|r_i - r_j|)} - \frac{1}{D(|r_i - r_j| + 1)}\Big|

    with w = rho abs(G_i - G_j) (``"lambdarank"``, the abs(Delta NDCG) of LambdaRank),
    delta abs(G_i - G_j) (``"ndcg2"``, NDCG-Loss2) or (rho + mu delta) abs(G_i - G_j)
    (``"ndcg2++"``, NDCG-Loss2++). With k, maxDCG is taken at k and only pairs with an
    item ranked in the top k count (NDCG@k): at least one of the two (``"either"``, as
    LambdaMART's truncation level) or both (``"both"``, as allRank's ``lambdaLoss``).
    O(n^2) per list: a baseline for the learning-to-rank experiments, not a top-k
    operator.

    Args:
        scores: (..., n) predicted scores; -inf marks padding (give it relevance 0).
        relevance: (..., n) non-negative graded relevance.
        k: NDCG cut-off, or None for the whole list.
        truncation: ``"either"`` or ``"both"``: which pairs count with k (see above).
        weighting: ``"ndcg2++"``, ``"ndcg2"`` or ``"lambdarank"``.
        temperature: t > 0, the scale of the pairwise logistic (the paper's 1 / sigma).
        mu: the weight of delta in ``"ndcg2++"``.
        reduction: ``"mean"`` or ``"sum"`` over lists, or ``"none"``.

    Example:
        >>> import torch, softtopk
        >>> s = torch.tensor([[0.0, 1.0, 2.0]]); rel = torch.tensor([[2.0, 1.0, 0.0]])
        >>> softtopk.losses.lambda_loss(s, rel, weighting="lambdarank") > 0
        tensor(True)

    Reference:
        Wang, Li, Golbandi, Bendersky, Najork. "The LambdaLoss Framework for Ranking
        Metric Optimization", CIKM 2018.
    """
    scores = check_tensor(scores, "scores")
    if not isinstance(relevance, Tensor) or relevance.shape != scores.shape:
        raise ValueError(f"relevance must be a tensor of the shape {tuple(scores.shape)} of scores")
    weighting = check_choice(weighting, "weighting", ("ndcg2++", "ndcg2", "lambdarank"))
    truncation = check_choice(truncation, "truncation", ("either", "both"))
    reduction = check_choice(reduction, "reduction", ("mean", "sum", "none"))
    t = check_positive(temperature, "temperature")
    mu = float(mu)
    n = scores.shape[-1]
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n):
        raise ValueError(f"k must be an int in [1, {n}] or None, got {k!r}")
    kk = n if k is None else int(k)
    s = scores.reshape(-1, n)
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    rel = relevance.reshape(-1, n).to(s.dtype)
    if has_values(rel) and rel.numel() and bool((rel < 0).any()):
        raise ValueError("relevance must be non-negative")
    # Ranks of the current scores (1-based), without gradient.
    order = s.detach().argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(1, n + 1, device=s.device).expand_as(order)
    )
    rank = rank.to(s.dtype)
    gain = torch.expm1(rel * math.log(2.0))
    discount = 1.0 / torch.log2(torch.arange(2, kk + 2, dtype=s.dtype, device=s.device))
    max_dcg = (gain.sort(-1, descending=True).values[:, :kk] * discount).sum(-1, keepdim=True)
    G = torch.where(max_dcg > 0, gain / max_dcg.clamp(min=1e-30), 0.0)
    inv_d = 1.0 / torch.log2(1.0 + rank)
    pairs = rel.unsqueeze(-1) > rel.unsqueeze(-2)  # (B, i, j): rel_i > rel_j
    if k is not None:
        pick = torch.minimum if truncation == "either" else torch.maximum
        pairs = pairs & (pick(rank.unsqueeze(-1), rank.unsqueeze(-2)) <= kk)
    dG = (G.unsqueeze(-1) - G.unsqueeze(-2)).abs()
    rho = (inv_d.unsqueeze(-1) - inv_d.unsqueeze(-2)).abs()
    gap = (rank.unsqueeze(-1) - rank.unsqueeze(-2)).abs()
    delta = (1.0 / torch.log2(1.0 + gap.clamp(min=1.0)) - 1.0 / torch.log2(2.0 + gap)).abs()
    if weighting == "lambdarank":
        w = rho * dG
    elif weighting == "ndcg2":
        w = delta * dG
    else:
        w = (rho + mu * delta) * dG
    diff = s.unsqueeze(-1) - s.unsqueeze(-2)
    # Pairs outside the mask (and -inf - -inf = NaN between padded items) contribute 0.
    diff = torch.where(pairs, diff, 0.0)
    per_pair = torch.where(pairs, w * F.logsigmoid(diff / t) / math.log(2.0), 0.0)
    loss = -per_pair.sum((-2, -1))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(scores.shape[:-1])
