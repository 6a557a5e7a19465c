"""Isotonic regression: the public function, the solver dispatch and the block backward.

Backward (closed form by blocks, O(n)): with G_B = sum_{i in B} g_i the block sums of the
incoming gradient g,

* L2, v_B = sum_B w y / sum_B w:   dL/dy_j = w_j G_B / W_B,   dL/dw_j = (y_j - v_B) G_B / W_B;
* KL, v_B = LSE_B(y + lw) - LSE_B(lw):   dL/dy_j = p_j G_B,   dL/dlw_j = (p_j - q_j) G_B,
  with p = softmax_B(y + lw) and q = softmax_B(lw) (computed from the saved block
  log-sum-exp, so that nothing overflows).

The partition is the solver's own (PAV's pooling record, or Dykstra's certified one).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    check_bool,
    check_choice,
    check_dim,
    check_int,
    check_tensor,
    compute_dtype,
    forward_levels,
    may_sync,
)
from .._rows import empty_result, to_rows
from ._dykstra import dykstra
from ._pav import pav_torch, segment_logsumexp, segment_sum

SOLVERS = ("auto", "pav", "dykstra")
LOSSES = ("l2", "kl")
#: The ``solver`` argument of the custom op.
ROUTES = {"pav": 0, "pav-torch": 1, "dykstra": 2}


class IsotonicInfo(NamedTuple):
    """What the solver did, per row (tensors have the batch shape: y.shape without dim).

    Attributes:
        solver: the route asked for: ``"pav"`` (exact; a sequential numba pass on CPU,
            rounds of tensor ops on other devices), ``"pav-torch"`` (the tensor-op rounds
            on any device) or ``"dykstra"``.
        converged: True where the answer is exact (always for PAV; for Dykstra, where the
            certificate of optimality passed).
        iterations: Dykstra iterations until the certificate (``max_iter`` where it did not
            pass), the pooling rounds of the tensor-op PAV, 0 for the numba PAV.
        blocks: int64 tensor with the shape of y: the block index of every entry along
            ``dim`` (0 for the leftmost block, entries share an index exactly when the
            solver pooled them).
    """

    solver: str
    converged: Tensor
    iterations: Tensor
    blocks: Tensor


def resolve_solver(solver: str, loss: str) -> str:
    """``"auto"`` -> ``"pav"``; Dykstra checked against the loss."""
    if solver == "dykstra":
        if loss != "l2":
            raise ValueError(f"solver='dykstra' supports loss='l2' only, got loss={loss!r}")
        return "dykstra"
    return "pav-torch" if solver == "pav-torch" else "pav"


def solve_rows(
    y: Tensor, w: Tensor | None, loss: str, solver: str, max_iter: int = 10_000, tol: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decreasing isotonic regression of rows (B, n), no autograd.

    ``w`` is the weights (L2) or the log-weights (KL). ``solver`` is a resolved route;
    ``"pav"`` runs numba on CPU tensors (unless ``SOFTTOPK_BACKEND`` says otherwise) and
    the tensor-op rounds elsewhere. Returns (v, bid, aux, converged (B,), iterations (B,)).
    """
    B = y.shape[0]
    if solver == "pav" and _backend.route(y) == "cpu":
        v, bid, aux = _backend.kernels("isotonic._pav_cpu").pav_numba(y, w, loss)
        ones = torch.ones(B, dtype=torch.bool)
        return v, bid, aux, ones, torch.zeros(B, dtype=torch.int64)
    if solver in ("pav", "pav-torch"):
        v, bid, aux, rounds = pav_torch(y, w, loss)
        ones = torch.ones(B, dtype=torch.bool, device=y.device)
        return v, bid, aux, ones, torch.full((B,), rounds, dtype=torch.int64, device=y.device)
    return dykstra(y, w, max_iter, tol)


