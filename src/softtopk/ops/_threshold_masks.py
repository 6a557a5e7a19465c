"""The threshold family's masks on rows: sparse (Sander et al. 2023), entropic (SOFT, LML), LapSum.

Each is y_i = G((x_i - tau) / t) with sum(y) = k for its own link G; the threshold solver
(:mod:`softtopk.threshold`) finds tau and provides the backward.
"""

from __future__ import annotations

from torch import Tensor

from ..threshold import LAPLACE, LOGISTIC, sparse_link, threshold_mask


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


def entropic_mask(x: Tensor, k: Tensor, *, temperature: float, solver: str = "auto") -> Tensor:
    r"""Entropy-regularised soft top-k mask on rows (B, n).

    .. math::

        y = \arg\max_{y \in [0,1]^n,\ \mathbf{1}^\top y = k}
            \langle x, y\rangle + t\sum_i H(y_i)
          = \sigma\!\Big(\frac{x - \tau}{t}\Big),\qquad \sum_i y_i = k,

    with H the binary entropy and sigma the logistic function. This is exactly the
    converged plan of SOFT top-k (Xie et al. 2020) with two anchors: with SOFT's cost
    normalised by its maximum C_max and entropic strength epsilon, its mask equals this
    one at ``temperature = epsilon * C_max / 2`` (SOFT selects the k smallest; negate x).
    It is also LML (Amos et al. 2019) and ott-jax ``soft_sort.topk_mask`` without its
    squashing function at ``temperature = epsilon / 2``. Dense: every entry is in (0, 1).

    References:
        Xie et al. "Differentiable Top-k Operator with Optimal Transport", NeurIPS 2020.
        Amos, Koltun, Kolter. "The Limited Multi-Label Projection Layer", 2019.
    """
    return threshold_mask(x, k, temperature, LOGISTIC, solver)


def lapsum_mask(x: Tensor, k: Tensor, *, temperature: float, solver: str = "auto") -> Tensor:
    r"""LapSum soft top-k mask on rows (B, n): a Laplace CDF with a solved threshold.

    .. math::

        y_i = F\Big(\frac{x_i - b}{t}\Big),\quad
        F(z) = \begin{cases} \tfrac12 e^{z} & z \le 0 \\ 1 - \tfrac12 e^{-z} & z > 0\end{cases},
        \qquad \sum_i y_i = k.

    The temperature is LapSum's ``alpha`` (the paper selects the largest entries with
    alpha < 0; here t = abs(alpha) > 0 and the largest entries are selected). LapSum finds b
    after a sort; the default solver finds the same b without one, and ``solver="sort"``
    runs the paper's closed form. Dense: every entry is in (0, 1).

    Reference:
        Struski, Bednarczyk, Podolak, Tabor. "LapSum -- One Method to Differentiate Them
        All: Ranking, Sorting and Top-k Selection", ICML 2025.
    """
    return threshold_mask(x, k, temperature, LAPLACE, solver)
