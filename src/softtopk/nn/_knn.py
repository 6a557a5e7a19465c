"""Differentiable k-nearest-neighbour classifier (Grover et al. 2019; Xie et al. 2020).

Each query scores the candidates by negative distance in an embedding space; a soft
top-k over the candidates picks the k nearest, and the class votes are the mask summed
per class. Training maximises the soft fraction of neighbours that share the query's
label, which trains the embedding; at test time the hard k-NN classifier is used.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_choice,
    check_generator,
    check_positive,
    check_temperature,
    check_tensor,
    has_values,
)
from ..registry import resolve

DISTANCES = ("sqeuclidean", "cosine", "dot")


def neighbour_scores(queries: Tensor, candidates: Tensor, distance: str = "sqeuclidean") -> Tensor:
    r"""(Q, N) similarity of every query to every candidate (larger is nearer).

    ``"sqeuclidean"``: -||q - c||^2; ``"cosine"``: cos(q, c); ``"dot"``: <q, c>.
    """
    distance = check_choice(distance, "distance", DISTANCES)
    if distance == "dot":
        return queries @ candidates.transpose(-1, -2)
    if distance == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(candidates, dim=-1).transpose(-1, -2)
    sq = (
        queries.square().sum(-1, keepdim=True)
        + candidates.square().sum(-1).unsqueeze(-2)
        - 2.0 * queries @ candidates.transpose(-1, -2)
    )
    return -sq.clamp(min=0.0)


def soft_knn(
    queries: Tensor,
    candidates: Tensor,
    candidate_labels: Tensor,
    k: int,
    *,
    num_classes: int,
    method: str | Callable[..., Tensor] = "sparse",
    temperature: float | None = None,
    distance: str = "sqeuclidean",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Soft k-NN class votes: the fraction of the (soft) k nearest candidates in each class.

    .. math::

        m = \operatorname{mask}_k\big(-\|q - c_j\|^2\big)_{j=1..N},\qquad
        v_c = \frac1k \sum_j m_j\,\mathbb{1}[y_j = c]

    With a mask that sums to k the votes sum to 1. The training loss of Grover et al.
    and Xie et al. is -v_{y_q} (:func:`soft_knn_loss`); the hard k-NN classifier is
    argmax_c v_c with ``method="hard"``.

    Args:
        queries: (Q, D) query embeddings.
        candidates: (N, D) candidate embeddings.
        candidate_labels: (N,) integer labels in [0, num_classes).
        k: neighbours, in [1, N].
        num_classes: C.
        method: a mask operator of :data:`softtopk.registry.OPERATORS`, or a callable.
        temperature: the operator's temperature (in units of the scores); None: registry default.
        distance: ``"sqeuclidean"``, ``"cosine"`` or ``"dot"``.
        generator: the ``torch.Generator`` a stochastic method (``"perturbed"``, ``"subset"``)
            draws its noise from; None uses the global generator. Ignored by the other methods.

    Returns:
        (Q, C) votes in the dtype of the queries.

    Example:
        >>> import torch, softtopk
        >>> cand = torch.tensor([[0.0], [0.1], [5.0], [5.1]]); labels = torch.tensor([0, 0, 1, 1])
        >>> softtopk.nn.functional.soft_knn(torch.tensor([[0.05], [4.9]]), cand, labels, 2, num_classes=2)
        tensor([[1., 0.],
                [0., 1.]])

    References:
        Grover, Wang, Zweig, Ermon. "Stochastic Optimization of Sorting Networks via
        Continuous Relaxations", ICLR 2019; Xie et al. "Differentiable Top-k with Optimal
        Transport", NeurIPS 2020.
    """
    queries = check_tensor(queries, "queries")
    candidates = check_tensor(candidates, "candidates")
    if queries.dim() != 2 or candidates.dim() != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            "queries and candidates must be (Q, D) and (N, D), "
            f"got {tuple(queries.shape)} and {tuple(candidates.shape)}"
        )
    N = candidates.shape[0]
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N] = [1, {N}], got {k!r}")
    if (
        not isinstance(candidate_labels, Tensor)
        or candidate_labels.is_floating_point()
        or candidate_labels.shape != (N,)
    ):
        raise ValueError(f"candidate_labels must be an integer tensor of shape ({N},)")
    if (
        has_values(candidate_labels)
        and N
        and (int(candidate_labels.min()) < 0 or int(candidate_labels.max()) >= num_classes)
    ):
        raise ValueError(f"candidate_labels must lie in [0, {num_classes - 1}]")
    op = resolve(method)
    t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    scores = neighbour_scores(queries, candidates, distance)
    mask = op(scores, int(k), -1, temperature=t, generator=generator)
    onehot = F.one_hot(candidate_labels.long(), int(num_classes)).to(mask.dtype)
    return (mask @ onehot) / k


def soft_knn_loss(votes: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    r"""Negative soft fraction of neighbours sharing the query's label: -v_{y}.

    .. math::

        \ell = -\frac1k \sum_j m_j \mathbb{1}[y_j = y_q] = -v_{y_q}

    Example:
        >>> import torch, softtopk
        >>> softtopk.nn.functional.soft_knn_loss(torch.tensor([[0.75, 0.25]]), torch.tensor([0]))
        tensor(-0.7500)
    """
    votes = check_tensor(votes, "votes")
    reduction = check_choice(reduction, "reduction", ("mean", "sum", "none"))
    if not isinstance(target, Tensor) or target.is_floating_point() or target.shape != votes.shape[:-1]:
        raise ValueError(f"target must be an integer tensor of shape {tuple(votes.shape[:-1])}")
    loss = -votes.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


class SoftKNN(nn.Module):
    """Module form of :func:`soft_knn` (configuration only); :meth:`predict` is the hard k-NN.

    Example:
        >>> import torch, softtopk
        >>> knn = softtopk.nn.SoftKNN(3, num_classes=4)
        >>> votes = knn(torch.randn(5, 8), torch.randn(20, 8), torch.randint(0, 4, (20,)))
        >>> votes.shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        k: int,
        *,
        num_classes: int,
        method: str | Callable[..., Tensor] = "sparse",
        temperature: float | None = None,
        distance: str = "sqeuclidean",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        resolve(method)
        check_choice(distance, "distance", DISTANCES)
        check_temperature(temperature)
        check_generator(generator)
        self.k, self.num_classes, self.method = int(k), int(num_classes), method
        self.temperature, self.distance, self.generator = temperature, distance, generator

    def forward(self, queries: Tensor, candidates: Tensor, candidate_labels: Tensor) -> Tensor:
        return soft_knn(
            queries,
            candidates,
            candidate_labels,
            self.k,
            num_classes=self.num_classes,
            method=self.method,
            temperature=self.temperature,
            distance=self.distance,
            generator=self.generator,
        )

    @torch.no_grad()
    def predict(self, queries: Tensor, candidates: Tensor, candidate_labels: Tensor) -> Tensor:
        """Hard k-NN labels (the most frequent label among the k nearest; ties: lowest label)."""
        votes = soft_knn(
            queries,
            candidates,
            candidate_labels,
            self.k,
            num_classes=self.num_classes,
            method="hard",
            distance=self.distance,
        )
        return votes.argmax(-1)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, num_classes={self.num_classes}, method={self.method!r}, "
            f"temperature={self.temperature}, distance={self.distance!r}"
        )
