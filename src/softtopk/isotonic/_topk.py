"""Sander et al.'s own route to the sparse top-k mask: sort, then isotonic regression.

For p = 2 the mask is the Euclidean projection of x / t onto the capped simplex
{y in [0, 1]^n, sum y = k}, which is the permutahedron of w = (1, ..., 1, frac(k), 0, ...):

    s = x sorted in decreasing order,   v* = argmin_{v decreasing} 1/2 ||v - (s - t w)||^2,
    y (sorted) = (s - v*) / t.

This is the same operator as ``topk_mask(method="sparse")`` (the threshold solver), kept
for reproduction and as an internal cross-check: the two routes must agree to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._rows import apply_rules, classify
from ..threshold._reference import finite_stand_ins
from ._function import isotonic_rows
from ._pav import segment_sum

#: Iteration budget of Dykstra on the top-k route (``topk_mask`` has no max_iter argument).
TOPK_DYKSTRA_MAX_ITER = 20_000


def _capped_steps(k: Tensor, n: int) -> Tensor:
    """w_j = clamp(k - j, 0, 1) for j = 0..n-1, with one derivative in k per unit of k.

    ``clamp``'s own backward passes the gradient at both ends of [0, 1], so at an integer
    k both w_{k-1} (at 1) and w_k (at 0) would move with k: d(sum w)/dk = 2 where it is 1,
    and the mask's k-gradient doubles (the central difference sees half of that on each
    entry). Here the derivative at an integer k is split evenly between the two steps (the
    average of the one-sided derivatives, so the sum stays 1; when the threshold is inside
    an active block, both entries lie in that block and the split does not change the
    result). At k = 0 and k = n only the one step that exists takes it.
    """
    j = torch.arange(n, device=k.device, dtype=k.dtype)
    d = k.detach().unsqueeze(-1) - j
    w = d.clamp(0.0, 1.0)
    if not k.requires_grad:
        return w
    inside = ((d > 0) & (d < 1)).to(k.dtype)
    edge = ((d == 0) | (d == 1)).to(k.dtype)
    # k = 0 or k = n: a single edge, which takes the whole derivative.
    edges = edge.sum(-1, keepdim=True)
    slope = inside + edge / edges.clamp(min=1.0)
    return w + (k - k.detach()).unsqueeze(-1) * slope


def isotonic_sparse_mask(
    x: Tensor, k: Tensor, *, temperature: float, p: float = 2.0, solver: str = "pav"
) -> Tensor:
    r"""Sparse soft top-k mask on rows (B, n) by sort + isotonic regression (p = 2).

    .. math::

        y_{\sigma} = \frac{s - v^\star}{t},\qquad
        v^\star = \arg\min_{v_1 \ge \dots \ge v_n} \tfrac12\|v - (s - t\,w)\|^2

    Rows follow the rules of the threshold solver (NaN rows are NaN, k = 0 gives zeros,
    -inf entries are padding, +inf entries are kept first). Differentiable in x and in k
    through the block Jacobian of the isotonic regression.

    Args:
        x: (B, n) scores in the compute dtype.
        k: (B,) budgets in [0, n].
        temperature: t > 0 (Sander et al.'s l).
        p: must be 2 (the cubic pooling of p = 4/3 is not implemented on this route).
        solver: ``"pav"`` (exact) or ``"dykstra"`` (certified, warns when it is not).

    Reference:
        Sander, Puigcerver, Djolonga, Peyré, Blondel. "Fast, Differentiable and Sparse
        Top-k: a Convex Analysis Perspective", ICML 2023.
    """
    if p != 2.0:
        raise ValueError(
            f"solver={solver!r} supports p = 2 only (the threshold solvers cover p < 2), got p={p!r}"
        )
    t = temperature
    B, n = x.shape
    dtype = x.dtype
    # In float64: the isotonic problem is posed on s - t w, whose entries are about
    # abs(x), so a float32 solve would lose the mask once abs(x) / t nears 1 / eps.
    x, k = x.to(torch.float64), k.to(torch.float64)
    rules = classify(x.detach(), k.detach())
    s, perm = x.sort(-1, descending=True)
    finite = torch.isfinite(s)
    # +-inf (and NaN) get finite stand-ins beyond the reach of the threshold; they are
    # saturated or zero and never pooled with finite entries.
    s = torch.where(finite, s, finite_stand_ins(s.detach(), 2.0 * t + 1.0))
    k_safe = torch.where(rules.regular, k, torch.ones_like(k))
    w = _capped_steps(k_safe, n)
    # The solve gives the partition into blocks; y is then written from s and w by block
    # means, y = mean_B(w) + (s - mean_B(s)) / t, which equals (s - v) / t but subtracts
    # only entries of one block (they lie within t of each other): a saturated entry far
    # above the others is a block of one and gets w exactly, where s - v would lose it to
    # the rounding of s (its ulp exceeds t once abs(x) / t nears 1 / eps). It is linear in
    # (s, w) for a fixed partition, so the gradients (first and higher order, forward
    # mode) are the isotonic regression's block Jacobian.
    bid = isotonic_rows((s - t * w).detach(), None, "l2", solver, TOPK_DYKSTRA_MAX_ITER, 1e-6)[1]
    size = segment_sum(torch.ones_like(s), bid).gather(-1, bid)
    s_mean = segment_sum(s, bid).gather(-1, bid) / size
    w_mean = segment_sum(w, bid).gather(-1, bid) / size
    ys = w_mean + (s - s_mean) / t
    ys = ys + (ys.detach().clamp(0.0, 1.0) - ys.detach())
    y = torch.zeros_like(ys).scatter(-1, perm, ys)
    return apply_rules(x.detach(), k, y, rules).to(dtype)
