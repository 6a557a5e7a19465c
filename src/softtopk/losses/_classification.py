"""Top-k cross-entropy (Petersen et al. 2022) over any soft top-k mask operator."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

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

#: Petersen et al.'s stabilisation: -log(p (1 - 2 eps) + eps).
EPS = 1e-7


def _check_p_k(p_k: object) -> tuple[float, ...]:
    if isinstance(p_k, Tensor):
        p_k = p_k.tolist()
    if not isinstance(p_k, Sequence) or isinstance(p_k, str) or len(p_k) == 0:
        raise TypeError(f"p_k must be a non-empty sequence of probabilities, got {p_k!r}")
    values = []
    for v in p_k:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"p_k must hold probabilities in [0, 1], got {p_k!r}")
        values.append(float(v))
    if abs(sum(values) - 1.0) > 1e-4:
        raise ValueError(f"p_k must sum to 1, got {p_k!r} (sum {sum(values)})")
    return tuple(values)


def _restrict(logits: Tensor, target: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The true class's score first, then the m - 1 largest scores of the other classes."""
    true = logits.gather(-1, target.unsqueeze(-1))
    others = logits.scatter(-1, target.unsqueeze(-1), -math.inf)
    top = torch.topk(others, m - 1, dim=-1).values
    return torch.cat([true, top], -1), torch.zeros_like(target)


