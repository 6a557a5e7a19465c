"""The threshold family in tensor ops: the reference route, for every device.

For a link G and rows ``v`` (B, m) it finds tau with

    f(tau) = sum_i G((v_i - tau) / t) - k = 0        (one equation per row)

by a safeguarded Newton iteration on whole rows (:func:`solve_dense`), or by the
O(n log n) route of the papers, a full sort and closed forms on cumulative sums
(:func:`solve_sort`, p = 2 and the Laplace link). f is continuous and non-increasing, so
the iteration converges from any bracket; for the piecewise-linear link (p = 2) a Newton
step on the right linear piece is the exact solution, so it ends exactly.

This route serves devices without a compiled kernel and is the oracle the kernels are
tested against. :func:`reference_forward` is what the custom op runs on it: it solves on
x / t in float64 (float32 where the device has no float64), so one code path serves a
temperature per row. Rows set by a rule (:mod:`softtopk._rows`) get the rule's values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._roots import Evaluator, newton
from .._rows import RowRules, classify, classify_counts, row_range
from .._rows import apply_rules as apply_row_rules
from ._links import Link


def _apply_rules(v: Tensor, y: Tensor, g: Tensor, k: Tensor, rules: RowRules) -> tuple[Tensor, Tensor]:
    """The rules' values on y, and zero slopes (NaN on NaN rows) on the ruled rows of g."""
    y = apply_row_rules(v, k, y, rules)
    regular = rules.regular.unsqueeze(-1)
    g = torch.where(regular, g, torch.where(rules.nan.unsqueeze(-1), math.nan, 0.0))
    return y, g


def snap_below(dtype: torch.dtype) -> float:
    """Entries of a sparse mask within 4 eps of zero are set to zero (see Link.evaluate)."""
    return 4.0 * torch.finfo(dtype).eps


def shifted(v: Tensor, tau: Tensor, t: float, out: Tensor | None = None) -> Tensor:
    """z = (v - tau)/t for a float64 threshold tau (B,), accurate for float32/16 rows.

    tau is split into tau_hi (rounded to the dtype of v) and the remainder tau_lo. Near
    the threshold v - tau_hi is exact (Sterbenz), so z keeps full relative precision
    where G is not saturated, instead of losing eps * |v| / t to the rounding of tau.
    With ``out`` the result is written there (no allocation: a fresh (B, n) buffer costs
    more than the arithmetic on CPU).
    """
    tau_hi = tau.to(v.dtype).unsqueeze(-1)
    if out is None:
        z = v - tau_hi
        if v.dtype != torch.float64:
            z = z - (tau - tau_hi.squeeze(-1).to(torch.float64)).to(v.dtype).unsqueeze(-1)
        return z / t
    torch.sub(v, tau_hi, out=out)
    if v.dtype != torch.float64:
        out.sub_((tau - tau_hi.squeeze(-1).to(torch.float64)).to(v.dtype).unsqueeze(-1))
    return out.div_(t)


def dense_evaluator(v: Tensor, k: Tensor, t: float, link: Link) -> tuple[Evaluator, Tensor]:
    """f and -f' by a few passes over whole rows, and the (B, n) buffer they reuse.

    The buffer can hold the final mask once the iteration is done.
    """
    k = k.to(torch.float64)
    buffer = torch.empty_like(v)

    def evaluate(tau: Tensor) -> tuple[Tensor, Tensor]:
        f, slope = link.sums(shifted(v, tau, t, out=buffer), k)
        return f, slope.to(torch.float64) / t

    return evaluate, buffer


def dense_bracket(v: Tensor, k: Tensor, t: float, link: Link) -> tuple[Tensor, Tensor, RowRules]:
    """Brackets tau on whole rows from their finite min and max, and classifies the rows."""
    vmin, vmax, nan, n_fin, n_pos = row_range(v)
    rules = classify_counts(k, v.shape[-1], n_fin, n_pos, nan)
    regular = rules.regular
    # Safe stand-ins on rows set by a rule keep the iteration free of inf and NaN.
    vmax = torch.where(regular, vmax, 0.0).to(torch.float64)
    vmin = torch.where(regular, vmin, 0.0).to(torch.float64)
    k, n_pos, n_fin = k.to(torch.float64), n_pos.to(torch.float64), n_fin.to(torch.float64)
    if link.sparse:
        # G((vmin - lo)/t) = 1 for every finite entry, G((vmax - hi)/t) = 0.
        return vmin - t, vmax, rules
    # n_fin G((vmin - lo)/t) = k - n_pos = n_fin G((vmax - hi)/t).
    q = torch.where(regular, (k - n_pos) / n_fin.clamp(min=1), 0.5)
    shift = t * link.inverse(q)
    return vmin - shift, vmax - shift, rules


