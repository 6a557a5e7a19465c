"""Entropic (logistic) soft top-k mask: SOFT with two anchors, LML, ott-jax's topk_mask."""

from __future__ import annotations

from torch import Tensor

from ..threshold import LOGISTIC, threshold_mask


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
