"""DFTopK (Zhu et al. 2025): a logistic mask around the midpoint of x_(k) and x_(k+1)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import may_sync
from .._rows import RowRules, apply_rules, classify, regular_rows


def order_statistic(v: Tensor, p: Tensor) -> Tensor:
    """The order statistic of rank ``p`` (1 = largest) of each row, linearly interpolated.

    ``p`` (B,) lies in [1, n]. x_(floor p) and x_(floor p + 1) are found by selection:
    two ``torch.kthvalue`` calls when every row asks for the same ranks (O(n), what the
    DFTopK code does), else one ``torch.topk`` of the largest floor(max p) + 1 values
    (no full sort). Gradients reach the entries equal to the two selected values, split
    evenly among tied entries (which of them a selection returns is arbitrary and would
    make the gradient depend on the route and the batch).
    """
    n = v.shape[-1]
    j = p.floor()
    f = p - j
    jl = j.long()
    with torch.no_grad():
        if may_sync(v):
            j_lo, j_hi = (int(a) for a in torch.aminmax(jl))
            same_ranks = j_lo == j_hi
            K = min(n, j_hi + 1)
        else:
            same_ranks, K = False, n
        if same_ranks:
            a = -torch.kthvalue(-v, j_hi, dim=-1).values
            b = -torch.kthvalue(-v, j_hi + 1, dim=-1).values if j_hi < n else a
        else:
            vals = torch.topk(v, K, dim=-1).values
            a = vals.gather(-1, (jl - 1).clamp(0, K - 1).unsqueeze(-1)).squeeze(-1)
            b = vals.gather(-1, jl.clamp(0, K - 1).unsqueeze(-1)).squeeze(-1)
        b = torch.where(f > 0, b, a)
    # no_grad stops reverse mode only: detached, the selected values carry no forward-mode
    # tangent either, which _tied_share adds once
    a, b = _tied_share(v, a.detach()), _tied_share(v, b.detach())
    return a + f * (b - a)


def _tied_share(v: Tensor, value: Tensor) -> Tensor:
    """``value`` (B,), an entry of each row of v, differentiable: 1/m to each of its m copies."""
    tied = v.detach() == value.unsqueeze(-1)
    share = tied.to(v.dtype) / tied.sum(-1, keepdim=True).clamp(min=1).to(v.dtype)
    # zero in value; the where keeps infinite entries elsewhere in the row out of it
    return value + torch.where(tied, share * (v - v.detach()), 0.0).sum(-1)


def dftopk_threshold(x: Tensor, k: Tensor) -> Tensor:
    """DFTopK's threshold theta of rows (B, n): (x_(k) + x_(k+1)) / 2 for integer k.

    For a real k the rank k + 1/2 is interpolated between order statistics
    (theta = x_(j) + f (x_(j+1) - x_(j)) with j + f = k + 1/2), which is the paper's
    midpoint at every integer k. The rank is kept inside the entries above -inf and
    below the +inf ones, so theta is finite on every regular row; rows set by a rule
    (k = 0, k >= n, NaN, k or more +inf entries) get theta = 0.
    """
    rules = classify(x, k)
    n_top = rules.n_fin + rules.n_pos
    return _threshold(regular_rows(x, rules), k, rules, n_top)


def _threshold(v: Tensor, k: Tensor, rules: RowRules, n_top: Tensor) -> Tensor:
    lo = torch.where(rules.regular, rules.n_pos + 1.0, 1.0)
    hi = torch.where(rules.regular, n_top, 1.0).clamp(min=lo)
    return order_statistic(v, (k.detach().to(v.dtype) + 0.5).clamp(lo, hi))


def dftopk_mask(x: Tensor, k: Tensor, *, temperature: float, solver: str = "auto") -> Tensor:
    r"""DFTopK soft top-k mask on rows (B, n) (Zhu et al. 2025).

    .. math::

        \theta(x) = \frac{x_{(k)} + x_{(k+1)}}{2},\qquad
        y_i = \sigma\Big(\frac{x_i - \theta(x)}{t}\Big),\qquad
        \frac{\partial y_i}{\partial x_j} = \frac{y_i (1 - y_i)}{t}
            \Big(\delta_{ij} - \tfrac12 [j \in \{(k), (k+1)\}]\Big),

    with x_(k) the k-th largest entry and sigma the logistic function. The threshold is
    found by selection (two ``torch.kthvalue`` calls, O(n), no sort) and is not
    detached, so each entry's gradient couples only to itself and to the two boundary
    entries (the paper's "localised gradients"). ``temperature`` is the paper's tau.

    The paper relaxes the normalisation: **sum(y) is not k** (it tends to k only as
    t -> 0; for t -> inf every entry tends to 1/2), and entries tied with theta get 1/2.
    Hard limit: the torch.topk mask when x_(k) > x_(k+1). For a real k the threshold
    interpolates the order statistics at rank k + 1/2 (see :func:`dftopk_threshold`),
    the paper's midpoint at every integer k; the mask is not differentiated in k. Rows
    with k = 0, k >= n, NaN or infinities follow the library's row rules.

    Reference:
        Zhu, Zhang, Wang, Wang, Li, Zhou, Wen, Jiang, Lin, Yang. "DFTopK: Differentiable
        Fast Top-K Selection for Large-Scale Recommendation", arXiv:2510.11472, 2025.
    """
    if k.requires_grad:
        raise ValueError("method='dftopk' is not differentiable in k; pass a k that does not require grad")
    rules = classify(x, k)
    n_top = rules.n_fin + rules.n_pos
    v = regular_rows(x, rules)
    theta = _threshold(v, k, rules, n_top).unsqueeze(-1)
    y = torch.sigmoid((v - theta) / temperature)
    return apply_rules(x, k, y, rules)
