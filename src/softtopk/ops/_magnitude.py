"""Sparse soft top-k in magnitude (Sander et al. 2023): a firm threshold of |x|."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _backend, _buffers
from .._checks import (
    check_bool,
    check_p,
    check_positive,
    has_values,
    may_sync,
    refuse_forward_mode,
    scatter_rows,
)
from .._roots import newton
from .._rows import empty_result, rowwise
from ._topk import lowest_index_topk

#: Rows up to this length are solved on all their entries.
SHORT_ROW = 256


def estimate_support(x: Tensor, order: float, lower) -> int:  # noqa: ANN001
    """How many of the largest entries of each row a sparse output can touch.

    The support lies above ``lower(x_(order))``, a bound computed from the ``order``-th
    largest entry. On rows longer than 4096 entries the order statistic and the count
    above the bound are estimated on a strided subsample of about 4096 entries, with a
    margin; on shorter rows the guess is 1.5 times the order plus 4. Either way the guess
    only decides how many candidates to select: the result is checked afterwards and
    rows with too few candidates are solved again.
    """
    n = x.shape[-1]
    if n <= 4096:
        return min(n, math.ceil(1.5 * order) + 4)
    stride = n // 4096
    sub = x[:, ::stride]
    ratio = n / sub.shape[-1]
    j = order / ratio
    j = int(min(sub.shape[-1], math.ceil(j + math.sqrt(j) + 1.0)))
    bound = lower(torch.topk(sub, j, dim=-1).values[:, -1:])
    count = int((sub > bound).sum(-1).amax().item())
    return int(min(n, math.ceil(1.1 * ratio * count + 16.0)))


# Notation (Sander et al. 2023, Sec. 4, p-norm regulariser): q = p/(p-1) and r = q - 1 =
# 1/(p-1), so r = 1 for p = 2 and r = 3 for p = 4/3. With s = |x| sorted, w = (1^k, 0^{n-k})
# and v* the isotonic solution of the magnitude problem, every pooled entry shares one
# value tau, and the output is z^r (plain) or z^r + l z (debiased) with z = (s - tau)/l.


def singleton_gap(s: Tensor, l: float, r: int) -> Tensor:
    """u = s - v for an unpooled top entry: the root of u^r + l^r u = l^r s (u >= 0).

    For r = 1 this is u = l s/(1 + l); for r = 3 it is a depressed cubic, solved by
    Cardano's formula (on u / (l^3 s)^(1/3) where l^3 s > 1) and polished by two Newton steps.
    """
    if r == 1:
        return l * s / (1.0 + l)
    a, b = l**3, l**3 * s
    cbrt = lambda v: torch.sign(v) * v.abs().pow(1.0 / 3.0)  # noqa: E731
    # Beyond b = 1 the cubic is solved for w = u / b^(1/3): w^3 + (a / b^(2/3)) w = 1, whose
    # coefficients stay in range ((b / 2)^2 overflows once abs(x) l^3 nears 1e154).
    scale = torch.where(b > 1.0, cbrt(b), 1.0)
    a = a / (scale * scale)
    b = torch.where(b > 1.0, 1.0, b)
    root = torch.sqrt((0.5 * b) ** 2 + (a / 3.0) ** 3)
    u = cbrt(0.5 * b + root) + cbrt(0.5 * b - root)
    for _ in range(2):
        u = u - (u**3 + a * u - b) / (3.0 * u * u + a)
    return u * scale


def _mag_evaluator(below: Tensor, top: Tensor, b: Tensor, l: float, r: int):
    """-h and dh/dw of the pooled block's equation at tau = b - w.

    h(tau) = sum_{top, pooled} ((s - tau)^r - l^r tau) + sum_{rest, s > tau} (s - tau)^r,
    a top entry being pooled when its own value (s - u) falls below tau, that is when
    (s - tau)^r < l^r tau. h is continuous and decreasing in tau; for r = 1 it is
    piecewise linear and the Newton iteration ends on the exact root. The unknown is the
    offset w = b - tau from the (k+1)-th magnitude b, and ``below`` = s - b, so each gap
    s - tau = below + w keeps the digits that s - tau from a rounded tau would lose.
    """
    lr = l**r

    def evaluate(w: Tensor) -> tuple[Tensor, Tensor]:
        gap = (below + w.unsqueeze(-1)).clamp(min=0.0)
        tau = (b - w).unsqueeze(-1)
        power = gap if r == 1 else gap**r
        slope = torch.ones_like(gap) if r == 1 else r * gap ** (r - 1)
        pooled = top & (power < lr * tau)
        band = ~top & (gap > 0)
        f = torch.where(pooled, power - lr * tau, 0.0) + torch.where(band, power, 0.0)
        d = torch.where(pooled, slope + lr, 0.0) + torch.where(band, slope, 0.0)
        return -f.sum(-1), d.sum(-1)

    return evaluate


def _mag_candidates(x: Tensor, k: Tensor, l: float, r: int, K: int) -> tuple[Tensor, ...]:
    """The magnitude operator on the K largest |x| of each row, in float64.

    Returns, on the candidates (B, K): indices, the debiased and plain outputs, the
    Jacobian's diagonal in s for both, the pooled block's indicator, the coupling vector
    right_j = dh/ds_j, the sign of x; per row (B,): the coupling weight W, the number of
    pooled top entries, a flag of rows without a finite answer and a flag of rows whose
    candidates were not enough. In s the Jacobian is diag(d) - left right^T / W with
    left = d on the block: on the block, y_i depends on s_j through tau.
    """
    n = x.shape[-1]
    vals, idx = lowest_index_topk(x.abs(), K)  # ties to the lowest index (eager), as the CPU kernel
    f64 = torch.float64
    vals, k, x_c = vals.to(f64), k.to(f64), x.gather(-1, idx).to(f64)
    finite = torch.isfinite(vals)
    big = torch.where(finite, vals, 0.0).amax(-1, keepdim=True) * (2.0 * (1.0 + l)) ** 3 + 1.0
    s = torch.where(finite, vals, big)  # +inf magnitudes: larger than all, never pooled
    rank = torch.arange(K, device=x.device, dtype=f64)
    top = rank < k.unsqueeze(-1)
    edge = (k <= 0) | (k >= n)
    # 1 <= kk <= K - 1 on regular rows; rows with k = 0 or k = n (edge) take any index.
    kk = torch.where(edge, 1.0, k).long().unsqueeze(-1).clamp(1, max(1, K - 1))
    a = s.gather(-1, kk - 1).squeeze(-1)
    b = s.gather(-1, kk.clamp(max=K - 1)).squeeze(-1)  # the (k+1)-th entry: h <= 0 above
    # tau lies in [b - span, b]: the k-th entry's own value a - u(a) is b - ((b - a) + u(a)),
    # and the root is >= 0 (h(0) >= 0, whatever the rounding)
    span = torch.minimum((b - a) + singleton_gap(a, l, r), b)
    hard = span <= 0  # no pooling: every tau in [b, a - u(a)] is a root
    skip = hard | edge
    span = torch.where(skip, 0.0, span)
    evaluate = _mag_evaluator(s - b.unsqueeze(-1), top, b, l, r)
    # the step tolerance scales with the bracket, which has the units of s
    scale = torch.where(skip, 1.0, span)
    zero = torch.zeros_like(span)
    w, _ = newton(evaluate, k, zero, span, 0.5 * span, skip, t=scale, m=K, value_dtype=f64)
    w = torch.where(skip, 0.0, w).unsqueeze(-1)
    b = torch.where(k >= n, -1.0, torch.where(k <= 0, big.squeeze(-1), b)).unsqueeze(-1)
    tau = b - w
    lr = l**r
    gap = ((s - b) + w).clamp(min=0.0)
    power = gap**r
    pooled = top & (power < lr * tau) & (gap > 0)
    block = pooled | (~top & (gap > 0))
    z = gap / l
    u = singleton_gap(s, l, r)
    kept = top & ~pooled & (gap > 0)  # unpooled top entries: their own value, s - u
    plain = torch.where(block, z**r, torch.where(kept, s - u, 0.0))
    debiased = torch.where(block, z**r + gap, torch.where(kept, s, 0.0))
    slope_block = r * z ** (r - 1) / l
    kept_slope = 1.0 / (1.0 + l) if r == 1 else 3.0 * u * u / (3.0 * u * u + lr)
    # infinite entries are returned as they are: slope 1 in both outputs
    # (a where of two Python floats is float32: the zeros are float64 tensors)
    diag_plain = torch.where(block, slope_block, torch.where(kept, kept_slope, torch.zeros_like(s)))
    diag_plain = torch.where(finite, diag_plain, 1.0)
    diag_debiased = torch.where(block, slope_block + 1.0, torch.where(kept, 1.0, 0.0))
    right = torch.where(block, r * gap ** (r - 1), 0.0)
    weight = right.sum(-1) + lr * pooled.sum(-1).to(f64)  # an int64 count times a float is float32
    sign = torch.sign(x_c)
    n_inf = (~finite).sum(-1)
    # Rows with NaN, or with more infinite entries than k, give NaN (no finite answer).
    bad = torch.isnan(vals[:, 0]) | (n_inf > k)
    failed = (vals[:, -1] > tau.squeeze(-1)) | (n_inf == K) if K < n else torch.zeros_like(bad)
    outputs = [
        torch.where(finite, sign * debiased + 0.0, x_c),  # + 0.0 turns -0.0 into 0.0
        torch.where(finite, sign * plain + 0.0, x_c),
        diag_debiased,
        diag_plain,
        block.to(f64),
        right,
        sign,
        weight,
        pooled.sum(-1).to(f64),
    ]
    # The outputs in x's dtype; the Jacobian's factors stay in float64: for p = 4/3 and a
    # small l its diagonal and coupling term nearly cancel (3 z^2 / l against a sum of as
    # large terms), and rounding them to float32 turned a gradient of 1/2 into 0.
    y_deb, y_plain = (o.to(x.dtype) for o in outputs[:2])
    return (idx, y_deb, y_plain, *outputs[2:], bad, failed & ~bad)


def _block_gradient(
    v: Tensor, diag: Tensor, block: Tensor, right: Tensor, weight: Tensor, n_pooled: Tensor, debias: bool
) -> Tensor:
    """grad_s = diag v - right (sum_block diag v) / W, without losing v's common part.

    On the block diag = right / l^r (+ 1 debiased) and W = sum_block right + l^r n_pooled,
    so for tied entries with equal cotangents the two terms agree to a relative n l^r / W,
    far below rounding at a small l or a large abs(x). The cotangents are therefore taken
    relative to the first block entry's, v = v_ref + u, and v_ref's share is formed
    exactly: diag_i - right_i (sum_block diag) / W = right_i n_pooled / W
    (+ 1 - right_i n_block / W debiased). The rounding error then scales with the spread
    of v over the block, not its size. Rows (B, K), per-row (B, 1); linear in v.
    """
    has = block.any(-1, keepdim=True)
    first = block.to(torch.uint8).argmax(-1, keepdim=True)
    v_ref = torch.where(has, v.gather(-1, first), 0.0)
    u = torch.where(block, v - v_ref, 0.0)
    w = torch.where(weight > 0, weight, 1.0)
    coupling = (diag * u).sum(-1, keepdim=True) / w
    share = right * n_pooled / w
    if debias:
        share = share + (1.0 - right * block.sum(-1, keepdim=True).to(share.dtype) / w)
    return torch.where(block, diag * u - right * coupling + v_ref * share, diag * v)


class _TopKMag(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: Tensor, l: float, r: int, debias: bool) -> tuple[Tensor, ...]:  # type: ignore[override]
        x, k = x.detach(), k.detach()
        B, n = x.shape
        if not may_sync(x) or n <= SHORT_ROW:
            K = n
        else:
            k_max = float(k.amax().item())

            def own_value(kth: Tensor) -> Tensor:  # support lies above the k-th entry's own value
                return kth - singleton_gap(kth, l, r)

            K = estimate_support(x.abs(), max(k_max, 1.0), own_value)
            K = max(K, min(n, int(k_max) + 1))
        out = _mag_candidates(x, k, l, r, K)
        if K < n and may_sync(x) and bool(out[-1].any()):
            out = _mag_candidates(x, k, l, r, n)  # too few candidates somewhere: whole rows
        idx, y_deb, y_plain, d_deb, d_plain, block, right, sign, weight, n_pooled, bad, _ = out
        y = scatter_rows(x, idx, y_deb if debias else y_plain)
        y = torch.where(bad.unsqueeze(-1), math.nan, y)
        diag = torch.where(bad.unsqueeze(-1), math.nan, d_deb if debias else d_plain)
        return y, idx, sign, diag, block, right, weight, n_pooled

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.r, ctx.debias = inputs[3], inputs[4]
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(inputs[0], *saved)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # In float64, on the cotangent scaled by a power of two near its row maximum: the
        # coupling sum of a cotangent near its dtype's limit would overflow (inf - inf).
        x, *saved = ctx.saved_tensors
        idx, sign, diag, block, right, weight, n_pooled = (
            t.to(torch.float64) if t.is_floating_point() else t for t in saved
        )
        v = sign * grad_y.gather(-1, idx).to(torch.float64)
        big = v.abs().amax(-1, keepdim=True) if v.shape[-1] else v.new_ones(v.shape[0], 1)
        ok = (big > 0) & torch.isfinite(big)
        scale = torch.where(
            ok, torch.exp2(torch.frexp(torch.where(ok, big, 1.0)).exponent.to(torch.float64) - 1.0), 1.0
        )
        v = v / scale
        per_row = weight.unsqueeze(-1), n_pooled.unsqueeze(-1)
        grad_s = _block_gradient(v, diag, block > 0, right, *per_row, ctx.debias) * scale
        grad_x = scatter_rows(grad_y, idx, (sign * grad_s).to(grad_y.dtype))
        nan_row = torch.isnan(diag[:, :1])  # a NaN row's gradient is NaN, as its value
        grad_x = torch.where(nan_row, math.nan, grad_x)
        if torch.is_grad_enabled() and ctx.r != 1:
            grad_x = _NoDoubleBackward.apply(grad_x, x, grad_y)
        return grad_x, None, None, None, None


class _TopKMagCPU(torch.autograd.Function):
    """The numba route of :class:`_TopKMag` for eager CPU calls.

    It saves x and four numbers per row (tau = b - w as b and w, the k-th magnitude, its
    ties in the top set); the backward rebuilds the Jacobian from them in two passes over
    the row.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Tensor, l: float, r: int, debias: bool) -> Tensor:  # type: ignore[override]
        cpu = _backend.kernels("ops._magnitude_cpu")
        xc = x.detach().contiguous().numpy()
        # outputs made in NumPy and shared with torch: a fresh torch allocation of a large
        # output pays its page faults on every call (see softtopk._buffers)
        y = _buffers.output(xc.shape, xc.dtype)
        info = np.empty((xc.shape[0], 4), dtype=np.float64)
        args = (xc, k.detach().contiguous().numpy(), float(l), int(r), bool(debias), y, info)
        if _backend.serial(xc.size):
            cpu.forward_serial(*args)
        else:
            with _backend.numba_threads():
                cpu.forward(*args, _backend.chunks())
        ctx.save_for_backward(x, torch.from_numpy(info))
        ctx.options = (float(l), int(r), bool(debias))
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, info = ctx.saved_tensors
        l, r, debias = ctx.options
        if torch.is_grad_enabled() and r == 1:
            return _mag_backward_tensors(x.detach(), info, grad_y, l, debias), None, None, None, None
        cpu = _backend.kernels("ops._magnitude_cpu")
        xc = x.detach().contiguous().numpy()
        gy = _buffers.contiguous(grad_y.detach().to(x.dtype).numpy())
        grad = _buffers.output(xc.shape, xc.dtype)  # in NumPy: see forward
        args = (xc, info.numpy(), l, r, debias, gy, grad)
        if _backend.serial(xc.size):
            cpu.backward_serial(*args)
        else:
            with _backend.numba_threads():
                cpu.backward(*args, _backend.chunks())
        grad_x = torch.from_numpy(grad)
        if torch.is_grad_enabled():
            grad_x = _NoDoubleBackward.apply(grad_x, x, grad_y)
        return grad_x, None, None, None, None


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a first-order gradient whose own derivative is refused with a clear error.

    topk_mag's Jacobian for p = 4/3 depends on x through tau; differentiating the backward
    (``create_graph=True``) raises instead of returning a second derivative without that
    term. First-order ``torch.func.grad``, which runs the backward in grad mode, is fine.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_x: Tensor, x: Tensor, grad_y: Tensor) -> Tensor:  # type: ignore[override]
        return grad_x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        raise RuntimeError(
            "topk_mag with p=4/3 has no double backward (create_graph=True): its Jacobian "
            "depends on x through tau; use p=2 (piecewise linear, exact to second order) "
            "or first-order gradients"
        )


