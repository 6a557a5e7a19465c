"""Sparse p-norm soft top-k mask (Sander et al. 2023)."""

from __future__ import annotations

from torch import Tensor

from ..threshold import sparse_link, threshold_mask


def sparse_mask(x: Tensor, k: Tensor, *, temperature: float, p: float = 2.0, solver: str = "auto") -> Tensor:
    r"""Sparse soft top-k mask on rows (B, n): the p-norm regularised top-k LP.

    .. math::

        y = \arg\max_{y \in [0,1]^n,\ \mathbf{1}^\top y = k}
            \langle x, y\rangle - \frac{t}{p}\sum_i |y_i|^p
          = \operatorname{clip}\!\Big(\max\big(\tfrac{x - \tau}{t}, 0\big)^{1/(p-1)}, 0, 1\Big)

    with the scalar tau solved so that sum(y) = k. For p = 2 it is the Euclidean
    projection of x/t onto the capped simplex {y in [0,1]^n, sum y = k}, piecewise linear;
    p = 4/3 gives the cube of the clipped ramp, which is C^1. The output is exactly zero
    below tau, so at most k + (entries within t of the threshold) entries are non-zero,
    and exactly k when x_(k) - x_(k+1) > t. The temperature is Sander et al.'s ``l``.

    Reference:
        Sander, Puigcerver, Djolonga, Peyré, Blondel. "Fast, Differentiable and Sparse
        Top-k: a Convex Analysis Perspective", ICML 2023.
    """
    if solver in ("pav", "dykstra"):
        from ..isotonic import isotonic_sparse_mask  # the paper's sort + isotonic route

        return isotonic_sparse_mask(x, k, temperature=temperature, p=p, solver=solver)
    return threshold_mask(x, k, temperature, sparse_link(p), solver)
