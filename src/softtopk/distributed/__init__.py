"""Communication-efficient distributed training: top-k gradient sparsification with error feedback."""

from ._topk_hook import TopKCompressionState, topk_compression_hook, topk_sparsify

__all__ = ["TopKCompressionState", "topk_compression_hook", "topk_sparsify"]
