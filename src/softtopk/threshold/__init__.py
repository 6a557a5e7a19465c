"""The threshold family (DESIGN 2.1): links, the row solver and the implicit backward."""

from ._function import CurvedThresholdMask, ThresholdMask, threshold_backward, threshold_mask
from ._links import LAPLACE, LOGISTIC, Link, sparse_link
from ._solver import Solution, solve, sorted_clip_tau, sorted_laplace_tau

__all__ = [
    "LAPLACE",
    "LOGISTIC",
    "CurvedThresholdMask",
    "Link",
    "Solution",
    "ThresholdMask",
    "solve",
    "sorted_clip_tau",
    "sorted_laplace_tau",
    "sparse_link",
    "threshold_backward",
    "threshold_mask",
]
