"""The hard top-k mask, for comparison: what every soft operator tends to as t -> 0."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _backend
from .._checks import may_sync, scatter_rows
from ._topk import hard_mask_rows_impl, lowest_index_topk, topk_rows_impl


def _hard_rows(x: Tensor, k: Tensor) -> Tensor:
    n = x.shape[-1]
    if x.numel() == 0:
        return torch.zeros_like(x)
    K = max(1, min(n, math.ceil(float(k.amax().item())))) if may_sync(k) else n
    cpu = may_sync(x) and _backend.route(x) == "cpu"  # the threshold selection beats torch.topk on CPU
    if cpu and x.dtype in (torch.float32, torch.float64):
        return hard_mask_rows_impl(x, K, k)  # selection and mask in one kernel
    if cpu:
        vals, idx = topk_rows_impl(x, K, True, True)
    else:
        vals, idx = lowest_index_topk(x, K)
    # The j-th largest gets clip(k - j, 0, 1): 1 for j < floor(k), frac(k) next, then 0.
    rank = torch.arange(K, device=x.device, dtype=x.dtype)
    weight = (k.unsqueeze(-1) - rank).clamp(0.0, 1.0)
    weight = torch.where(vals > -math.inf, weight, 0.0)
    y = scatter_rows(x, idx, weight)
    nan = torch.isnan(vals[:, :1])  # a row with a NaN has it first
    if may_sync(nan) and not bool(nan.any()):
        return y  # no NaN row: skip a pass over the output
    return torch.where(nan, math.nan, y)


class _CompiledHardMask(torch.autograd.Function):
    """Hard mask whose derivative is the true one almost everywhere: zero (reverse mode).

    This is the class torch.compile traces (Dynamo does not trace a custom ``jvp``);
    :class:`_HardMask` adds forward mode.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: Tensor) -> Tensor:  # type: ignore[override]
        return _hard_rows(x, k)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return torch.zeros_like(grad_y), None


class _HardMask(_CompiledHardMask):
    """:class:`_CompiledHardMask` with forward mode: a zero tangent in x, none in k."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.like = (output.shape, output.dtype, output.device)
        ctx.set_materialize_grads(False)  # so that k's tangent is None unless k has one

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None) -> tuple[Tensor, None]:  # type: ignore[override]
        if grad_y is not None:
            return torch.zeros_like(grad_y), None
        shape, dtype, device = ctx.like
        return torch.zeros(shape, dtype=dtype, device=device), None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dk: Tensor | None) -> Tensor:  # type: ignore[override]
        if dk is not None:  # as in reverse mode (the fractional entry's value is k - floor(k))
            raise ValueError("this operator is not differentiable in k; pass a k without a tangent")
        if dx is not None:
            return torch.zeros_like(dx)
        shape, dtype, device = ctx.like
        return torch.zeros(shape, dtype=dtype, device=device)


def hard_mask(x: Tensor, k: Tensor, **unused: Any) -> Tensor:
    r"""The torch.topk mask on rows (B, n), extended to real k.

    .. math::

        y_{\sigma(j)} = \operatorname{clip}(k - j + 1, 0, 1),\qquad
        x_{\sigma(1)} \ge x_{\sigma(2)} \ge \dots

    so an integer k gives the usual k-hot mask and a real k gives the fractional
    (k+1)-th entry that the soft masks converge to. The entries are chosen as by
    :func:`softtopk.topk`: ties go to the lowest index, on every device (under
    ``torch.compile`` and ``torch.func`` transforms, ``torch.topk``'s choice among ties).
    Entries equal to -inf are never selected. The gradient is zero (the derivative of a
    piecewise-constant map almost everywhere).
    """
    fn = _CompiledHardMask if torch.compiler.is_compiling() else _HardMask
    return fn.apply(x, k)
