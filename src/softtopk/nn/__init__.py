"""PyTorch modules: thin wrappers that hold configuration and call the functional ops."""

from ._topk import TopKMag, TopKMask

__all__ = ["TopKMag", "TopKMask"]
