"""Soft top-k operators, one file per family; ``topk_mask`` dispatches on ``method``."""

from ._indicators import topk_indicators
from ._magnitude import topk_mag
from ._mask import METHODS, topk_mask
from ._permutation import permutation_topk_mask
from ._soft import soft_sinkhorn_mask
from ._subset import relaxed_subset
from ._threshold_p import soft_threshold_p_mask, threshold_p_gate, threshold_p_mask
from ._topk import topk

__all__ = [
    "METHODS",
    "permutation_topk_mask",
    "relaxed_subset",
    "soft_sinkhorn_mask",
    "soft_threshold_p_mask",
    "threshold_p_gate",
    "threshold_p_mask",
    "topk",
    "topk_indicators",
    "topk_mag",
    "topk_mask",
]
