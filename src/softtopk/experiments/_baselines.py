"""Baselines of the experiments that are not registered operators.

The operators' sides of the experiments use the library itself (``softtopk.losses``,
``softtopk.nn.TopKRouter``, ``softtopk.nn.functional.soft_knn``, ``softtopk.metrics``).
Here: the straight-through hard top-k (a mask operator for every experiment that trains
through a top-k), and the ListNet / pointwise BCE losses of the recommendation experiment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Operator


def straight_through_topk(
    x: Tensor, k: int, dim: int = -1, *, temperature: float = 0.1, generator: torch.Generator | None = None
) -> Tensor:
    r"""Hard top-k mask forward, a centred identity backward (straight-through; Bengio et al. 2013).

    .. math::

        y = \mathbb{1}[i \in \operatorname{top}_k(x)],\qquad
        \frac{\partial y}{\partial x} := \frac{1}{t}\Big(I - \frac{\mathbf 1 \mathbf 1^\top}{n}\Big)

    The backward is the Jacobian of the Euclidean projection onto the capped simplex
    when every entry is strictly inside (1/t times), so the gradient keeps the sum k
    fixed. The mask is exact (ties to the lowest index, as torch.topk); ``generator`` is
    ignored (the operator is deterministic).

    Example:
        >>> import torch
        >>> x = torch.tensor([3.0, 1.0, 2.0], requires_grad=True)
        >>> y = straight_through_topk(x, 2, temperature=1.0)
        >>> y.detach()
        tensor([1., 0., 1.])
        >>> y[1].backward(); x.grad
        tensor([-0.3333,  0.6667, -0.3333])
    """
    idx = torch.topk(x.detach(), int(k), dim=dim).indices
    hard = torch.zeros_like(x).scatter(dim, idx, 1.0)
    centred = (x - x.mean(dim, keepdim=True)) / temperature
    return hard + (centred - centred.detach())


#: The straight-through hard top-k as an operator entry (not in the registry: it is a baseline).
STRAIGHT_THROUGH = Operator(
    "straight-through",
    straight_through_topk,
    paper="hard top-k, straight-through gradient (Bengio et al. 2013)",
    k_grad=False,
    compiles=False,
    vmaps=False,
    uniform_limit=False,
    hard_limit=True,
    note="torch.topk mask forward; (I - 11^T/n)/t backward",
)


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