def topk_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    p_k: Sequence[float] = (0.5, 0.0, 0.0, 0.0, 0.5),
    method: str | Callable[..., Tensor] = "sparse",
    temperature: float | None = None,
    m: int | None = None,
    top1: str = "softmax",
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Top-k cross-entropy: the negative log-probability that the true class is in a random top-K.

    With a distribution P_K over K in {1, ..., len(p_k)} and a soft top-k mask
    :math:`\mathrm{mask}_K(s)_i \approx \mathbb{1}[i \in \mathrm{top}_K(s)]`,

    .. math::

        q = P_K(1)\,\operatorname{softmax}(s) + \sum_{K \ge 2} P_K(K)\,\mathrm{mask}_K(s),\qquad
        \ell = -\log\big(q_y (1 - 2\epsilon) + \epsilon\big),\ \epsilon = 10^{-7}

    Petersen et al. 2022 build mask_K from a differentiable sorting network's relaxed
    permutation; here any mask operator of the registry (or a callable) supplies it, so
    operators are compared with one string. Masks in [0, 1] that sum to K make q a
    mixture of distributions, so q_y <= 1; for a mask that can exceed 1 (the column sums
    of a relaxed permutation matrix, such as NeuralSort's) q_y is capped at 1, so the loss
    is never negative.

    Args:
        logits: (..., C) class scores, floating dtype.
        target: (...) integer class indices.
        p_k: P_K(1), ..., P_K(len): non-negative, summing to 1. ``(1,)`` gives the usual
            cross-entropy; Petersen et al. use e.g. (0.5, 0, 0, 0, 0.5) or (0.2,) * 5.
        method: a mask operator of :data:`softtopk.registry.OPERATORS`, or a callable
            ``fn(x, k, dim=-1, *, temperature)`` returning the soft top-k mask.
        temperature: the operator's temperature; None uses the registry default.
        m: if given, only the true class and the m - 1 highest other classes enter the
            loss (a hard preselection, as Petersen et al. do for ImageNet); m in
            [len(p_k), C].
        top1: how the K = 1 term is formed: ``"softmax"`` (Petersen's ``'sm'``), ``"mask"``
            (the operator's mask_1, Petersen's ``'sort'``), or ``"ce"`` (Petersen's
            ``'smce'``: P_K(1) * cross-entropy + sum_{K>=2} P_K(K) * the top-k term).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        generator: the ``torch.Generator`` a stochastic method (``"perturbed"``, ``"subset"``)
            draws its noise from; None uses the global generator. Ignored by the other methods.

    Returns:
        The loss, in float32 or wider.

    Example:
        >>> import torch, softtopk
        >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
        >>> loss = softtopk.losses.topk_cross_entropy(logits, torch.tensor([1, 2]), p_k=[0.5, 0.5])
        >>> round(loss.item(), 4)
        0.5296

    Reference:
        Petersen, Kuehne, Borgelt, Deussen. "Differentiable Top-k Classification
        Learning", ICML 2022.
    """
    logits = check_tensor(logits, "logits")
    pk = _check_p_k(p_k)
    top1 = check_choice(top1, "top1", ("softmax", "mask", "ce"))
    reduction = check_choice(reduction, "reduction", ("mean", "sum", "none"))
    op = resolve(method)
    t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target!r:.60}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have the shape {tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    C = logits.shape[-1]
    if len(pk) > C:
        raise ValueError(f"p_k has {len(pk)} entries but there are only C = {C} classes")
    if has_values(target) and target.numel() and (int(target.min()) < 0 or int(target.max()) >= C):
        raise ValueError(f"target must hold class indices in [0, {C - 1}]")
    s = logits.reshape(-1, C)
    y = target.reshape(-1).long()
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not len(pk) <= m <= C:
            raise ValueError(f"m must be an int in [len(p_k), C] = [{len(pk)}, {C}], got {m!r}")
        s, y = _restrict(s, y, int(m))

    def mask(kappa: int) -> Tensor:
        return op(s, kappa, -1, temperature=t, generator=generator)

    first = 1 if top1 == "mask" else 2
    q = s.new_zeros(())
    for kappa in range(first, len(pk) + 1):
        if pk[kappa - 1] > 0:
            q = q + pk[kappa - 1] * mask(kappa)
    if top1 == "softmax" and pk[0] > 0:
        q = q + pk[0] * torch.softmax(s, -1)
    q_y = (q.expand_as(s) if q.dim() == 0 else q).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    # Masks that can exceed 1 (the column sums of a relaxed permutation, e.g. NeuralSort)
    # would make q_y > 1 and the loss unbounded below; q_y is a probability, so it is
    # capped at 1 (no gradient beyond).
    q_y = q_y.clamp(max=1.0)
    loss = -torch.log(q_y * (1 - 2 * EPS) + EPS)
    if top1 == "ce":
        loss = sum(pk[1:]) * loss + pk[0] * F.cross_entropy(s, y, reduction="none")
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(target.shape)


class TopKCrossEntropyLoss(nn.Module):
    """Module form of :func:`topk_cross_entropy` (configuration only).

    Example:
        >>> import torch, softtopk
        >>> criterion = softtopk.losses.TopKCrossEntropyLoss(p_k=[0.5, 0.5], method="lapsum")
        >>> criterion(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])).shape
        torch.Size([])
    """

    def __init__(
        self,
        p_k: Sequence[float] = (0.5, 0.0, 0.0, 0.0, 0.5),
        *,
        method: str | Callable[..., Tensor] = "sparse",
        temperature: float | None = None,
        m: int | None = None,
        top1: str = "softmax",
        reduction: str = "mean",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.p_k = _check_p_k(p_k)
        resolve(method)
        check_temperature(temperature)
        check_choice(top1, "top1", ("softmax", "mask", "ce"))
        check_choice(reduction, "reduction", ("mean", "sum", "none"))
        if m is not None and (
            isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < len(self.p_k)
        ):
            raise ValueError(f"m must be an int >= len(p_k) = {len(self.p_k)}, got {m!r}")
        self.method, self.temperature, self.m, self.top1, self.reduction = (
            method,
            temperature,
            m,
            top1,
            reduction,
        )
        self.generator = check_generator(generator)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return topk_cross_entropy(
            logits,
            target,
            p_k=self.p_k,
            method=self.method,
            temperature=self.temperature,
            m=self.m,
            top1=self.top1,
            reduction=self.reduction,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"p_k={self.p_k}, method={self.method!r}, temperature={self.temperature}, m={self.m}, "
            f"top1={self.top1!r}, reduction={self.reduction!r}"
        )
