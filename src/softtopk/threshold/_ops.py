"""The threshold family as two ``torch.library`` custom ops: one per direction.

``torch.ops.softtopk.threshold_fwd(x, k, t, link, p, solver) -> (y, tau)``
    x (B, n) float32/float64 rows, k and t (B,) float64 budgets and temperatures, the
    link code (0 clip, 1 power p < 2, 2 logistic, 3 Laplace), p, and the solver (0 the
    backend's default, 1 whole-row Newton, 2 sort). Returns the mask y (B, n) in the
    dtype of x and the thresholds tau (B,) in float64, whose non-finite values mark the
    rows set by a rule: NaN (a NaN in the row or in k), +inf (k = 0, or +inf entries
    sharing k) and -inf (every entry above -inf gets 1).

``torch.ops.softtopk.threshold_bwd(y, tau, t, grad_y, link, p, x=None) -> (grad_x, grad_k)``
    the implicit vector-Jacobian product: grad_x = h/t (v - c), grad_k = c with
    h = G'(z) and c = <h, v>/sum h. The sparse links' h is read off the output
    (G'(G^{-1}(y))) and x is None; the dense links' (logistic, Laplace) is taken from
    z = (x - tau)/t, with x the forward's input rows (the output's 1 - y rounds where an
    entry saturates), and c from slopes scaled by the row's largest, which do not
    underflow.

Each op runs the route that :func:`softtopk._backend.route` picks for its device (numba
on CPU, Triton on CUDA, the tensor-op reference elsewhere). Both have fake
implementations (shapes and dtypes only), so torch.compile, torch.export and meta-device
models see one op per direction, and a vmap rule (rows are independent: the vmapped dim
joins the rows). Autograd is :class:`softtopk.threshold.ThresholdMask`, which adds
double backward and forward mode on top of these ops.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import _backend, _buffers
from ._links import Link, link_of_code
from ._reference import reference_forward


def _flat_vmap(info, in_dims, tensors):  # noqa: ANN001
    """Moves each vmapped dim to the front, broadcasts, and folds it into the row dim."""
    size = info.batch_size
    out = []
    for a, d in zip(tensors, in_dims, strict=True):
        a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand(size, *a.shape)
        out.append(a.reshape(size * a.shape[1], *a.shape[2:]) if a.dim() > 1 else a)
    return out


def forward_impl(x: Tensor, k: Tensor, t: Tensor, link: int, p: float, solver: int) -> tuple[Tensor, Tensor]:
    """What ``threshold_fwd`` computes on real tensors (eager calls skip the op's dispatch)."""
    B, n = x.shape
    x = x.contiguous()
    if solver != 0 or B == 0 or n == 0:
        if B == 0 or n == 0:
            return torch.empty_like(x), x.new_full((B,), math.inf, dtype=torch.float64)
        return reference_forward(x, k, t, link_of_code(link, p), solver)
    way = _backend.route(x)
    if way == "cpu":
        cpu = _backend.kernels("threshold._cpu")
        # outputs made in NumPy and shared with torch: one allocation each, no conversion
        xn = x.numpy()
        y = _buffers.output((B, n), xn.dtype)
        tau = np.empty(B, dtype=np.float64)
        args = (xn, k.contiguous().numpy(), t.contiguous().numpy(), link, float(p), y, tau)
        if _backend.serial(x.numel()):
            cpu.forward_serial(*args)
        else:
            with _backend.numba_threads():
                cpu.forward(*args, _backend.chunks())
        return torch.from_numpy(y), torch.from_numpy(tau)
    if way == "triton":
        return _backend.kernels("threshold._triton").forward(x, k, t, link, p)
    return reference_forward(x, k, t, link_of_code(link, p), solver)


@torch.library.custom_op("softtopk::threshold_fwd", mutates_args=())
def threshold_fwd(x: Tensor, k: Tensor, t: Tensor, link: int, p: float, solver: int) -> tuple[Tensor, Tensor]:
    return forward_impl(x, k, t, link, p, solver)


@threshold_fwd.register_fake
def _(x: Tensor, k: Tensor, t: Tensor, link: int, p: float, solver: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float64)


@threshold_fwd.register_vmap
def _(info, in_dims, x, k, t, link, p, solver):  # noqa: ANN001
    size = info.batch_size
    xs, ks, ts = _flat_vmap(info, in_dims[:3], (x, k, t))
    y, tau = threshold_fwd(xs, ks.contiguous(), ts.contiguous(), link, p, solver)
    return (y.reshape(size, -1, y.shape[-1]), tau.reshape(size, -1)), (0, 0)


def implicit_slopes(y: Tensor, tau: Tensor, t: Tensor, link: Link, x: Tensor | None) -> tuple[Tensor, Tensor]:
    """h = G'(z) on rows (B, n) and w, proportional to h with the largest about 1.

    Differentiable to any order, in reverse and forward mode. A sparse link's h is read
    off y (G'(G^{-1}(y))) and w = h. A dense link's (float64) has its value from
    z = (x - tau)/t (:meth:`Link.dense_slopes`; x, the forward's input rows, is required)
    and its derivatives through y (:meth:`Link.smooth_slope_from_value`), since tau
    carries none. Rows set by a rule (tau not finite) get h = w = 0, NaN rows h = NaN.
    """
    ruled = ~torch.isfinite(tau).unsqueeze(-1)
    fill = torch.where(torch.isnan(tau).unsqueeze(-1), math.nan, 0.0)
    if link.sparse:
        h = torch.where(ruled, fill, link.slope_from_value(y))
        return h, h
    if x is None:
        raise ValueError(f"the backward of the {link.name} link needs the forward's input x")
    value, w = link.dense_slopes(x.detach(), tau, t)
    smooth = link.smooth_slope_from_value(y).to(torch.float64)
    h = smooth + (value - smooth).detach()
    return torch.where(ruled, fill, h), torch.where(ruled, 0.0, w)


def slope_shares(h: Tensor, w: Tensor) -> Tensor:
    """h / sum h along the rows, its value taken as w / sum w (0 on a row without a slope).

    w / sum w holds where every h underflows; the derivatives are those of h / sum h.
    """
    share_w = _ratio(w, w.sum(-1, keepdim=True))
    if w is h:
        return share_w
    share_h = _ratio(h, h.sum(-1, keepdim=True))
    return share_h + (share_w - share_h).detach()


def reference_backward(
    y: Tensor, tau: Tensor, t: Tensor, v: Tensor, link: Link, x: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The implicit vjp in tensor ops (differentiable: the backward of the backward).

    grad_x = h/t (v - c), grad_k = c with h = G'(z) and c = <h, v>/sum h; rows with a
    non-finite tau (set by a rule) get zero gradients, NaN rows NaN. h and the scaled
    slopes w are :func:`implicit_slopes`'s; a dense link's c is taken from w, with the
    derivatives of <h, v>/sum h, which are 0 on a row whose every |z| exceeds about 745
    (float64), where sum h underflows.
    """
    nan_row = torch.isnan(tau)
    h, w = implicit_slopes(y, tau, t, link, x)
    if link.sparse:
        c = _ratio((h * v).sum(-1), h.sum(-1))
    else:
        v64 = v.to(torch.float64)
        c_w = _ratio(torch.where(w != 0, w * v64, 0.0).sum(-1), w.sum(-1))
        c_h = _ratio(torch.where(h != 0, h * v64, 0.0).sum(-1), h.sum(-1))
        c = c_h + (c_w - c_h).detach()  # c's value from w, its derivatives from <h, v>/sum h
    c = torch.where(nan_row, math.nan, c)
    grad_x = h * (v.to(h.dtype) - c.unsqueeze(-1).to(h.dtype)) / t.unsqueeze(-1).to(h.dtype)
    grad_x = torch.where(h != 0, grad_x, torch.where(nan_row.unsqueeze(-1), math.nan, 0.0))
    return grad_x.to(y.dtype), c


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    """a / b, 0 where b is 0 (with a derivative free of NaN there)."""
    nonzero = b != 0
    return torch.where(nonzero, a / torch.where(nonzero, b, 1.0), 0.0)


def backward_impl(
    y: Tensor, tau: Tensor, t: Tensor, grad_y: Tensor, link: int, p: float, x: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """What ``threshold_bwd`` computes on real tensors."""
    B, n = y.shape
    dense = link in (2, 3)  # the logistic and Laplace links
    if dense and x is None:
        raise ValueError(f"the backward of link {link} needs the forward's input x")
    if B == 0 or n == 0:
        return torch.zeros_like(y), y.new_zeros((B,), dtype=torch.float64)
    way = _backend.route(y)
    if way == "cpu":
        cpu = _backend.kernels("threshold._cpu")
        if grad_y.dtype != y.dtype:
            grad_y = grad_y.to(y.dtype)
        ys = y.contiguous().numpy()
        # the sparse links' kernels read y only; x's place takes y, of the same type
        xs = x.detach().to(y.dtype).contiguous().numpy() if dense else ys
        grad_x = _buffers.output((B, n), ys.dtype)
        grad_k = np.empty(B, dtype=np.float64)
        # grad_y is often expanded (the gradient of a sum has stride 0): NumPy copies it
        # to a contiguous array for less than a torch copy costs
        v = _buffers.contiguous(grad_y.detach().numpy())
        args = (ys, xs, tau.contiguous().numpy(), t.contiguous().numpy(), v, link, float(p), grad_x, grad_k)
        if _backend.serial(y.numel()):
            cpu.backward_serial(*args)
        else:
            with _backend.numba_threads():
                cpu.backward(*args, _backend.chunks())
        return torch.from_numpy(grad_x), torch.from_numpy(grad_k)
    if way == "triton":
        triton_kernels = _backend.kernels("threshold._triton")
        return triton_kernels.backward(y, tau, t, grad_y, link, p, x if dense else None)
    grad_x, grad_k = reference_backward(y, tau, t, grad_y.to(y.dtype), link_of_code(link, p), x)
    return grad_x, grad_k.to(torch.float64)


@torch.library.custom_op("softtopk::threshold_bwd", mutates_args=())
def threshold_bwd(
    y: Tensor, tau: Tensor, t: Tensor, grad_y: Tensor, link: int, p: float, x: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    return backward_impl(y, tau, t, grad_y, link, p, x)


@threshold_bwd.register_fake
def _(
    y: Tensor, tau: Tensor, t: Tensor, grad_y: Tensor, link: int, p: float, x: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(y), y.new_empty(y.shape[:-1], dtype=torch.float64)


@threshold_bwd.register_vmap
def _(info, in_dims, y, tau, t, grad_y, link, p, x=None):  # noqa: ANN001
    size = info.batch_size
    if x is None:
        ys, taus, ts, gs = _flat_vmap(info, in_dims[:4], (y, tau, t, grad_y))
        xs = None
    else:
        ys, taus, ts, gs, xs = _flat_vmap(info, in_dims[:4] + in_dims[6:], (y, tau, t, grad_y, x))
        xs = xs.contiguous()
    gx, gk = threshold_bwd(ys.contiguous(), taus.contiguous(), ts.contiguous(), gs.contiguous(), link, p, xs)
    return (gx.reshape(size, -1, gx.shape[-1]), gk.reshape(size, -1)), (0, 0)