def _mag_backward_tensors(x: Tensor, info: Tensor, grad_y: Tensor, l: float, debias: bool) -> Tensor:
    """The numba backward for p = 2 in tensor ops, linear in grad_y, for double backward.

    The Jacobian is piecewise constant in x, so differentiating this is exact.
    """
    f64 = torch.float64
    s = x.abs().to(f64)
    b, w, a, m = (info[:, j : j + 1] for j in range(4))
    tau = b - w
    finite = torch.isfinite(s)
    ties = (s == a) & finite
    top = finite & ((s > a) | (ties & (ties.cumsum(-1) <= m)))
    gap = (s - b) + w
    pooled = top & (gap > 0) & (gap < l * tau)
    block = (gap > 0) & finite & (pooled | ~top)
    kept = top & (gap > 0) & ~pooled
    kept_slope = torch.where(kept, 1.0 if debias else 1.0 / (1.0 + l), torch.zeros_like(s))  # float64
    d = torch.where(block, 1.0 / l + float(debias), kept_slope)
    right = block.to(f64)
    n_pooled = pooled.sum(-1, keepdim=True).to(f64)
    weight = right.sum(-1, keepdim=True) + l * n_pooled
    sign = torch.sign(x).to(f64)
    v = sign * grad_y.to(f64)
    grad_s = _block_gradient(v, d, block, right, weight, n_pooled, debias)
    grad_x = torch.where(finite, sign * grad_s, grad_y.to(f64))
    return torch.where(torch.isnan(b), math.nan, grad_x).to(x.dtype)


