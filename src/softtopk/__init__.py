"""softtopk: differentiable top-k operators, exact to their papers, in linear time.

>>> import torch, softtopk
>>> softtopk.topk_mask(torch.tensor([3.0, 1.0, 2.0]), 2, temperature=0.01)
tensor([1., 0., 1.])
"""

from . import losses, metrics, nn, registry
from .ops import (
    permutation_topk_mask,
    relaxed_subset,
    soft_sinkhorn_mask,
    soft_threshold_p_mask,
    threshold_p_gate,
    threshold_p_mask,
    topk_indicators,
    topk_mag,
    topk_mask,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "losses",
    "metrics",
    "nn",
    "permutation_topk_mask",
    "registry",
    "relaxed_subset",
    "soft_sinkhorn_mask",
    "soft_threshold_p_mask",
    "threshold_p_gate",
    "threshold_p_mask",
    "topk_indicators",
    "topk_mag",
    "topk_mask",
]
