"""Sparse soft top-k in magnitude (Sander et al. 2023): a firm threshold of |x|."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import (
    check_dim,
    check_p,
    check_positive,
    check_tensor,
    compute_dtype,
    is_tracing,
    prepare_k,
    scatter_rows,
    to_rows,
)
from ..threshold._solver import SHORT_ROW, estimate_support


def sorted_mag_tau(s: Tensor, k: Tensor, l: float) -> Tensor:
    """Exact threshold of the p = 2 magnitude operator on rows sorted in descending order.

    Solves h(tau) = sum_{i <= k} min(s_i - (1+l) tau, 0) + sum_{i > k} max(s_i - tau, 0) = 0,
    a continuous, non-increasing, piecewise-linear equation with breakpoints s_i/(1+l) and
    s_i, by evaluating h at every breakpoint with prefix sums and solving the piece that
    crosses zero in closed form.

    Args:
        s: (B, m) magnitudes, finite, sorted in descending order.
        k: (B,) integer budgets in [1, m - 1] (as floats).
        l: the regularisation strength (dimensionless).
    """
    w = 1.0 + l
    asc = -s
    prefix = torch.nn.functional.pad(torch.cumsum(s, -1), (1, 0))
    kk = k.long().unsqueeze(-1)

    def pieces(tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Top-k entries below (1+l) tau are a suffix of the top part starting at p';
        # entries after rank k above tau are a prefix of the rest ending at q'.
        p_ = torch.searchsorted(asc, -w * tau, right=True).minimum(kk)
        q_ = torch.searchsorted(asc, -tau, right=False).maximum(kk)
        sums = prefix.gather(-1, q_) - prefix.gather(-1, p_)
        slope = w * (kk - p_).to(s.dtype) + (q_ - kk).to(s.dtype)
        return p_, q_, sums, slope

    breaks = torch.cat([s / w, s], -1).sort(-1).values
    _, _, sums, slope = pieces(breaks)
    h = sums - slope * breaks
    j = ((h >= 0).sum(-1, keepdim=True) - 1).clamp(0, breaks.shape[-1] - 2)
    left = breaks.gather(-1, j)
    mid = 0.5 * (left + breaks.gather(-1, j + 1))
    p_, q_, _, slope = pieces(mid)
    # Sum the pooled entries directly: a difference of prefix sums loses digits.
    position = torch.arange(s.shape[-1], device=s.device)
    pooled = (position >= p_) & (position < q_)
    sums = torch.where(pooled, s, 0.0).sum(-1, keepdim=True)
    tau = torch.where(slope > 0, sums / slope.clamp(min=1e-30), left)
    return tau.squeeze(-1)


def _mag_candidates(x: Tensor, k: Tensor, l: float, K: int) -> tuple[Tensor, ...]:
    """Firm threshold on the K largest |x| of each row.

    Returns, on the candidates (B, K): indices, outputs (debiased), the diagonal of the
    Jacobian in s, the band indicator times c = (1+l)/l, the sign of x; per row (B,): the
    band weight W = sum_B (1 + l [rank <= k]), a flag of rows without a finite answer and
    a flag of rows whose candidates were not enough.
    """
    n = x.shape[-1]
    w = 1.0 + l
    c = w / l
    vals, idx = torch.topk(x.abs(), K, dim=-1, sorted=True)
    # The candidates are few: work in float64, so that c (s - tau) keeps float32 accuracy.
    f64 = torch.float64
    vals, k, x_c = vals.to(f64), k.to(f64), x.gather(-1, idx).to(f64)
    finite = torch.isfinite(vals)
    big = torch.where(finite, vals, 0.0).amax(-1, keepdim=True) * (2.0 * w) + 1.0
    s = torch.where(finite, vals, big)  # +inf magnitudes: larger than all, and saturated
    kk = k.unsqueeze(-1)
    edge = (k <= 0) | (k >= n)
    tau = sorted_mag_tau(s, torch.where(edge, 1.0, k), l).unsqueeze(-1)
    tau = torch.where(k.unsqueeze(-1) >= n, -1.0, tau)  # k = n: everything saturated
    tau = torch.where(k.unsqueeze(-1) <= 0, big, tau)  # k = 0: nothing kept
    band = (s > tau) & (s < w * tau)
    saturated = s >= w * tau
    psi = torch.where(saturated, s, torch.where(band, c * (s - tau), 0.0))
    sign = torch.sign(x_c)
    y = torch.where(finite, sign * psi + 0.0, x_c)  # + 0.0 turns -0.0 into 0.0
    rank = torch.arange(K, device=x.device, dtype=f64)
    weight = (band * torch.where(rank < kk, w, 1.0)).sum(-1)
    diag = c * band + saturated.to(f64)
    n_inf = (~finite).sum(-1)
    # Rows with NaN, or with more infinite entries than k, give NaN (no finite answer).
    bad = torch.isnan(vals[:, 0]) | (n_inf > k)
    failed = (vals[:, -1] > tau.squeeze(-1)) | (n_inf == K) if K < n else torch.zeros_like(bad)
    dt = x.dtype
    return idx, y.to(dt), diag.to(dt), (c * band).to(dt), sign.to(dt), weight.to(dt), bad, failed & ~bad


class _TopKMag(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: Tensor, l: float, scale: float) -> tuple[Tensor, ...]:  # type: ignore[override]
        B, n = x.shape
        if is_tracing() or n <= SHORT_ROW:
            K = n
        else:
            k_max = float(k.amax().item())
            K = estimate_support(x.abs(), max(k_max, 1.0), lambda kth: kth / (1.0 + l))
            K = max(K, min(n, int(k_max) + 1))
        idx, yc, diag, bandc, sign, weight, bad, failed = _mag_candidates(x, k, l, K)
        if K < n and not is_tracing() and bool(failed.any()):
            # Too few candidates on some rows: redo the whole batch with a bigger K.
            idx, yc, diag, bandc, sign, weight, bad, failed = _mag_candidates(x, k, l, n)
        y = scatter_rows(x, idx, yc * scale)
        y = torch.where(bad.unsqueeze(-1), math.nan, y)
        diag = torch.where(bad.unsqueeze(-1), math.nan, diag)
        return y, idx, sign, diag, bandc, weight

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, idx, sign, diag, bandc, weight = output
        ctx.mark_non_differentiable(idx, sign, diag, bandc, weight)
        ctx.save_for_backward(idx, sign, diag, bandc, weight)
        ctx.scale = inputs[3]
        ctx.c = (1.0 + inputs[2]) / inputs[2]

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # In s = |x|: J = diag(d) - c^2 [band] [band]^T / (c W), with c = (1+l)/l, because
        # psi_i = c (s_i - tau) on the band and d tau / d s_j = 1/W for j on the band.
        idx, sign, diag, bandc, weight = ctx.saved_tensors
        v = sign * grad_y.gather(-1, idx)
        coupling = (bandc * v).sum(-1) / (ctx.c * torch.where(weight > 0, weight, 1.0))
        grad_s = diag * v - bandc * coupling.unsqueeze(-1)
        grad_x = scatter_rows(grad_y, idx, sign * grad_s * ctx.scale)
        return grad_x, None, None, None


def topk_mag(
    x: Tensor,
    k: int | Tensor,
    *,
    dim: int = -1,
    temperature: float = 0.1,
    p: float = 2.0,
    debias: bool = True,
) -> Tensor:
    r"""Sparse soft top-k in magnitude: keeps the k largest |x| with a smooth transition.

    The hard operator is ``x * topk_mask(|x|)``. Its smoothing (Sander et al. 2023, p = 2)
    is a firm threshold of s = |x| with one scalar tau per row:

    .. math::

        \psi(s) = \begin{cases}
            s & s \ge (1 + l)\tau \\
            \frac{1+l}{l}(s - \tau) & \tau < s < (1 + l)\tau \\
            0 & s \le \tau
        \end{cases},\qquad y = \operatorname{sign}(x)\,\psi(|x|),

    where tau solves
    :math:`\sum_{\text{rank}\le k}\min(s_i - (1+l)\tau, 0) + \sum_{\text{rank}>k}\max(s_i - \tau, 0) = 0`
    (found by one selection of the largest |x|, no sort of the row). This equals the
    reference's sort + weighted isotonic regression output. The result is exactly the hard
    operator when |x|_(k) >= (1 + l) |x|_(k+1), and at most k + (entries between tau and
    (1+l) tau) entries are non-zero.

    ``debias=True`` (the default, as in the reference code) returns psi: kept entries keep
    their value. ``debias=False`` returns psi / (1 + l), the gradient of the smoothed
    function :math:`f_l = (f^* + \tfrac{l}{2}\|\cdot\|^2)^*` with
    :math:`f(x) = \tfrac12\sum_{i\le k}|x|_{[i]}^2`.

    Args:
        x: input of any shape, floating dtype.
        k: number of entries kept along ``dim``: an int in [0, n] or an integer-valued
            tensor of per-row budgets (batch shape of x).
        dim: the dimension to select along.
        temperature: Sander et al.'s ``l`` > 0, dimensionless here: the transition band
            is (tau, (1 + l) tau).
        p: regulariser exponent; only p = 2 is implemented for the magnitude operator.
        debias: return psi (True) or psi / (1 + l) (False).

    Returns:
        Tensor of the same shape and dtype as x. Rows containing NaN, or more than k
        infinite entries, are NaN; up to k infinite entries are kept as they are.

    Example:
        >>> import torch, softtopk
        >>> softtopk.topk_mag(torch.tensor([-5.0, -2.0, 3.0, 1.0]), 2, temperature=0.01)
        tensor([-5.,  0.,  3.,  0.])

    Reference:
        Sander, Puigcerver, Djolonga, Peyré, Blondel. "Fast, Differentiable and Sparse
        Top-k: a Convex Analysis Perspective", ICML 2023.
    """
    x = check_tensor(x)
    d = check_dim(dim, x.dim())
    l = check_positive(temperature, "temperature")
    p = check_p(p)
    if p != 2.0:
        raise ValueError(f"topk_mag implements p = 2 only, got p={p!r}")
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be a bool, got {type(debias).__name__} {debias!r}")
    cd = compute_dtype(x.dtype)
    rows, restore = to_rows(x, d)
    kvec = prepare_k(k, x, d, rows.shape[0], cd)
    if isinstance(k, Tensor) and k.requires_grad:
        raise ValueError("topk_mag is not differentiable in k; pass k without requires_grad")
    if not is_tracing() and kvec.numel() > 0 and bool((kvec != kvec.round()).any()):
        raise ValueError(f"k must be integer-valued for topk_mag, got {k!r}")
    if rows.numel() == 0:
        return torch.zeros_like(x)
    y = _TopKMag.apply(rows.to(cd), kvec, l, 1.0 if debias else 1.0 / (1.0 + l))[0]
    return restore(y).to(x.dtype)
