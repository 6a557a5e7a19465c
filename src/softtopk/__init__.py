"""softtopk: differentiable top-k operators, exact to their papers, in linear time.

>>> import torch, softtopk
>>> softtopk.topk_mask(torch.tensor([3.0, 1.0, 2.0]), 2, temperature=0.01)
tensor([1., 0., 1.])
"""

from . import isotonic, losses, metrics, nn, registry, sampling
from .isotonic import isotonic_regression, permutahedron_projection, soft_rank, soft_sort
from .ops import (
    permutation_topk_mask,
    relaxed_subset,
    soft_sinkhorn_mask,
    soft_threshold_p_mask,
    threshold_p_gate,
    threshold_p_mask,
    topk,
    topk_indicators,
    topk_mag,
    topk_mask,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "isotonic",
    "isotonic_regression",
    "losses",
    "metrics",
    "nn",
    "permutahedron_projection",
    "permutation_topk_mask",
    "registry",
    "relaxed_subset",
    "sampling",
    "soft_rank",
    "soft_sinkhorn_mask",
    "soft_sort",
    "soft_threshold_p_mask",
    "threshold_p_gate",
    "threshold_p_mask",
    "topk",
    "topk_indicators",
    "topk_mag",
    "topk_mask",
]
