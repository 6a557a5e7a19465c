"""Projections onto the permutahedron, and soft_sort / soft_rank on them (Blondel et al. 2020).

The permutahedron P(w) is the convex hull of the permutations of w. Projecting z onto it
reduces to one isotonic regression after a sort (Blondel et al. 2020, Prop. 3): with
s = z sorted in decreasing order, sigma the sorting permutation, and w sorted likewise,

* L2:  P(z, w) = z - v*[sigma^-1],  v* = argmin_{v_1 >= ... >= v_n} 1/2 ||v - (s - w)||^2;
* KL:  P(z, w) = exp(z - v*[sigma^-1]),  v*_B = LSE_B(s) - log sum_B w  (w > 0).

All the isotonic work is done in float64 (whatever the input dtype; the sort stays in
the input's compute dtype): at small temperatures z = x / t and rho / t are large, and
the outputs are differences of large numbers, which float32 would round to the unit.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    check_bool,
    check_choice,
    check_dim,
    check_positive,
    check_tensor,
    compute_dtype,
    in_dual_level,
    is_tracing,
    may_sync,
)
from .._rows import empty_result, to_rows
from ._function import SOLVERS, _overflow_scale, isotonic_rows

REGULARIZATIONS = ("l2", "kl")
F64 = torch.float64


def _unsort(sorted_rows: Tensor, perm: Tensor) -> Tensor:
    """out[..., perm[j]] = sorted_rows[..., j]."""
    return torch.zeros_like(sorted_rows).scatter(-1, perm, sorted_rows)


def _rho(n: int, device: torch.device) -> Tensor:
    """(1, n) = (n, n-1, ..., 1) in float64."""
    return torch.arange(n, 0, -1, dtype=F64, device=device).unsqueeze(0)


def _project_sorted(
    s: Tensor, w_sorted: Tensor, regularization: str, solver: str, max_iter: int, tol: float
) -> Tensor:
    """Projection of rows already sorted in decreasing order (float64), in sorted order."""
    w_sorted = w_sorted.expand_as(s)
    if regularization == "l2":
        v = isotonic_rows(s - w_sorted, None, "l2", solver, max_iter, tol)[0]
        return s - v
    lw = torch.log(w_sorted)
    v = isotonic_rows(s - lw, lw.contiguous(), "kl", solver, max_iter, tol)[0]
    return torch.exp(s - v)


# ------------------------------------------------ fused CPU kernels (numba): sort + PAV + unsort


def _fused(x: Tensor, solver: str) -> bool:
    """The fused numba route: eager CPU tensors with values, exact PAV asked for.

    Under torch.compile, torch.func transforms, forward-mode AD (a dual level) and on
    the meta device the same result comes from the tensor-op route (a sort, the isotonic
    custom op, an unsort), which has forward mode.
    """
    return (
        solver in ("auto", "pav")
        and not is_tracing()
        and not in_dual_level()
        and may_sync(x)
        and _backend.route(x) == "cpu"
        and x.dtype in (torch.float32, torch.float64)
    )


def _cpu():  # noqa: ANN202
    return _backend.kernels("isotonic._pav_cpu")


def _recomputed_vjp(ctx: Any, g: Tensor, generic) -> Tensor:  # noqa: ANN001
    """The vjp of the tensor-op route at the saved input, differentiable (double backward)."""
    (x,) = ctx.saved_tensors[-1:]
    with torch.enable_grad():
        xr = x if x.requires_grad else x.detach().requires_grad_()
        out = generic(xr)
        (grad,) = torch.autograd.grad(out, xr, g, create_graph=True)
    return grad


def _spread(
    g: Tensor,
    factor: Tensor | None,
    perm: Tensor,
    read_sorted: bool,
    bid: Tensor,
    coef: Tensor,
    alpha: float,
    beta: float,
) -> Tensor:
    g = g.contiguous()
    out = torch.empty_like(g)
    fac = factor.numpy() if factor is not None else np.ones((1, 1), dtype=g.numpy().dtype)
    with _backend.numba_threads():
        _cpu()._spread_backward(
            g.numpy(),
            fac,
            factor is not None,
            perm.numpy(),
            read_sorted,
            bid.numpy(),
            coef.numpy(),
            alpha,
            beta,
            out.numpy(),
        )
    return out


class _Fused(NamedTuple):
    """What a fused numba pass reads and writes, for rows x (B, n) on the CPU."""

    x: np.ndarray  # the rows, float32 or float64
    bits: np.ndarray  # the same memory as unsigned ints (the radix sort's keys)
    masks: np.ndarray  # (sign bit, all bits) of that width, uint64
    out: Tensor  # the result, x's dtype
    perm: Tensor  # the sorting permutation, int32
    bid: Tensor  # block index of every sorted position, int32
    coef: Tensor  # the backward's per-position block weight, x's dtype

    def kernel_outputs(self) -> tuple[np.ndarray, ...]:
        return self.out.numpy(), self.perm.numpy(), self.bid.numpy(), self.coef.numpy()


def _fused_buffers(x: Tensor) -> _Fused:
    xn = x.detach().contiguous().numpy()
    if xn.dtype == np.float32:
        bits, masks = xn.view(np.uint32), np.array([1 << 31, (1 << 32) - 1], dtype=np.uint64)
    else:
        bits, masks = xn.view(np.uint64), np.array([1 << 63, (1 << 64) - 1], dtype=np.uint64)
    out, coef = torch.empty(x.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)
    perm, bid = torch.empty(x.shape, dtype=torch.int32), torch.empty(x.shape, dtype=torch.int32)
    return _Fused(xn, bits, masks, out, perm, bid, coef)


class FusedSoftRank(torch.autograd.Function):
    """soft_rank of CPU rows (B, n): radix sort + PAV + unsort in one numba pass per row.

    The plain backward is one numba pass; a backward that is differentiated again
    (``create_graph=True``) is the tensor-op route's, recomputed at the saved input.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: float, kl: bool, descending: bool) -> Tensor:  # type: ignore[override]
        c = (-1.0 if descending else 1.0) / t
        f = _fused_buffers(x)
        log_rho = np.log(np.arange(x.shape[-1], 0, -1, dtype=np.float64))
        with _backend.numba_threads():
            _cpu()._rank_forward(f.x, f.bits, f.masks, c, kl, log_rho, *f.kernel_outputs())
        out, perm, bid, coef = f.out, f.perm, f.bid, f.coef
        ctx.c, ctx.kl = c, kl
        ctx.generic = lambda a: _rank_rows(a, t, "kl" if kl else "l2", descending, "pav")
        ctx.save_for_backward(perm, bid, coef, out if kl else out.new_empty(0), x)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            return _recomputed_vjp(ctx, g, ctx.generic), None, None, None
        perm, bid, coef, out, _ = ctx.saved_tensors
        grad = _spread(g.to(coef.dtype), out if ctx.kl else None, perm, False, bid, coef, ctx.c, -ctx.c)
        return grad, None, None, None


