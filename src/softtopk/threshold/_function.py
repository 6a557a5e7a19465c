"""Autograd for the threshold family: the implicit O(n) backward, differentiable again.

With g_i = G'((x_i - tau)/t)/t and tau defined by sum_i G((x_i - tau)/t) = k, the
implicit function theorem gives

    J = diag(g) - g g^T / sum(g),      dy/dk = g / sum(g),

so the vector-Jacobian product is ``g * (v - <g, v>/sum(g))``, the gradient in k is
``<g, v>/sum(g)``, and the Jacobian-vector product is ``g * (u - (<g, u> - dk)/sum(g))``.
The forward saves y and tau (B,); a dense link (logistic, Laplace) also saves its input
rows x. A sparse link's g is a function of the output alone, g = G'(G^{-1}(y))/t (its
support is where 0 < y < 1, and there y has no cancellation). A dense link's g is taken
from z = (x - tau)/t, because where an entry saturates 1 - y rounds and y (1 - y) or
min(y, 1 - y) with it, which makes the gradient in k wrong by O(1) on rows near the hard
mask; its ratios of sums (c, dtau) are taken from slopes scaled by the row's largest, so
they hold where every g underflows. The plain backward is one fused op; when the
backward is itself differentiated (``create_graph=True``, ``torch.func``), it is written
in tensor ops, whose g has the value above and the derivatives in the saved y (whose own
gradient is this function again), so the second derivative is exact:
d g_i/dx_j = G''(z_i)/t dz_i/dx_j. Forward mode is the custom ``jvp``; under nested
forward mode (``jacfwd(jacfwd(f))``), which torch.func does not run through an
autograd.Function's jvp, the mask is written in tensor ops with tau from two Newton
steps (:func:`_newton_composed_mask`). Rows with sum(g) = 0 (hard rows) and rows set by
a rule get zero gradients; NaN rows NaN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import forward_levels, has_values, in_dual_level, is_real, is_tracing
from . import _ops
from ._links import Link
from ._ops import implicit_slopes, reference_backward, slope_shares
from ._reference import SOLVERS


def _saved(ctx: Any, x: Tensor, y: Tensor, tau: Tensor, t: Tensor, link: Link) -> None:
    """Saves y, tau and t, and x for a dense link, for both modes."""
    tensors = (y, tau, t) if link.sparse else (y, tau, t, x)
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)
    ctx.link = link


class CompiledThresholdMask(torch.autograd.Function):
    """y = G((x - tau)/t) with sum(y) = k along the last dim of rows (B, n), reverse mode.

    Inputs are validated rows in the compute dtype, k and t (B,) in float64; the outputs
    are y and tau (float64, not differentiable). Differentiable in x and k, to any order.
    This is the class torch.compile traces (Dynamo does not trace a custom ``jvp``);
    :class:`ThresholdMask` adds forward mode.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: Tensor, t: Tensor, link: Link, solver: str) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if has_values(x):  # eager: the op's implementation without its dispatch cost
            return _ops.forward_impl(x, k, t, link.code, link.p, SOLVERS[solver])
        return torch.ops.softtopk.threshold_fwd(x, k, t, link.code, link.p, SOLVERS[solver])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, _, t, link, _ = inputs
        y, tau = output
        ctx.mark_non_differentiable(tau)
        _saved(ctx, x, y, tau, t, link)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_tau: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        y, tau, t = saved[:3]
        x = saved[3] if len(saved) > 3 else None
        link = ctx.link
        if grad_y is None:  # (gradients are not materialised in the eager class)
            grad_y = torch.zeros_like(y)
        if torch.is_grad_enabled() or is_tracing():
            grad_x, grad_k = reference_backward(y, tau, t, grad_y.to(y.dtype), link, x)
        elif is_real(y):  # eager: the op's implementation without its dispatch cost
            grad_x, grad_k = _ops.backward_impl(y, tau, t, grad_y, link.code, link.p, x)
        else:
            grad_x, grad_k = torch.ops.softtopk.threshold_bwd(y, tau, t, grad_y, link.code, link.p, x)
        grad_k = grad_k.to(torch.float64) if ctx.needs_input_grad[1] else None
        return grad_x, grad_k, None, None, None


