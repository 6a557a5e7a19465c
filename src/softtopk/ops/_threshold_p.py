"""Threshold-p selection (MoDification): keep an item iff its router score is at least a threshold.

Mixture-of-depths (Raposo et al. 2024) routes the top-k tokens of a sequence through a
block; MoDification (Zhang et al. 2024) replaces that top-k, which needs the whole
sequence, by a per-token threshold p: token i is processed iff its score s_i >= p. The
rule is causal and O(n), and the number of kept items varies from row to row.

Three functions:

* :func:`threshold_p_mask`: the hard rule, a 0/1 mask with zero gradient;
* :func:`threshold_p_gate`: s * mask, the router weight that multiplies the block output
  (x + gate * f(x)); the gradient reaches the scores only through this weight, on the
  kept items, exactly as in MoD and MoDification;
* :func:`soft_threshold_p_mask`: a differentiable version with the same budget: the
  threshold rule sets k = #{i : s_i >= p} per row and a soft top-k of the registry
  selects k items, so that the selection itself passes gradients (and tends to the hard
  rule as the temperature goes to 0). Unlike the hard rule it couples the items of a
  row, so it is not causal: use it in training, the hard rule at inference.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .._checks import check_dim, check_positive, check_tensor


def _check_threshold(threshold: object, scores: Tensor) -> Tensor | float:
    if isinstance(threshold, Tensor):
        if not (threshold.is_floating_point() or threshold.dtype in (torch.int32, torch.int64)):
            raise TypeError(
                f"threshold must be a real number or a real tensor, got a tensor of {threshold.dtype}"
            )
        try:
            torch.broadcast_shapes(threshold.shape, scores.shape)
        except RuntimeError:
            raise ValueError(
                f"threshold must broadcast to the shape {tuple(scores.shape)} of scores, "
                f"got shape {tuple(threshold.shape)}"
            ) from None
        return threshold.detach().to(device=scores.device)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"threshold must be a real number or a tensor, got {type(threshold).__name__} {threshold!r}"
        )
    if threshold != threshold:
        raise ValueError("threshold must not be NaN")
    return float(threshold)


def threshold_p_mask(scores: Tensor, threshold: float | Tensor) -> Tensor:
    r"""Hard threshold-p selection: 1 where the score is at least p, else 0.

    .. math::

        m_i = \mathbb{1}[s_i \ge p]

    Each entry is decided on its own (causal, O(n)); the number kept varies per row.
    The mask is piecewise constant, so its gradient is zero; let the gradient reach the
    router through :func:`threshold_p_gate`.

    Args:
        scores: router scores of any shape, floating dtype.
        threshold: p, a number or a tensor broadcastable to ``scores``.

    Returns:
        A 0/1 tensor with the shape and dtype of ``scores`` (no gradient). NaN scores are
        never kept (0); +inf is always kept, -inf never (for a finite threshold). The
        comparison is made in the dtype of ``scores``, as torch compares a tensor with a
        number: a float threshold is rounded to that dtype first.

    Example:
        >>> import torch, softtopk
        >>> softtopk.threshold_p_mask(torch.tensor([0.2, 0.7, 0.5, 0.9]), 0.5)
        tensor([0., 1., 1., 1.])

    Reference:
        Zhang et al. "MoDification: Mixture of Depths Made Easy", arXiv 2410.14268, 2024.
    """
    scores = check_tensor(scores, "scores")
    pv = _check_threshold(threshold, scores)
    return (scores.detach() >= pv).to(scores.dtype)


def threshold_p_gate(scores: Tensor, threshold: float | Tensor) -> Tensor:
    r"""The router weight of threshold-p routing: the score where it is at least p, else 0.

    .. math::

        w_i = s_i\,\mathbb{1}[s_i \ge p],\qquad
        \frac{\partial w_i}{\partial s_j} = \delta_{ij}\,\mathbb{1}[s_i \ge p]

    The block output of a kept item is multiplied by w_i (x_i + w_i f(x_i)), so the
    router learns through this product only; the selection stays hard, as in MoD and
    MoDification.

    Args:
        scores: router scores of any shape, floating dtype.
        threshold: p, a number or a tensor broadcastable to ``scores``.

    Returns:
        Tensor with the shape and dtype of ``scores``; 0 (and zero gradient) where not kept,
        also for scores of -inf or NaN.

    Example:
        >>> import torch, softtopk
        >>> s = torch.tensor([0.2, 0.7, 0.5], requires_grad=True)
        >>> w = softtopk.threshold_p_gate(s, 0.5)
        >>> w
        tensor([0.0000, 0.7000, 0.5000], grad_fn=<WhereBackward0>)
        >>> w.sum().backward(); s.grad
        tensor([0., 1., 1.])

    Reference:
        Zhang et al. "MoDification: Mixture of Depths Made Easy", arXiv 2410.14268, 2024;
        Raposo et al. "Mixture-of-Depths", arXiv 2404.02258, 2024.
    """
    kept = threshold_p_mask(scores, threshold) > 0
    return torch.where(kept, scores, 0.0)


def soft_threshold_p_mask(
    scores: Tensor,
    threshold: float | Tensor,
    dim: int = -1,
    *,
    method: str = "sparse",
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Differentiable threshold-p selection: the threshold sets the budget, a soft top-k selects.

    .. math::

        k = \#\{i : s_i \ge p\}\ \text{(per row along dim)},\qquad
        y = \operatorname{softtopk}_t(s, k)

    With the threshold family, y_i = G((s_i - tau)/t) with sum(y) = k, so the
    selection passes the gradient diag(g) - g g^T / sum(g) to the scores and keeps the
    budget that the hard rule would use. As t -> 0, y tends to :func:`threshold_p_mask`
    (the top-k of s with k = #{s >= p} are the entries >= p). The budget itself is a
    count, piecewise constant in s: no gradient flows through k.

    Args:
        scores: router scores of any shape, floating dtype.
        threshold: p, a number or a tensor broadcastable to ``scores`` (constant
            along ``dim``).
        dim: the dimension along which the budget is counted and the selection made
            (e.g. the sequence dimension for mixture-of-depths).
        method: a mask operator of :data:`softtopk.registry.OPERATORS` (``"sparse"``
            keeps exact zeros, so skipped items stay skipped).
        temperature: the operator's temperature; None uses the registry default.
        generator: the ``torch.Generator`` of a stochastic ``method``; ignored by the others.

    Returns:
        Tensor with the shape and dtype of ``scores``, in [0, 1]. A row containing NaN
        is NaN (as in :func:`softtopk.topk_mask`). The budget is counted in float32 (or
        float64 for float64 scores), so it is exact for half-precision scores too; the
        comparison with the threshold is made in the dtype of ``scores`` (as in
        :func:`threshold_p_mask`).

    Example:
        >>> import torch, softtopk
        >>> s = torch.tensor([0.2, 0.7, 0.5, 0.9])
        >>> softtopk.soft_threshold_p_mask(s, 0.5, temperature=1e-3)
        tensor([0., 1., 1., 1.])

    Reference:
        Zhang et al. "MoDification: Mixture of Depths Made Easy", arXiv 2410.14268, 2024
        (threshold-p); Sander et al. 2023 (the sparse soft top-k).
    """
    from ..registry import resolve  # the registry imports ops: resolve at call time

    scores = check_tensor(scores, "scores")
    d = check_dim(dim, scores.dim())
    op = resolve(method)
    t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    wide = torch.float64 if scores.dtype == torch.float64 else torch.float32
    k = (scores.detach() >= _check_threshold(threshold, scores)).sum(d, dtype=wide)
    return op(scores, k, d, temperature=t, generator=generator)