class FusedSoftSort(torch.autograd.Function):
    """soft_sort of CPU rows (B, n): radix sort + PAV in one numba pass per row.

    The plain backward is one numba pass; a backward that is differentiated again is the
    tensor-op route's, recomputed at the saved input.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: float, kl: bool, descending: bool) -> Tensor:  # type: ignore[override]
        f = _fused_buffers(x)
        with _backend.numba_threads():
            _cpu()._sort_forward(f.x, f.bits, f.masks, descending, 1.0 / t, kl, *f.kernel_outputs())
        out, perm, bid, coef = f.out, f.perm, f.bid, f.coef
        ctx.generic = lambda a: _sort_rows(a, t, "kl" if kl else "l2", descending, "pav")
        ctx.save_for_backward(perm, bid, coef, x)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            return _recomputed_vjp(ctx, g, ctx.generic), None, None, None
        perm, bid, coef, _ = ctx.saved_tensors
        grad = _spread(g.to(coef.dtype), None, perm, True, bid, coef, 0.0, 1.0)
        return grad, None, None, None


def _rank_rows(rows: Tensor, t: float, regularization: str, descending: bool, solver: str) -> Tensor:
    """soft_rank of rows (B, n) by tensor ops around the isotonic custom op (float64)."""
    s, perm = rows.sort(-1, descending=not descending)
    # Sorting -x in decreasing order is sorting x in increasing order.
    s = s.to(F64) / (-t if descending else t)
    rho = _rho(rows.shape[-1], rows.device)
    return _unsort(_project_sorted(s, rho, regularization, solver, 10_000, 1e-6), perm).to(rows.dtype)


def _sort_rows(rows: Tensor, t: float, regularization: str, descending: bool, solver: str) -> Tensor:
    """soft_sort of rows (B, n) by tensor ops around the isotonic custom op (float64)."""
    s = rows.sort(-1, descending=descending).values.to(F64)
    if not descending:
        s = -s
    w = _rho(rows.shape[-1], rows.device) / t
    if regularization == "l2":
        v = isotonic_rows(w - s, None, "l2", solver)[0]
    else:
        v = isotonic_rows(w - s, s, "kl", solver)[0]
    out = w - v
    return (out + 0.0 if descending else -out + 0.0).to(rows.dtype)


def _nan_rows(out: Tensor, rows: Tensor) -> Tensor:
    """Rows of ``rows`` with a non-finite entry become NaN in ``out`` (same row count)."""
    if not may_sync(rows):
        bad = ~torch.isfinite(rows).all(-1, keepdim=True)
        return torch.where(bad, torch.nan, out)
    bad = ~torch.isfinite(rows.detach()).all(-1)
    if not bool(bad.any()):
        return out
    return torch.where(bad.unsqueeze(-1), torch.nan, out)


def _check_common(
    x: object, dim: object, regularization: object, solver: object
) -> tuple[Tensor, int, str, str]:
    x = check_tensor(x)
    d = check_dim(dim, x.dim())
    regularization = check_choice(regularization, "regularization", REGULARIZATIONS)
    solver = check_choice(solver, "solver", SOLVERS)
    if solver == "dykstra" and regularization != "l2":
        raise ValueError(f"solver='dykstra' supports regularization='l2' only, got {regularization!r}")
    return x, d, regularization, solver


def permutahedron_projection(
    x: Tensor,
    w: Tensor,
    *,
    dim: int = -1,
    regularization: str = "l2",
    solver: str = "auto",
    max_iter: int = 10_000,
    tol: float = 1e-6,
) -> Tensor:
    r"""Projection of x onto the permutahedron of w along ``dim`` (Euclidean or KL).

    .. math::

        P_{\mathrm{l2}}(x, w) = \arg\min_{\mu \in \mathcal{P}(w)} \tfrac12\|\mu - x\|^2,
        \qquad
        P_{\mathrm{kl}}(x, w) = \arg\min_{\mu \in \mathcal{P}(w)}
            \langle \mu, \log\mu - x - \mathbf 1\rangle

    with :math:`\mathcal P(w) = \operatorname{conv}\{w_\sigma\}` (any order of w). Computed
    by a sort and one decreasing isotonic regression (see :func:`isotonic_regression`);
    differentiable in x and w with the O(n) block Jacobian.

    Args:
        x: points to project, any shape, floating dtype.
        w: the permutahedron's generating vector: shape (n,) with n = x.shape[dim], or any
            shape that broadcasts to x (one w per row). Positive for ``"kl"``.
        dim: the dimension of the vectors.
        regularization: ``"l2"`` (Euclidean projection) or ``"kl"``.
        solver: ``"auto"``/``"pav"`` (exact) or ``"dykstra"`` (L2 only, certified or warned).
        max_iter: Dykstra only, see :func:`isotonic_regression`.
        tol: Dykstra only, see :func:`isotonic_regression`.

    Returns:
        Tensor with the shape and dtype of x. Rows with a non-finite entry are NaN.
        The projection is z - v with v the isotonic fit of z - w (z the scaled input), in
        float64: an output entry is accurate to about 2^-52 max abs(z), so outputs of the
        size of w lose their precision once max abs(z) exceeds about 1e15 max abs(w).

    Example:
        >>> import torch, softtopk
        >>> softtopk.permutahedron_projection(torch.tensor([2.0, 0.0, 0.5]), torch.tensor([1.0, 0.0, 0.0]))
        tensor([1., 0., 0.])
        >>> softtopk.permutahedron_projection(torch.tensor([0.2, 0.0, 0.1]), torch.tensor([1.0, 0.0, 0.0]))
        tensor([0.4333, 0.2333, 0.3333])

    Reference:
        Blondel, Teboul, Berthet, Djolonga. "Fast Differentiable Sorting and Ranking",
        ICML 2020.
    """
    x, d, regularization, solver = _check_common(x, dim, regularization, solver)
    w = check_tensor(w, "w")
    n = x.shape[d]
    if w.dim() == 1 and w.shape[0] == n and x.dim() > 1:
        shape = [1] * x.dim()
        shape[d] = n
        w = w.reshape(shape)
    try:
        wb = torch.broadcast_to(w, x.shape)
    except RuntimeError:
        raise ValueError(
            f"w must have shape ({n},) (n = x.shape[dim]) or broadcast to x.shape {tuple(x.shape)}, "
            f"got {tuple(w.shape)}"
        ) from None
    if regularization == "kl" and wb.numel() and may_sync(wb) and bool((wb.detach() <= 0).any()):
        raise ValueError(f"w must be positive for regularization='kl', got a minimum of {wb.min().item()!r}")
    rows, restore = to_rows(x, d)
    if rows.numel() == 0:
        return empty_result(x)
    w_rows, _ = to_rows(wb, d)
    cd = compute_dtype(x.dtype)
    s, perm = rows.to(cd).sort(-1, descending=True)
    w_sorted = w_rows.to(device=rows.device, dtype=F64).sort(-1, descending=True).values
    out = _project_sorted(s.to(F64), w_sorted, regularization, solver, max_iter, tol)
    return restore(_unsort(out, perm)).to(x.dtype)


def _strength(temperature: object, regularization_strength: object) -> float:
    """The temperature, given as ``temperature`` or as torchsort's ``regularization_strength``."""
    if regularization_strength is None:
        return check_positive(1.0 if temperature is None else temperature, "temperature")
    strength = check_positive(regularization_strength, "regularization_strength")
    if temperature is not None and check_positive(temperature, "temperature") != strength:
        raise ValueError(
            "temperature and regularization_strength name the same parameter; got "
            f"temperature={temperature!r} and regularization_strength={regularization_strength!r}"
        )
    return strength