def topk_mag(
    x: Tensor,
    k: int | Tensor,
    dim: int = -1,
    *,
    temperature: float = 0.1,
    p: float = 2.0,
    debias: bool = True,
) -> Tensor:
    r"""Sparse soft top-k in magnitude: keeps the k largest abs(x) with a smooth transition.

    The hard operator is ``x * topk_mask(abs(x))``. Sander et al. (2023) smooth it with a
    p-norm regulariser; with s = abs(x) the result is a threshold of s with one scalar tau
    per row. For p = 2 it is a firm threshold:

    .. math::

        \psi(s) = \begin{cases}
            s & s \ge (1 + l)\tau \\
            \frac{1+l}{l}(s - \tau) & \tau < s < (1 + l)\tau \\
            0 & s \le \tau
        \end{cases},\qquad y = \operatorname{sign}(x)\,\psi(|x|),

    where tau solves
    :math:`\sum_{\text{rank}\le k}\min(s_i - (1+l)\tau, 0) + \sum_{\text{rank}>k}\max(s_i - \tau, 0) = 0`.
    For p = 4/3 (r = 1/(p-1) = 3) the pooled entries get z^3 + l z with z = (s - tau)/l,
    the other top-k entries keep s, and tau solves
    :math:`\sum_{i\le k}\min((s_i-\tau)_+^3 - l^3\tau, 0) + \sum_{i>k}(s_i - \tau)_+^3 = 0`
    (i the rank by magnitude).
    Either way tau is found by one selection of the largest abs(x) (no sort of the row) and
    an exact solve on those, and the output equals the reference's sort + (weighted)
    isotonic regression route. For p = 2 the result is exactly the hard operator when
    ``abs(x)_(k) >= (1 + l) abs(x)_(k+1)`` (sorted magnitudes).

    ``debias=True`` (the default, as in the reference code) returns what the reference
    returns: kept entries keep their value. ``debias=False`` returns the gradient of the
    smoothed function :math:`f_{l,p} = (f^* + \tfrac{l}{p}\|\cdot\|_p^p)^*` with
    :math:`f(x) = \tfrac12\sum_{i\le k}|x|_{[i]}^2`; for p = 2 that is psi / (1 + l).

    Args:
        x: input of any shape, floating dtype.
        k: number of entries kept along ``dim``: an int in [0, n] or an integer-valued
            tensor of per-row budgets (batch shape of x).
        dim: the dimension to select along.
        temperature: Sander et al.'s ``l`` > 0. For p = 2 it is dimensionless (the
            transition band is (tau, (1 + l) tau)); for p = 4/3 it has the units of x.
        p: regulariser exponent, 2 or 4/3.
        debias: return the reference's debiased output (True) or the gradient of the
            smoothed function (False).

    Returns:
        Tensor of the same shape and dtype as x. Rows containing NaN, or more than k
        infinite entries, are NaN; up to k infinite entries are kept as they are. Ties
        in abs(x) at the k-th place go to the lowest index on CPU (numba kernel) and as
        ``torch.topk`` orders them elsewhere. First derivatives are exact; the second
        derivative is exact for p = 2 (piecewise linear) and refused with a
        RuntimeError for p = 4/3 (``create_graph=True``).
        float64 input needs max abs(x) (2 (1 + temperature))^3 within the float64 range
        (a ValueError otherwise: rescale x and the temperature together, the operator is
        homogeneous in them).

    Example:
        >>> import torch, softtopk
        >>> softtopk.topk_mag(torch.tensor([-5.0, -2.0, 3.0, 1.0]), 2, temperature=0.01)
        tensor([-5.,  0.,  3.,  0.])

    Reference:
        Sander, Puigcerver, Djolonga, Peyré, Blondel. "Fast, Differentiable and Sparse
        Top-k: a Convex Analysis Perspective", ICML 2023.
    """
    rows = rowwise(x, k, dim, k_grad=False)
    l = check_positive(temperature, "temperature")
    p = check_p(p)
    if abs(p - 2.0) > 1e-12 and abs(p - 4.0 / 3.0) > 1e-12:
        raise ValueError(f"topk_mag implements p = 2 and p = 4/3, got p={p!r}")
    r = round(1.0 / (p - 1.0))
    check_bool(debias, "debias")
    kvec = rows.k
    if has_values(kvec) and kvec.numel() > 0 and bool((kvec != kvec.round()).any()):
        raise ValueError(f"k must be integer-valued for topk_mag, got {k!r}")
    if rows.x.numel() == 0:
        return empty_result(x)
    if rows.x.dtype == torch.float64 and may_sync(rows.x):
        # The float64 solve works with |x| (2 (1 + t))^3; beyond the float64 range its
        # results are not reliable, so such rows are refused rather than answered wrongly.
        a = rows.x.detach().abs()
        top = torch.where(torch.isfinite(a), a, 0.0).amax().item()
        if not math.isfinite(top * (2.0 * (1.0 + l)) ** 3):
            raise ValueError(
                f"topk_mag needs max |x| (2 (1 + temperature))^3 within the float64 range; got "
                f"max |x| = {top:g} with temperature={l:g} (rescale x and the temperature together)"
            )
    refuse_forward_mode("topk_mag")
    if may_sync(rows.x) and _backend.route(rows.x) == "cpu":
        y = _TopKMagCPU.apply(rows.x, kvec.to(torch.float64), l, r, debias)
    else:
        y = _TopKMag.apply(rows.x, kvec, l, r, debias)[0]
    return rows.restore(y)