class ThresholdMask(CompiledThresholdMask):
    """:class:`CompiledThresholdMask` with forward mode (``torch.func.jvp``, ``jacfwd``)."""

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dk: Tensor | None, *unused: Any) -> tuple[Tensor, None]:  # type: ignore[override]
        saved = ctx.saved_tensors
        y, tau, t = saved[:3]
        h, w = implicit_slopes(y, tau, t, ctx.link, saved[3] if len(saved) > 3 else None)
        g = h / t.unsqueeze(-1).to(h.dtype)
        # dy = g (u - <share, u>) + share dk with share = g / sum g: dtau = (<g, u> - dk)/sum g
        share = slope_shares(h, w)
        u = torch.zeros_like(y) if dx is None else dx.to(y.dtype)
        u = u.to(g.dtype)
        dy = g * (u - (torch.where(w != 0, share * u, 0.0)).sum(-1, keepdim=True))
        if dk is not None:
            dy = dy + share * dk.to(share.dtype).unsqueeze(-1)
        return dy.to(y.dtype), None


class EagerThresholdMask(torch.autograd.Function):
    """:class:`ThresholdMask` in the classic form, for eager calls outside torch.func.

    ``Function.apply`` binds the arguments of a function with ``setup_context`` through
    ``inspect.signature`` on every call, which costs more than solving a short row; the
    classic form skips that. Same forward, backward and forward mode.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Tensor, t: Tensor, link: Link, solver: str) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        y, tau = _ops.forward_impl(x, k, t, link.code, link.p, SOLVERS[solver])
        ctx.mark_non_differentiable(tau)
        ctx.set_materialize_grads(False)  # tau's gradient is never used: no zeros made for it
        _saved(ctx, x, y, tau, t, link)
        return y, tau

    backward = staticmethod(CompiledThresholdMask.backward)
    jvp = staticmethod(ThresholdMask.jvp)


def _in_range(x: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 rows near the float64 limit divided by a power of two c, with t / c.

    Branch-free (no host sync) except on real CPU tensors, where rows that need no
    rescaling are returned as they are.

    The mask depends on (x - tau) / t only, so (x, t) -> (x / c, t / c) leaves it
    unchanged (exactly, up to entries that become subnormal). The solvers form x - tau,
    which overflows once max abs(x) nears the largest float64, and a dense link's tau
    lies up to t |G^{-1}(k / n)| (at most about 745 t) beyond the entries, which
    overflows once t nears it: c brings both max abs(x) and _T_SPAN t within _LIMIT.
    """
    finite = torch.where(torch.isfinite(x), x, 0.0).detach().abs().amax(-1)
    size = torch.maximum(torch.log2(finite), torch.log2(tt) + math.log2(_T_SPAN))  # (no overflow)
    c = torch.exp2(torch.ceil(size - math.log2(_LIMIT)).clamp(min=0.0))  # 1 on ordinary rows
    if x.is_cpu and has_values(x) and bool((c == 1.0).all()):
        return x, tt  # (a dense link's backward saves x: no copy of it for ordinary CPU rows)
    return x / c.unsqueeze(-1), tt / c


#: Rows whose largest finite magnitude, or _T_SPAN times whose temperature, exceeds this
#: are rescaled (see _in_range).
_LIMIT = torch.finfo(torch.float64).max / 64.0
#: How many temperatures a dense link's tau can lie beyond the entries, with a margin:
#: |G^{-1}(q)| <= 745 for the smallest positive float64 q.
_T_SPAN = 1024.0


