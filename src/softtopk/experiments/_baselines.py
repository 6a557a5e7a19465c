"""Baseline losses of the recommendation experiment that are not top-k operators.

The operators' sides of the experiments use the library itself (``softtopk.losses``,
``softtopk.nn.TopKRouter``, ``softtopk.nn.functional.soft_knn``, ``softtopk.metrics``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def listnet(scores: Tensor, relevance: Tensor, valid: Tensor | None = None) -> Tensor:
    """ListNet (Cao et al. 2007), top-one probabilities: CE between softmax(relevance) and softmax(scores).

    ``valid`` marks real list entries (False entries are ignored).
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
        relevance = relevance.masked_fill(~valid, -torch.inf)
    target = relevance.softmax(-1)
    logp = scores.log_softmax(-1).masked_fill(target == 0, 0.0)
    return -(target * logp).sum(-1).mean()


def pointwise_bce(scores: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of each score (as a logit) against a 0/1 target."""
    loss = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    if valid is None:
        return loss.mean()
    return (loss * valid).sum() / valid.sum().clamp_min(1)