def soft_rank(
    x: Tensor,
    regularization: str = "l2",
    regularization_strength: float | None = None,
    *,
    dim: int = -1,
    temperature: float | None = None,
    descending: bool = False,
    solver: str = "auto",
) -> Tensor:
    r"""Soft ranks along ``dim``: the projection of x / t onto the permutahedron of (1, ..., n).

    .. math::

        r(x) = P\big(\pm x / t,\ (n, n-1, \dots, 1)\big)

    with P the L2 or KL projection (:func:`permutahedron_projection`). With
    ``descending=False`` (torchsort's and fast-soft-sort's convention) rank 1 goes to the
    smallest entry and n to the largest; ``descending=True`` ranks the largest first.
    As t -> 0 the ranks become the hard ranks (1-based); as t -> inf they all tend to
    (n + 1) / 2. The ranks of a row always sum to n (n + 1) / 2. Equal to
    ``torchsort.soft_rank(x, regularization, regularization_strength=t)`` on 2-D input
    along the last dim, with gradients; the KL ranks stay finite at any temperature.

    Args:
        x: scores, any shape, floating dtype (float16, bfloat16, float32, float64).
        regularization: ``"l2"`` (piecewise linear in x) or ``"kl"``.
        regularization_strength: torchsort's name for ``temperature`` (give one or the
            other, or both equal), so that torchsort calls run unchanged.
        dim: the dimension to rank along.
        temperature: t > 0, in the units of x (default 1, as torchsort).
        descending: rank 1 for the largest entry instead of the smallest.
        solver: ``"auto"``/``"pav"`` (exact) or ``"dykstra"`` (L2 only).

    Returns:
        Tensor with the shape and dtype of x. Rows with a non-finite entry are NaN.
        The projection is z - v with v the isotonic fit of z - w (z the scaled input), in
        float64: an output entry is accurate to about 2^-52 max abs(z), so outputs of the
        size of w lose their precision once max abs(z) exceeds about 1e15 max abs(w).

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([[2.0, 0.0, 5.0], [1.0, 1.0, 0.0]])
        >>> softtopk.soft_rank(x, temperature=0.1)
        tensor([[2.0000, 1.0000, 3.0000],
                [2.5000, 2.5000, 1.0000]])
        >>> softtopk.soft_rank(x, temperature=4.0, descending=True)
        tensor([[2.0833, 2.5833, 1.3333],
                [1.9167, 1.9167, 2.1667]])

    Reference:
        Blondel, Teboul, Berthet, Djolonga. "Fast Differentiable Sorting and Ranking",
        ICML 2020.
    """
    x, d, regularization, solver = _check_common(x, dim, regularization, solver)
    t = _strength(temperature, regularization_strength)
    descending = check_bool(descending, "descending")
    rows, restore = to_rows(x, d)
    if rows.numel() == 0:
        return empty_result(x)
    cd = compute_dtype(x.dtype)
    rows = rows.to(cd)
    if _fused(rows, solver):
        out = FusedSoftRank.apply(rows, t, regularization == "kl", descending)
    else:
        out = _rank_rows(rows, t, regularization, descending, solver)
    return restore(_nan_rows(out, rows)).to(x.dtype)