def threshold_mask(x: Tensor, k: Tensor, t: Tensor | float, link: Link, solver: str = "auto") -> Tensor:
    """The threshold family on validated rows ``x`` (B, n) with budgets ``k`` (B,).

    ``t`` is a number or a (B,) tensor of temperatures (constants: no gradient).
    """
    B = x.shape[0]
    tt = t.detach().to(device=x.device, dtype=torch.float64) if isinstance(t, Tensor) else None
    if tt is None:
        tt = torch.full((B,), float(t), dtype=torch.float64, device=x.device)
    if x.dtype == torch.float64:
        x, tt = _in_range(x, tt)
    if k.dtype != torch.float64:
        k = k.to(torch.float64)
    if torch.compiler.is_compiling():
        fn = CompiledThresholdMask
    elif not has_values(x):  # torch.func transforms, fake and meta tensors
        if forward_levels() >= 2:
            return _newton_composed_mask(x, k, tt, link, solver)
        fn = ThresholdMask
    elif _differentiated(x, k):
        fn = EagerThresholdMask
    else:  # nothing to differentiate: the op's implementation, without autograd's cost
        return _ops.forward_impl(x, k, tt, link.code, link.p, SOLVERS[solver])[0]
    return fn.apply(x, k, tt, link, solver)[0]


def _differentiated(x: Tensor, k: Tensor) -> bool:
    """Whether an eager call is recorded for reverse or forward mode (dual tensors)."""
    if torch.is_grad_enabled() and (x.requires_grad or k.requires_grad):
        return True
    return in_dual_level()


def _newton_composed_mask(x: Tensor, k: Tensor, t: Tensor, link: Link, solver: str) -> Tensor:
    """The mask under nested forward mode, with tau's derivatives from two Newton steps.

    torch.func does not differentiate an autograd.Function's ``jvp`` rule by an outer
    forward-mode transform (``jacfwd(jacfwd(f))`` would get 0 for every second
    derivative, pytorch/pytorch#197867), so there the mask is written in tensor ops: with
    tau0 the solved threshold (held constant) and the Newton map

        T(x, k, tau) = tau + t (sum G((x - tau)/t) - k) / sum G'((x - tau)/t),

    tau1 = T(x, k, tau0) and tau2 = T(x, k, tau1). T's derivative in tau is 0 at the
    root, so tau1 agrees with the implicit tau(x, k) to first order in a perturbation of
    (x, k) and tau2 to third order: the derivatives of tau2, and of y = G((x - tau2)/t),
    are exact up to the third. Their values are kept at tau0 and the solved y. Rows set
    by a rule keep their constant y (NaN rows a NaN derivative). A row without a slope
    (sum G' = 0: a hard sparse row, or a dense row whose every |z| exceeds about 745 in
    float64) takes no step, so its derivatives are 0 there: on such a dense row this
    also makes dy/dk 0, where the first-order routes give w / sum w.
    """
    x0 = x.detach()
    y0, tau0 = torch.ops.softtopk.threshold_fwd(x0, k.detach(), t, link.code, link.p, SOLVERS[solver])
    regular = torch.isfinite(tau0).unsqueeze(-1)
    xs = torch.where(regular, x, 0.0).to(torch.float64)
    tau_c = torch.where(regular.squeeze(-1), tau0, 0.0)
    t64 = t.unsqueeze(-1)

    def newton(tau: Tensor) -> Tensor:
        g, gp = link((xs - tau.unsqueeze(-1)) / t64)
        total = gp.sum(-1)
        nonzero = total > 0
        step = torch.where(nonzero, t * (g.sum(-1) - k) / torch.where(nonzero, total, 1.0), 0.0)
        return tau + step

    tau = tau_c
    for _ in range(2):
        new = newton(tau)
        tau = tau_c + (new - new.detach())  # the value tau0, the derivatives of T
    y, _ = link((xs - tau.unsqueeze(-1)) / t64)
    y = y0 + (y - y.detach()).to(y0.dtype)
    nan_row = torch.isnan(tau0).unsqueeze(-1)
    ruled = torch.where(nan_row, y0 + math.nan * (x - x0), y0)
    return torch.where(regular, y, ruled)
