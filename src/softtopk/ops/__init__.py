"""Soft top-k operators, one file per family; ``topk_mask`` dispatches on ``method``."""

from ._magnitude import topk_mag
from ._mask import METHODS, topk_mask
from ._soft import soft_sinkhorn_mask
from ._threshold_p import soft_threshold_p_mask, threshold_p_gate, threshold_p_mask

__all__ = [
    "METHODS",
    "soft_sinkhorn_mask",
    "soft_threshold_p_mask",
    "threshold_p_gate",
    "threshold_p_mask",
    "topk_mag",
    "topk_mask",
]
