"""Soft top-k operators, one file per family; ``topk_mask`` dispatches on ``method``."""

from ._magnitude import topk_mag
from ._mask import METHODS, topk_mask
from ._soft import soft_sinkhorn_mask

__all__ = ["METHODS", "soft_sinkhorn_mask", "topk_mag", "topk_mask"]
