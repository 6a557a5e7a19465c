"""The threshold family: links, the row solver (kernels and the tensor-op reference) and autograd."""

from ._function import ThresholdMask, threshold_mask
from ._links import LAPLACE, LOGISTIC, Link, link_of_code, sparse_link
from ._reference import reference_forward, solve_dense, solve_sort, sorted_clip_tau, sorted_laplace_tau

__all__ = [
    "LAPLACE",
    "LOGISTIC",
    "Link",
    "ThresholdMask",
    "link_of_code",
    "reference_forward",
    "solve_dense",
    "solve_sort",
    "sorted_clip_tau",
    "sorted_laplace_tau",
    "sparse_link",
    "threshold_mask",
]
