"""Stand-ins for library pieces that other work items add (losses, routers, kNN, metrics).

Everything here is deliberately small and built only on a registered operator's
functional form ``fn(x, k, *, dim, temperature)``. Once ``softtopk.losses``,
``softtopk.nn.TopKRouter`` / ``SoftKNN`` / ``MagnitudePruner`` and ``softtopk.metrics``
exist, the experiments should call those instead and this file should go away; each
function names its successor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MaskFn = Callable[[Tensor], Tensor]  # scores (B, n) -> soft top-k mask (B, n)


def topk_cross_entropy(scores: Tensor, y: Tensor, mask: MaskFn, p_top1: float = 0.5) -> Tensor:
    r"""Top-k cross-entropy of Petersen et al. 2022 with P_K = [p_top1, 0, ..., 0, 1 - p_top1].

    .. math::

        \ell = -\log\big(p_1\,\mathrm{softmax}(s)_y + (1 - p_1)\,m_k(s)_y\big)

    where m_k(s) is the operator's soft top-k mask (the probability that y is among the k
    highest scores). Successor: the top-k cross-entropy of ``softtopk.losses``.
    """
    p = p_top1 * scores.softmax(-1).gather(1, y[:, None]) + (1 - p_top1) * mask(scores).gather(1, y[:, None])
    return -p.clamp_min(1e-12).log().mean()


def listnet(scores: Tensor, relevance: Tensor, valid: Tensor | None = None) -> Tensor:
    """ListNet (Cao et al. 2007), top-one probabilities: CE between softmax(relevance) and softmax(scores).

    ``valid`` marks real list entries (False entries are ignored). Successor: the ranking
    losses of ``softtopk.losses``.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
        relevance = relevance.masked_fill(~valid, -torch.inf)
    target = relevance.softmax(-1)
    logp = scores.log_softmax(-1).masked_fill(target == 0, 0.0)
    return -(target * logp).sum(-1).mean()


def soft_knn_loss(query: Tensor, cand: Tensor, same: Tensor, k: int, mask: MaskFn) -> Tensor:
    """Differentiable kNN loss of Grover et al. 2019 / Xie et al. 2020.

    Scores are minus squared distances between query and candidate embeddings; the
    loss is minus the mean, over queries, of (1/k) sum_j m_j 1[y_j = y_q], with m the soft
    top-k mask over candidates. Successor: ``softtopk.nn.SoftKNN``.
    """
    scores = -torch.cdist(query, cand).pow(2)
    return -(mask(scores) * same).sum(-1).mean() / k


def recall_at(scores: Tensor, target: Tensor, m: int, valid: Tensor | None = None) -> Tensor:
    """Per-list Recall@K@M: the fraction of the target set (K ones) found in the top-m scores.

    Successor: ``softtopk.metrics``.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
    top = scores.topk(m, dim=-1).indices
    hit = target.gather(-1, top).sum(-1)
    return hit / target.sum(-1).clamp_min(1)


def ndcg_at(scores: Tensor, relevance: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Per-list NDCG@k with gains 2^rel - 1 and log2 discounts. Successor: ``softtopk.metrics``."""
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
        relevance = relevance.masked_fill(~valid, 0.0)
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=scores.dtype, device=scores.device))
    gains = relevance.gather(-1, scores.topk(k, dim=-1).indices).exp2() - 1
    ideal = relevance.topk(k, dim=-1).values.exp2() - 1
    dcg, idcg = (gains * disc).sum(-1), (ideal * disc).sum(-1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), torch.zeros_like(dcg))


def pointwise_bce(scores: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of each score (as a logit) against a 0/1 target."""
    loss = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    if valid is None:
        return loss.mean()
    return (loss * valid).sum() / valid.sum().clamp_min(1)