def _overflow_scale(y: Tensor) -> Tensor:
    """(B, 1) powers of two that bring rows whose block sums could overflow into range; 1 elsewhere.

    A block value is a (weighted) mean, whose running sum over up to n entries overflows
    once max abs(y) nears max / n. Such rows are solved divided by 2^e (exact, except
    for entries that become subnormal, whose share of any block mean with a huge entry is
    below rounding) and the values multiplied back.
    """
    finite = torch.where(torch.isfinite(y), y, 0.0).abs().amax(-1, keepdim=True).to(torch.float64)
    limit = torch.finfo(y.dtype).max / (4.0 * max(y.shape[-1], 1))
    e = torch.ceil(torch.log2(finite / limit)).clamp(min=0.0)
    return torch.exp2(e).to(y.dtype)


@torch.library.custom_op("softtopk::isotonic_fwd", mutates_args=())
def isotonic_fwd(
    y: Tensor, w: Tensor | None, kl: bool, solver: int, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decreasing isotonic regression of rows (B, n): (v, bid, aux, converged, iterations).

    Rows with a non-finite entry (in y or w) get v = NaN.
    """
    route = {code: name for name, code in ROUTES.items()}[solver]
    loss = "kl" if kl else "l2"
    B, n = y.shape
    if B == 0 or n == 0:
        empty = torch.zeros(B, dtype=torch.int64, device=y.device)
        bid = torch.zeros_like(y, dtype=torch.int64)
        return torch.empty_like(y), bid, torch.empty_like(y), empty.bool(), empty
    scale = _overflow_scale(y) if loss == "l2" else None
    ys = y if scale is None else y / scale
    v, bid, aux, converged, iterations = solve_rows(ys.contiguous(), w, loss, route, max_iter, tol)
    if scale is not None:
        v = v * scale.to(v.dtype)
    bad = ~torch.isfinite(y).all(-1)
    if w is not None:
        bad = bad | ~torch.isfinite(w).all(-1)
    v = torch.where(bad.unsqueeze(-1), math.nan, v.to(y.dtype))
    return v, bid.to(torch.int64), aux.to(y.dtype), converged.to(torch.bool), iterations.to(torch.int64)


@isotonic_fwd.register_fake
def _(y, w, kl, solver, max_iter, tol):  # noqa: ANN001
    B = y.shape[0]
    return (
        torch.empty_like(y),
        torch.empty_like(y, dtype=torch.int64),
        torch.empty_like(y),
        y.new_empty((B,), dtype=torch.bool),
        y.new_empty((B,), dtype=torch.int64),
    )


@isotonic_fwd.register_vmap
def _(info, in_dims, y, w, kl, solver, max_iter, tol):  # noqa: ANN001
    size = info.batch_size

    def flat(a, d):  # noqa: ANN001
        a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand(size, *a.shape)
        return a.reshape(size * a.shape[1], a.shape[2]).contiguous()

    ys = flat(y, in_dims[0])
    ws = None if w is None else flat(w, in_dims[1])
    outs = isotonic_fwd(ys, ws, kl, solver, max_iter, tol)
    shaped = tuple(o.reshape(size, -1, *o.shape[1:]) for o in outs)
    return shaped, (0, 0, 0, 0, 0)


def _block_statistics(
    y: Tensor, w: Tensor | None, v: Tensor, bid: Tensor, loss: str
) -> tuple[Tensor, Tensor]:
    """Per position: (W_B, W_B) for L2 from the weights; (p, q) softmax weights for KL.

    Computed from the inputs in tensor ops, so a backward built on them can be
    differentiated again.
    """
    if loss == "l2":
        ones = torch.ones_like(y) if w is None else w
        weight = segment_sum(ones, bid).gather(-1, bid)
        return weight, weight
    lw = torch.zeros_like(y) if w is None else w
    p = torch.exp(y + lw - segment_logsumexp(y + lw, bid).gather(-1, bid))
    q = torch.exp(lw - segment_logsumexp(lw, bid).gather(-1, bid))
    return p, q


class CompiledIsotonicRows(torch.autograd.Function):
    """Decreasing isotonic regression of validated rows (B, n) in the compute dtype.

    The backward is the block formula in the module docstring, on the solver's
    partition, written in tensor ops on the inputs and the output, so it is
    differentiable again (second derivatives: zero in y for L2, the block softmax's for
    KL). This is the class torch.compile traces; :class:`IsotonicRows` adds forward mode.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(y: Tensor, w: Tensor | None, loss: str, solver: str, max_iter: int, tol: float):  # type: ignore[override]
        v, bid, _, converged, iterations = torch.ops.softtopk.isotonic_fwd(
            y, w, loss == "kl", ROUTES[solver], max_iter, tol
        )
        return v, bid, converged, iterations

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        y, w, loss, *_ = inputs
        v, bid, converged, iterations = output
        ctx.mark_non_differentiable(bid, converged, iterations)
        ctx.loss, ctx.has_w = loss, w is not None
        saved = (y, w if w is not None else y.new_empty(0), v, bid)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx: Any, grad_v: Tensor, *unused: Tensor):  # type: ignore[override]
        y, w, v, bid = ctx.saved_tensors
        w = w if ctx.has_w else None
        total = segment_sum(grad_v, bid).gather(-1, bid)
        first, second = _block_statistics(y, w, v, bid, ctx.loss)
        grad_y = grad_w = None
        if ctx.loss == "l2":
            share = total / first
            if ctx.needs_input_grad[0]:
                grad_y = share if w is None else w * share
            if w is not None and ctx.needs_input_grad[1]:
                grad_w = (y - v) * share
        else:
            if ctx.needs_input_grad[0]:
                grad_y = first * total
            if w is not None and ctx.needs_input_grad[1]:
                grad_w = (first - second) * total
        return grad_y, grad_w, None, None, None, None


