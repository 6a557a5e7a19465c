"""Sampling for decoding and for soft top-k masks.

* :func:`filter_logits`: the top-k / top-p / min-p filters of LLM decoding, by threshold
  search (no sort), equal to the sort-based :func:`filter_logits_sort`.
* :func:`sample_k`: exactly k distinct items per row whose inclusion probabilities are a
  given soft mask (systematic sampling), with a straight-through gradient.
"""

from ._filter import LogitsFilter, filter_logits, filter_logits_sort
from ._sample import SampleK, sample_k

__all__ = ["LogitsFilter", "SampleK", "filter_logits", "filter_logits_sort", "sample_k"]