def quantile_guess(v: Tensor, k: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """A starting point near x_(k): the matching order statistic of a strided subsample."""
    n = v.shape[-1]
    stride = max(1, n // 1024)
    sub = v[:, ::stride]
    j = (k * (sub.shape[-1] / n)).clamp(0, sub.shape[-1] - 1).long().unsqueeze(-1)
    guess = sub.sort(-1, descending=True).values.gather(-1, j).squeeze(-1).to(torch.float64)
    return torch.where(torch.isfinite(guess), guess, 0.5 * (lo + hi)).clamp(lo, hi)


def solve_dense(v: Tensor, k: Tensor, t: float, link: Link) -> tuple[Tensor, Tensor, Tensor]:
    """Whole-row safeguarded Newton. Returns tau, y and g, with the row rules applied."""
    lo, hi, rules = dense_bracket(v, k, t, link)
    tau0 = quantile_guess(v, k, lo, hi) if v.shape[-1] > 1024 else 0.5 * (lo + hi)
    evaluate, buffer = dense_evaluator(v, k, t, link)
    tau, _ = newton(evaluate, k, lo, hi, tau0, ~rules.regular, t=t, m=v.shape[-1], value_dtype=v.dtype)
    y, gp = link.evaluate(shifted(v, tau, t, out=buffer), in_place=True, snap=snap_below(v.dtype))
    y, g = _apply_rules(v, y, gp.div_(t), k, rules)
    return tau, y, g


# --------------------------------------------------------------- sorted rows (p = 2)


def finite_stand_ins(s: Tensor, gap: float) -> Tensor:
    """Replaces +inf / -inf (and NaN) by finite values ``gap`` beyond the finite range.

    With gap > t a +inf stand-in is saturated and a -inf stand-in inactive at every
    threshold of a regular row, so they contribute exactly 1 and 0 as the infinities do.
    """
    finite = torch.isfinite(s)
    vmax = torch.where(finite, s, -math.inf).amax(-1, keepdim=True)
    vmin = torch.where(finite, s, math.inf).amin(-1, keepdim=True)
    vmax = torch.where(torch.isfinite(vmax), vmax, 0.0)
    vmin = torch.where(torch.isfinite(vmin), vmin, 0.0)
    return torch.where(finite, s, torch.where(s == math.inf, vmax + gap, vmin - gap))


def sorted_clip_tau(s: Tensor, k: Tensor, t: float) -> Tensor:
    """Exact threshold of the p = 2 link on rows sorted in descending order.

    With prefix sums P of the sorted row, S(tau) = U + (P_L - P_U - (L - U) tau)/t, where
    U = #{s_i >= tau + t} and L = #{s_i > tau} come from binary searches, so each Newton
    step costs O(log m) per row; tau is bracketed by [s_(floor(k)+1) - t, s_(ceil(k))].
    Everything is computed in float64; the threshold is returned in float64.

    Args:
        s: (B, m) rows sorted in descending order (infinities allowed).
        k: (B,) budgets; regular rows only (0 < k < number of entries > -inf).
        t: temperature.
    """
    m = s.shape[-1]
    value_dtype = s.dtype
    s = finite_stand_ins(s.to(torch.float64), t + 1.0)
    k = k.to(torch.float64)
    asc = -s  # ascending, for searchsorted
    prefix = torch.nn.functional.pad(torch.cumsum(s, -1), (1, 0))

    def pieces(tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        upper = torch.searchsorted(asc, -(tau + t).unsqueeze(-1), right=True)
        lower = torch.searchsorted(asc, -tau.unsqueeze(-1), right=False)
        active_sum = (prefix.gather(-1, lower) - prefix.gather(-1, upper)).squeeze(-1)
        return upper.squeeze(-1).to(s.dtype), lower.squeeze(-1).to(s.dtype), active_sum

    def evaluate(tau: Tensor) -> tuple[Tensor, Tensor]:
        upper, lower, active_sum = pieces(tau)
        return upper + (active_sum - (lower - upper) * tau) / t - k, (lower - upper) / t

    below = torch.floor(k).long().clamp(max=m - 1).unsqueeze(-1)
    above = (torch.ceil(k).long() - 1).clamp(0, m - 1).unsqueeze(-1)
    lo = s.gather(-1, below).squeeze(-1) - t
    hi = s.gather(-1, above).squeeze(-1)
    done = torch.zeros_like(k, dtype=torch.bool)
    tau, _ = newton(evaluate, k, lo, hi, 0.5 * (lo + hi), done, t=t, m=m, value_dtype=value_dtype)
    # Finish exactly on the piece the iteration ended on, summing the active entries
    # directly (a difference of prefix sums loses digits to cancellation).
    upper, lower, _ = pieces(tau)
    position = torch.arange(m, device=s.device, dtype=s.dtype)
    active = (position >= upper.unsqueeze(-1)) & (position < lower.unsqueeze(-1))
    active_sum = torch.where(active, s, 0.0).sum(-1)
    exact = (active_sum - t * (k - upper)) / (lower - upper).clamp(min=1)
    return torch.where(lower > upper, exact, tau)


def sorted_laplace_tau(s: Tensor, k: Tensor, t: float) -> Tensor:
    """Exact threshold of the Laplace link (LapSum) on rows sorted in ascending order.

    With u = s/t and beta = tau/t between u_j and u_{j+1}, entries i <= j contribute
    exp(u_i - beta)/2 and the others 1 - exp(beta - u_i)/2, so S = k is a quadratic in
    exp(beta). Log-sum-exp scans give S at every u_j and the coefficients of every piece
    (Struski et al. 2025); the root is taken in a cancellation-free form.

    Args:
        s: (B, m) rows sorted in ascending order, all finite.
        k: (B,) budgets in (0, m).
        t: temperature.

    Returns:
        tau (B,) in float64.
    """
    u = s.to(torch.float64) / t
    k = k.to(torch.float64)
    m = u.shape[-1]
    lse_head = torch.logcumsumexp(u, -1)  # log sum_{i <= j} e^{u_i}
    lse_tail = torch.logcumsumexp((-u).flip(-1), -1).flip(-1)  # log sum_{i >= j} e^{-u_i}
    lse_tail = torch.nn.functional.pad(lse_tail[..., 1:], (0, 1), value=-math.inf)  # i > j
    j_idx = torch.arange(m, device=s.device, dtype=u.dtype)
    # S at beta = u_j.
    at_break = 0.5 * torch.exp(lse_head - u) + (m - 1 - j_idx) - 0.5 * torch.exp(u + lse_tail)
    # Piece j in [-1, m-1] holds beta in [u_j, u_{j+1}]; S(u_j) >= k > S(u_{j+1}).
    j = (at_break >= k.unsqueeze(-1)).sum(-1, keepdim=True) - 1
    head = torch.where(j >= 0, lse_head.gather(-1, j.clamp(min=0)), -math.inf)
    tail = torch.nn.functional.pad(lse_tail, (1, 0), value=0.0)
    tail = torch.where(j >= 0, tail.gather(-1, j + 1), torch.logsumexp(-u, -1, keepdim=True))
    d = (m - 1 - j).to(u.dtype) - k.unsqueeze(-1)
    # The root in the log domain: log r = log sqrt(d^2 + e^(head + tail)) and, for d >= 0,
    # beta = log(d + r) - tail, else beta = head - log(r - d). exp(head + tail) underflows
    # when the piece is far wider than t, which this form survives (beta = (head - tail) / 2
    # at d = 0).
    log_abs_d = torch.log(d.abs())
    log_r = 0.5 * torch.logaddexp(2.0 * log_abs_d, head + tail)
    beta = torch.where(
        d >= 0, torch.logaddexp(log_abs_d, log_r) - tail, head - torch.logaddexp(log_r, log_abs_d)
    )
    return (t * beta).squeeze(-1)


def solve_sort(v: Tensor, k: Tensor, t: float, link: Link) -> tuple[Tensor, Tensor, Tensor]:
    """The O(n log n) route: full sort, then the closed form of the link."""
    rules = classify(v, k)
    if link.piecewise_linear:
        s = v.sort(-1, descending=True).values
        tau = sorted_clip_tau(s, torch.where(rules.regular, k, 1.0), t)
    elif link.name == "laplace":
        # Stand-ins far enough out that exp(-gap/t) vanishes: +inf adds 1, -inf adds 0.
        s = finite_stand_ins(v, t * (2.0 * math.log(v.shape[-1] + 1.0) + 80.0)).sort(-1).values
        tau = sorted_laplace_tau(s, torch.where(rules.regular, k, 0.5), t)
    else:
        raise ValueError(f"the sort route has no closed form for the {link.name!r} link")
    tau = torch.where(rules.regular, tau, 0.0)
    y, gp = link.evaluate(shifted(v, tau, t), snap=snap_below(v.dtype))
    y, g = _apply_rules(v, y, gp / t, k, rules)
    return tau, y, g


#: The ``solver`` argument of the custom op: 0 the default route of the backend,
#: 1 whole-row Newton, 2 the sort route.
SOLVERS = {"auto": 0, "newton": 1, "sort": 2}


def reference_forward(x: Tensor, k: Tensor, t: Tensor, link: Link, solver: int) -> tuple[Tensor, Tensor]:
    """The mask (B, n) in the dtype of x and the thresholds tau (B,) in float64.

    Solves on v = x / t with temperature 1 (in float64 where the device has it), so a
    temperature per row costs nothing extra. tau of a ruled row is NaN (NaN row or NaN
    k), +inf (k = 0, or +inf entries sharing k) or -inf (every entry above -inf gets 1).
    """
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    scale = t.to(wide).unsqueeze(-1)
    v = x.to(wide) / scale
    kw = k.to(wide)
    if solver == SOLVERS["sort"]:
        tau, y, _ = solve_sort(v, kw, 1.0, link)
    else:
        tau, y, _ = solve_dense(v, kw, 1.0, link)
    rules = classify(v, kw)
    tau = torch.where(
        rules.ones, -math.inf, torch.where(rules.zero | rules.pos, math.inf, tau * scale.squeeze(-1))
    )
    tau = torch.where(rules.nan, math.nan, tau)
    return y.to(x.dtype), tau.to(torch.float64)
