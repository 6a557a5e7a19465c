"""LapSum soft top-k mask (Struski et al. 2025)."""

from __future__ import annotations

from torch import Tensor

from ..threshold import LAPLACE, threshold_mask


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
