"""Evaluation metrics of top-k selection: top-k accuracy, Recall@k@m, NDCG@k.

Metrics are not differentiable (they are what the soft operators relax) and are
computed without gradient. Each takes scores of shape (..., n) with items along the
last dimension and returns one value per row (``reduction="none"``) or their mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_tensor


def _reduce(values: Tensor, reduction: str) -> Tensor:
    reduction = check_choice(reduction, "reduction", ("mean", "none"))
    if reduction == "none":
        return values
    return torch.nanmean(values) if values.numel() else values.new_tensor(math.nan)


def _check_count(value: object, name: str, lo: int, hi: int) -> int:
    value = check_int(value, name)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


@torch.no_grad()
def topk_accuracy(scores: Tensor, target: Tensor, k: int = 1, *, reduction: str = "mean") -> Tensor:
    r"""Top-k accuracy: whether the target class is among the k highest scores.

    .. math::

        \operatorname{acc}_k = \mathbb{1}\big[\#\{j : s_j > s_y\} < k\big]

    Ties with the target's score count in its favour (the target is among the top k if
    fewer than k classes score strictly higher), so the result does not depend on how
    a sort breaks ties.

    Args:
        scores: (..., C) class scores, floating dtype.
        target: (...) integer class indices in [0, C).
        k: the number of guesses, in [1, C].
        reduction: ``"mean"`` (a 0-dim tensor) or ``"none"`` (one 0/1 value per row).

    Returns:
        float tensor (the dtype of scores, at least float32).

    Example:
        >>> import torch, softtopk
        >>> s = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
        >>> softtopk.metrics.topk_accuracy(s, torch.tensor([2, 1]), k=2, reduction="none")
        tensor([1., 1.])
    """
    scores = check_tensor(scores, "scores")
    C = scores.shape[-1]
    k = _check_count(k, "k", 1, C)
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target!r:.60}")
    if target.shape != scores.shape[:-1]:
        raise ValueError(f"target must have the shape {tuple(scores.shape[:-1])}, got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= C):
        raise ValueError(f"target must hold class indices in [0, {C - 1}]")
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    s_y = s.gather(-1, target.unsqueeze(-1).long())
    higher = (s > s_y).sum(-1)
    return _reduce((higher < k).to(s.dtype), reduction)


@torch.no_grad()
def recall_at_k_at_m(scores: Tensor, relevant: Tensor, m: int, *, reduction: str = "mean") -> Tensor:
    r"""Recall@k@m: the fraction of the k relevant items that the top m scores retrieve.

    .. math::

        \operatorname{Recall@}k\operatorname{@}m =
        \frac{|\,\mathcal{G} \cap \operatorname{top}_m(s)\,|}{|\mathcal{G}|},\qquad
        k = |\mathcal{G}|

    as in cascade ranking (DFTopK, LCRON, ARF: Recall@10@20 with the ground truth the
    top 10 of a later stage). Build ``relevant`` from graded labels with
    ``softtopk.topk_mask(labels, k, method="hard")``.

    Args:
        scores: (..., n) scores, floating dtype; -inf items are never retrieved before
            finite ones.
        relevant: (..., n) 0/1 or bool mask of the ground-truth set G.
        m: how many items are retrieved, in [0, n]. Ties at the m-th score are broken
            by ``torch.topk``.
        reduction: ``"mean"`` (over rows with a non-empty G) or ``"none"`` (one value per
            row; NaN for a row with no relevant item).

    Example:
        >>> import torch, softtopk
        >>> s = torch.tensor([[0.9, 0.8, 0.1, 0.7]])
        >>> softtopk.metrics.recall_at_k_at_m(s, torch.tensor([[1, 0, 1, 0]]), 2)
        tensor(0.5000)
    """
    scores = check_tensor(scores, "scores")
    _check_same_shape(scores, relevant, "scores", "relevant")
    m = _check_count(m, "m", 0, scores.shape[-1])
    rel = relevant.to(torch.float64) if relevant.dtype == torch.bool else relevant.double()
    idx = torch.topk(scores, m, dim=-1).indices
    hits = rel.gather(-1, idx).sum(-1)
    total = rel.sum(-1)
    recall = torch.where(total > 0, hits / total.clamp(min=1e-300), math.nan)
    return _reduce(recall.to(torch.promote_types(scores.dtype, torch.float32)), reduction)


@torch.no_grad()
def cascade_recall(
    stage_scores: Sequence[Tensor], relevant: Tensor, ms: Sequence[int], *, reduction: str = "mean"
) -> Tensor:
    r"""End-to-end recall of a selection cascade (DFTopK's and LCRON's joint Recall@k@m).

    Stage 1 keeps the top m_1 items by its scores, stage 2 keeps the top m_2 of those by
    its own scores, and so on; the metric is the fraction of the relevant set that
    survives every stage:

    .. math::

        \frac{|\,\mathcal{G} \cap S_L\,|}{|\mathcal{G}|},\qquad
        S_s = \operatorname{top}_{m_s}\big(s^{(s)}\ \text{restricted to}\ S_{s-1}\big),\
        S_0 = \text{all items}

    Args:
        stage_scores: one (..., n) score tensor per stage, all of the same shape.
        relevant: (..., n) 0/1 or bool mask of the ground-truth set.
        ms: the number of items each stage keeps, non-increasing, each in [0, n].
        reduction: as in :func:`recall_at_k_at_m`.

    Example:
        >>> import torch, softtopk
        >>> s1 = torch.tensor([[4.0, 3.0, 2.0, 1.0]]); s2 = torch.tensor([[0.0, 1.0, 5.0, 9.0]])
        >>> softtopk.metrics.cascade_recall([s1, s2], torch.tensor([[1, 0, 0, 1]]), [3, 1])
        tensor(0.)
    """
    if len(stage_scores) == 0 or len(stage_scores) != len(ms):
        raise ValueError(
            "stage_scores and ms must be non-empty and of equal length, "
            f"got {len(stage_scores)} and {len(ms)}"
        )
    first = check_tensor(stage_scores[0], "stage_scores[0]")
    _check_same_shape(first, relevant, "stage_scores[0]", "relevant")
    n = first.shape[-1]
    alive = torch.ones_like(first, dtype=torch.bool)
    previous = n
    for s, (x, m) in enumerate(zip(stage_scores, ms, strict=True)):
        x = check_tensor(x, f"stage_scores[{s}]")
        _check_same_shape(first, x, "stage_scores[0]", f"stage_scores[{s}]")
        m = _check_count(m, f"ms[{s}]", 0, previous)
        previous = m
        # Items already dropped rank below every survivor, -inf scores included.
        rank_key = torch.where(alive, x.double().nan_to_num(nan=-math.inf), -math.inf)
        # Sort by (alive, score): by score first, then survivors first (both stable).
        key = rank_key.argsort(dim=-1, descending=True, stable=True)
        key = key.gather(-1, alive.gather(-1, key).double().argsort(dim=-1, descending=True, stable=True))
        kept = torch.zeros_like(alive)
        kept.scatter_(-1, key[..., :m], True)
        alive = kept
    rel = relevant.double()
    total = rel.sum(-1)
    hits = (rel * alive).sum(-1)
    recall = torch.where(total > 0, hits / total.clamp(min=1e-300), math.nan)
    return _reduce(recall.to(torch.promote_types(first.dtype, torch.float32)), reduction)


@torch.no_grad()
def ndcg_at_k(
    scores: Tensor,
    relevance: Tensor,
    k: int | None = None,
    *,
    gain: str = "exp",
    reduction: str = "mean",
) -> Tensor:
    r"""Normalised discounted cumulative gain of the ranking by scores, cut at k.

    .. math::

        \operatorname{DCG@}k = \sum_{r=1}^{k} \frac{G(\mathrm{rel}_{\pi(r)})}{\log_2(r + 1)},\qquad
        \operatorname{NDCG@}k = \frac{\operatorname{DCG@}k}{\operatorname{IDCG@}k}

    with pi the order of decreasing score (ties broken by position, a stable sort) and
    IDCG the DCG of the order of decreasing relevance. G(rel) = 2^rel - 1 (``"exp"``,
    Burges et al. 2005, the usual choice in learning to rank) or rel (``"linear"``, as
    in scikit-learn's ``ndcg_score``).

    Args:
        scores: (..., n) scores, floating dtype.
        relevance: (..., n) non-negative graded relevance.
        k: the cut-off, in [1, n]; None for the full list.
        gain: ``"exp"`` or ``"linear"``.
        reduction: ``"mean"`` or ``"none"``. A row whose relevance is all zero has
            NDCG 0 (as in scikit-learn).

    Example:
        >>> import torch, softtopk
        >>> s = torch.tensor([[3.0, 2.0, 1.0]])
        >>> softtopk.metrics.ndcg_at_k(s, torch.tensor([[0.0, 1.0, 0.0]]), gain="linear")
        tensor(0.6309)
    """
    scores = check_tensor(scores, "scores")
    _check_same_shape(scores, relevance, "scores", "relevance")
    n = scores.shape[-1]
    k = n if k is None else _check_count(k, "k", 1, n)
    gain = check_choice(gain, "gain", ("exp", "linear"))
    rel = relevance.double()
    if rel.numel() and bool((rel < 0).any()):
        raise ValueError("relevance must be non-negative")
    g = torch.expm1(rel * math.log(2.0)) if gain == "exp" else rel
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=scores.device))
    order = scores.double().nan_to_num(nan=-math.inf).argsort(dim=-1, descending=True, stable=True)[..., :k]
    dcg = (g.gather(-1, order) * discount).sum(-1)
    ideal = (g.sort(-1, descending=True).values[..., :k] * discount).sum(-1)
    ndcg = torch.where(ideal > 0, dcg / ideal.clamp(min=1e-300), 0.0)
    return _reduce(ndcg.to(torch.promote_types(scores.dtype, torch.float32)), reduction)