class IsotonicRows(CompiledIsotonicRows):
    """:class:`CompiledIsotonicRows` with forward mode (the same block formulas)."""

    @staticmethod
    def jvp(ctx: Any, dy: Tensor | None, dw: Tensor | None, *unused: Any):  # type: ignore[override]
        y, w, v, bid = ctx.saved_tensors
        w = w if ctx.has_w else None
        dy = torch.zeros_like(y) if dy is None else dy
        first, second = _block_statistics(y, w, v, bid, ctx.loss)
        if ctx.loss == "l2":
            num = dy if w is None else w * dy
            if w is not None and dw is not None:
                num = num + dw * (y - v)
            dv = segment_sum(num, bid).gather(-1, bid) / first
        else:
            num = first * dy
            if w is not None and dw is not None:
                num = num + (first - second) * dw
            dv = segment_sum(num, bid).gather(-1, bid)
        return dv, None, None, None


def _nested_forward_rows(
    y: Tensor, w: Tensor | None, loss: str, route: str, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`IsotonicRows` under nested forward mode (``jacfwd(jacfwd(f))``).

    torch.func does not run an outer forward-mode transform through an autograd.Function's
    jvp (see :func:`softtopk._checks.forward_levels`), so the block values are written in
    tensor ops on the solver's partition: v_B = sum_B w y / sum_B w (L2, computed on
    rows scaled into range) or LSE_B(y + lw) - LSE_B(lw) (KL). The partition is locally
    constant, so their derivatives are exact to every order; the values are the solver's.
    """
    wd = None if w is None else w.detach()
    v0, bid, _, converged, iterations = torch.ops.softtopk.isotonic_fwd(
        y.detach(), wd, loss == "kl", ROUTES[route], max_iter, tol
    )
    if loss == "l2":
        scale = _overflow_scale(y.detach())
        ys = y / scale
        weight = torch.ones_like(y) if w is None else w
        blocks = segment_sum(weight * ys, bid) / segment_sum(weight, bid)
        values = blocks.gather(-1, bid) * scale
    else:
        lw = torch.zeros_like(y) if w is None else w
        values = (segment_logsumexp(y + lw, bid) - segment_logsumexp(lw, bid)).gather(-1, bid)
    return v0 + (values - values.detach()).to(v0.dtype), bid, converged, iterations


def isotonic_rows(
    y: Tensor,
    w: Tensor | None,
    loss: str = "l2",
    solver: str = "auto",
    max_iter: int = 10_000,
    tol: float = 1e-6,
    warn: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """Differentiable decreasing isotonic regression of rows (B, n); w = weights or log-weights.

    Returns (v, bid, converged, iterations, route). Warns (UserWarning) when Dykstra did
    not certify some rows and ``warn`` is set.
    """
    route = resolve_solver(solver, loss)
    if not torch.compiler.is_compiling() and forward_levels() >= 2:
        v, bid, converged, iterations = _nested_forward_rows(y, w, loss, route, max_iter, tol)
    else:
        fn = CompiledIsotonicRows if torch.compiler.is_compiling() else IsotonicRows
        v, bid, converged, iterations = fn.apply(y, w, loss, route, max_iter, tol)
    if warn and route == "dykstra" and may_sync(converged) and not bool(converged.all()):
        missing = int((~converged).sum())
        warnings.warn(
            f"isotonic regression: Dykstra did not reach a certified solution on {missing} of "
            f"{converged.numel()} rows within max_iter={max_iter} iterations; those rows hold the "
            "last iterate. Raise max_iter, or use solver='pav' (exact).",
            UserWarning,
            stacklevel=3,
        )
    if route == "pav" and _backend.route(y) != "cpu":
        route = "pav-torch"
    return v, bid, converged, iterations, route


def check_int_at_least(value: object, name: str, low: int) -> int:
    value = check_int(value, name)
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value!r}")
    return value


def check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a number, got {type(tol).__name__} {tol!r}")
    if not (0.0 <= float(tol) < 1.0):
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    return float(tol)


def isotonic_regression(
    y: Tensor,
    weights: Tensor | None = None,
    *,
    dim: int = -1,
    increasing: bool = True,
    loss: str = "l2",
    solver: str = "auto",
    max_iter: int = 10_000,
    tol: float = 1e-6,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, IsotonicInfo]:
    r"""Isotonic regression along ``dim``, batched over every other dimension, differentiable.

    .. math::

        v^\star = \arg\min_{v_1 \le v_2 \le \dots \le v_n} \sum_i w_i\, \ell(y_i, v_i),
        \qquad \ell_{\mathrm{l2}} = \tfrac12 (v - y)^2,\quad
        \ell_{\mathrm{kl}} = e^{y - v} - (y - v) - 1

    (``increasing=False`` reverses the order constraint). The solution is constant on
    blocks; a block's value is its weighted mean (L2) or
    :math:`\log\sum_B w e^{y} - \log\sum_B w` (KL, Blondel et al. 2020). L2 equals
    ``scipy.optimize.isotonic_regression``. The backward is the closed-form block Jacobian
    taken from the solver's own partition (O(n)): for L2, dv_i/dy_j = w_j / sum_B w when
    i and j share a block B, else 0; for KL, the block softmax of y + log w. Entries
    pooled only when they strictly violate the order, so exactly tied but unpooled entries
    keep their own derivative.

    Args:
        y: targets, any shape, floating dtype (float16/bfloat16 are solved in float32).
        weights: positive weights broadcastable to y, or None (all 1). Differentiable.
        dim: the dimension along which the fit is monotone.
        increasing: fit a non-decreasing (True) or non-increasing (False) sequence.
        loss: ``"l2"`` or ``"kl"``.
        solver: ``"auto"`` or ``"pav"`` (exact Pool Adjacent Violators: a compiled
            sequential pass per row on CPU, rounds of tensor ops on other devices) or
            ``"dykstra"`` (L2 only: alternating odd/even pair projections in tensor ops;
            the answer is certified optimal, and then exact, or reported as not
            converged).
        max_iter: Dykstra only: the most iterations (one odd and one even projection each).
            Dykstra needs about 2 B^2 of them for a pooled block of B entries.
        tol: Dykstra only: adjacent entries of the iterate closer than ``tol * max|y|`` are
            proposed as pooled (where that fails, those closer than ``tol`` times their own
            magnitude); every proposal is checked by the certificate.
        return_info: also return an :class:`IsotonicInfo` (convergence, iterations,
            blocks). Without it, a Dykstra run that leaves rows uncertified warns
            (UserWarning).

    Returns:
        The fit, with the shape and dtype of y (and the info if asked). Rows with a NaN or
        infinite entry (in y or the weights) are NaN.
        The backward sums the cotangent over each pooled block in the dtype of y: for
        float32 (or half) input, a cotangent whose block sums exceed that dtype's range
        gives infinite gradients.

    Example:
        >>> import torch, softtopk
        >>> y = torch.tensor([1.0, 3.0, 2.0, 4.0, 3.5])
        >>> softtopk.isotonic_regression(y)
        tensor([1.0000, 2.5000, 2.5000, 3.7500, 3.7500])
        >>> softtopk.isotonic_regression(y, increasing=False)
        tensor([2.7000, 2.7000, 2.7000, 2.7000, 2.7000])

    References:
        Best and Chakravarti, "Active set algorithms for isotonic regression", 1990 (PAV);
        Blondel, Teboul, Berthet, Djolonga, "Fast Differentiable Sorting and Ranking",
        ICML 2020 (KL); Sander, Puigcerver, Djolonga, Peyré, Blondel, "Fast,
        Differentiable and Sparse Top-k", ICML 2023 (Dykstra).
    """
    y = check_tensor(y, "y")
    d = check_dim(dim, y.dim())
    check_bool(increasing, "increasing")
    loss = check_choice(loss, "loss", LOSSES)
    solver = check_choice(solver, "solver", SOLVERS)
    max_iter = check_int_at_least(max_iter, "max_iter", 0)
    tol = check_tol(tol)
    cd = compute_dtype(y.dtype)
    rows, restore = to_rows(y, d)
    rows = rows.to(cd)
    w_rows = None
    if weights is not None:
        weights = check_tensor(weights, "weights")
        try:
            wb = torch.broadcast_to(weights, y.shape)
        except RuntimeError:
            raise ValueError(
                f"weights must broadcast to the shape {tuple(y.shape)} of y, got {tuple(weights.shape)}"
            ) from None
        if wb.numel() > 0 and may_sync(wb) and bool((wb.detach() <= 0).any()):
            raise ValueError(f"weights must be positive, got a minimum of {wb.detach().min().item()!r}")
        w_rows, _ = to_rows(wb, d)
        w_rows = w_rows.to(device=rows.device, dtype=cd)
        if loss == "kl":
            w_rows = torch.log(w_rows)  # the KL kernel takes log-weights
    B, n = rows.shape
    if rows.numel() == 0:
        out = empty_result(y)
        if not return_info:
            return out
        empty = torch.zeros(y.shape[:d] + y.shape[d + 1 :], dtype=torch.int64, device=y.device)
        return out, IsotonicInfo(solver, empty.bool() | True, empty, torch.zeros_like(y, dtype=torch.int64))
    if increasing:
        rows = rows.flip(-1)
        w_rows = None if w_rows is None else w_rows.flip(-1)
    v, bid, converged, iterations, route = isotonic_rows(
        rows, w_rows, loss, solver, max_iter, tol, warn=not return_info
    )
    if increasing:
        v = v.flip(-1)
        bid = bid.flip(-1)
        bid = bid[:, :1] - bid
    out = restore(v).to(y.dtype)
    if not return_info:
        return out
    batch_shape = y.shape[:d] + y.shape[d + 1 :]
    info = IsotonicInfo(
        route,
        converged.reshape(batch_shape),
        iterations.reshape(batch_shape),
        restore(bid),
    )
    return out, info
