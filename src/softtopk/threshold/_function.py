"""Autograd for the threshold family: the implicit O(n) backward.

With g_i = G'((x_i - tau)/t)/t and tau defined by sum_i G((x_i - tau)/t) = k, the
implicit function theorem gives

    J = diag(g) - g g^T / sum(g),      dy/dk = g / sum(g),

so the vector-Jacobian product is ``g * (v - <g, v>/sum(g))`` and the gradient in k is
``<g, v>/sum(g)``. Only g is saved: (B, K) on the candidates of a sparse link, (B, n)
otherwise. Rows with sum(g) = 0 (hard rows) get zero gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._checks import scatter_rows
from ._links import Link
from ._solver import solve


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (without a NaN in either branch)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)


def _vjp(g: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Returns g * (v - <g,v>/sum g) and <g,v>/sum g for rows of g and v."""
    coupling = _ratio((g * v).sum(-1), g.sum(-1))
    return g * (v - coupling.unsqueeze(-1)), coupling


def threshold_backward(
    grad_y: Tensor, g: Tensor, idx: Tensor, rows: Tensor, g_rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Vector-Jacobian product in x (B, n) and in k (B,) from the saved slopes."""
    if idx.numel() == 0:
        return _vjp(g, grad_y)
    grad_c, grad_k = _vjp(g, grad_y.gather(-1, idx))
    grad_x = scatter_rows(grad_y, idx, grad_c)
    if rows.numel() > 0:
        grad_r, grad_kr = _vjp(g_rows, grad_y.index_select(0, rows))
        grad_x = grad_x.index_copy(0, rows, grad_r)
        grad_k = grad_k.index_copy(0, rows, grad_kr)
    return grad_x, grad_k


class ThresholdMask(torch.autograd.Function):
    """y = G((x - tau)/t) with sum(y) = k along the last dimension of (B, n) rows.

    Differentiable in x and in k (a (B,) tensor). Inputs are already validated and in
    the compute dtype. The backward is itself differentiable (the Jacobian of the p = 2
    link is locally constant); see :class:`CurvedThresholdMask` for the other links.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: Tensor, t: float, link: Link, solver: str) -> tuple[Tensor, ...]:  # type: ignore[override]
        # Detached: the solver's loop is not differentiated (and torch.compile's
        # while_loop must not see tensors that require grad).
        return tuple(solve(x.detach(), k.detach(), t, link, solver))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, g, idx, rows, g_rows = output
        ctx.mark_non_differentiable(g, idx, rows, g_rows)
        ctx.save_for_backward(g, idx, rows, g_rows)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, idx, rows, g_rows = ctx.saved_tensors
        grad_x, grad_k = threshold_backward(grad_y, g, idx, rows, g_rows)
        return grad_x, grad_k if ctx.needs_input_grad[1] else None, None, None, None


class CurvedThresholdMask(ThresholdMask):
    """ThresholdMask for links with curvature (logistic, Laplace, p < 2).

    Their Jacobian depends on x, which the saved slopes do not carry, so a second
    differentiation would be silently wrong; it raises instead.
    """

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, idx, rows, g_rows = ctx.saved_tensors
        grad_x, grad_k = threshold_backward(grad_y, g, idx, rows, g_rows)
        return grad_x, grad_k if ctx.needs_input_grad[1] else None, None, None, None


def threshold_mask(x: Tensor, k: Tensor, t: float, link: Link, solver: str = "auto") -> Tensor:
    """Applies the threshold family to validated rows ``x`` (B, n) with budgets ``k`` (B,)."""
    fn = ThresholdMask if link.piecewise_linear else CurvedThresholdMask
    return fn.apply(x, k, t, link, solver)[0]