def soft_sort(
    x: Tensor,
    regularization: str = "l2",
    regularization_strength: float | None = None,
    *,
    dim: int = -1,
    temperature: float | None = None,
    descending: bool = False,
    k: int | None = None,
    solver: str = "auto",
) -> Tensor:
    r"""Soft sort along ``dim``: the projection of (n, ..., 1) / t onto the permutahedron of x.

    .. math::

        \mathrm{sort}_t(x) = \pm\Big(\frac{\rho}{t} - v^\star\Big),\qquad
        v^\star = \arg\min_{v_1 \ge \dots \ge v_n} \ell\Big(v, \frac{\rho}{t} - s\Big)

    with s = (±x) sorted in decreasing order, rho = (n, ..., 1), and the L2 block values
    (block means) or the KL ones (v_B = LSE_B(rho / t) - LSE_B(s)). The output is sorted:
    increasing by default (torchsort's convention), decreasing with ``descending=True``.
    As t -> 0 it is the hard sort; as t -> inf every entry tends to mean(x) (L2). Equal
    to ``torchsort.soft_sort(x, regularization, regularization_strength=t)`` on 2-D input
    along the last dim, with gradients.

    Args:
        x: values, any shape, floating dtype.
        regularization: ``"l2"`` or ``"kl"``.
        regularization_strength: torchsort's name for ``temperature`` (give one or the
            other, or both equal), so that torchsort calls run unchanged.
        dim: the dimension to sort along.
        temperature: t > 0 (default 1, as torchsort).
        descending: largest first.
        k: if given (an int in [0, n]), only the first k sorted entries along ``dim``: the
            k soft largest values, largest first, with ``descending=True`` (a sorted soft
            top-k), the k soft smallest otherwise.
        solver: ``"auto"``/``"pav"`` (exact) or ``"dykstra"`` (L2 only).

    Returns:
        Tensor with the shape and dtype of x (size k along ``dim`` if k is given). Rows with
        a non-finite entry are NaN.
        As for :func:`softtopk.isotonic_regression`, the backward sums the cotangent over
        pooled blocks in the dtype of x, so a float32 cotangent whose block sums exceed the
        float32 range gives infinite gradients.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([2.0, 0.0, 5.0, 4.5])
        >>> softtopk.soft_sort(x, temperature=0.1)
        tensor([0.0000, 2.0000, 4.5000, 5.0000])
        >>> softtopk.soft_sort(x, temperature=0.5, descending=True, k=2)
        tensor([5.0000, 4.1667])

    Reference:
        Blondel, Teboul, Berthet, Djolonga. "Fast Differentiable Sorting and Ranking",
        ICML 2020.
    """
    x, d, regularization, solver = _check_common(x, dim, regularization, solver)
    t = _strength(temperature, regularization_strength)
    descending = check_bool(descending, "descending")
    n = x.shape[d]
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k must be an int or None, got {type(k).__name__} {k!r}")
        if not 0 <= int(k) <= n:
            raise ValueError(f"k must lie in [0, n] = [0, {n}] along dim={d}, got {k!r}")
        k = int(k)
    rows, restore = to_rows(x, d)
    if rows.numel() == 0:
        out = empty_result(x)
        return out if k is None else out.narrow(d, 0, k)
    cd = compute_dtype(x.dtype)
    rows = rows.to(cd)
    # L2: sort_t(x) = c sort_{c t}(x / c). Rows whose block sums could overflow are solved
    # divided by a power of two c (exact up to subnormals), with the temperature times c.
    scale = _overflow_scale(rows.detach()).amax() if regularization == "l2" else None
    if scale is not None and may_sync(rows):
        scale = float(scale)
        scale = scale if scale > 1.0 else None
    if scale is not None:
        rows, t = rows / scale, t * scale
    if _fused(rows, solver):
        out = FusedSoftSort.apply(rows, t, regularization == "kl", descending)
    else:
        out = _sort_rows(rows, t, regularization, descending, solver)
    if scale is not None:
        out = out * scale
    out = _nan_rows(out, rows)  # x / c keeps x's NaN and infinities
    if k is not None:
        out = out[:, :k]
    return restore(out).to(x.dtype)
