"""The threshold solver: one scalar root per row, no sort of the row.

For a link G and rows ``v`` of shape (B, m) it finds tau with

    f(tau) = sum_i G((v_i - tau) / t) - k = 0        (one equation per row)

and returns the mask ``y = G((v - tau) / t)`` with the slopes ``g = G'((v - tau) / t) / t``
that the implicit backward needs. f is continuous and non-increasing, so a safeguarded
Newton iteration on a bracket [lo, hi] with f(lo) >= 0 >= f(hi) always converges: a
Newton step is taken when it stays inside the bracket, a bisection step otherwise. For
the piecewise-linear link (p = 2) a Newton step taken on the right linear piece is the
exact solution tau = (sum_A v - t (k - |U|)) / |A| (A the active set, U the saturated
entries), so the iteration ends exactly. Three routes share this iteration:

* ``dense``: whole rows; each step is a few passes over the row.
* ``candidates`` (sparse links only): every entry with y > 0 lies among the largest
  K = k + (entries within t of the threshold). One ``torch.topk`` of K values (estimated
  from a strided subsample), a solve on those, and a check that the K-th value has
  y = 0 give the exact answer. Rows whose check fails are solved again densely.
* ``sort`` (p = 2 and the Laplace link): the O(n log n) route of the papers, a full sort
  then closed forms on cumulative sums. It is the reference and the benchmark baseline.

Rows are classified first, so that the iterations only see well-posed rows:

==========================  ==========================================================
row                         result
==========================  ==========================================================
contains NaN                NaN everywhere in the row (other rows are unaffected)
k = 0                       zeros
at least k entries +inf     k / (number of +inf) on the +inf entries, 0 elsewhere
at most k entries > -inf    1 on every entry > -inf, 0 on -inf (padding)
otherwise (regular)         solved; +inf entries get 1, -inf entries get 0
==========================  ==========================================================

Rows set by a rule get zero slopes (no gradient), except NaN rows, whose gradient is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch._higher_order_ops.while_loop import while_loop

from .._checks import is_tracing, scatter_rows
from ._links import Link

#: Iteration cap of the safeguarded Newton solver. The bracket at least halves on every
#: step that is not an accepted Newton step, so this reaches rounding level in float64.
MAX_ITER = 100
#: Fixed number of iterations under torch.func transforms (vmap), where the loop cannot
#: stop early: enough for float32 from any bracket, and for float64 once Newton converges.
#: Under torch.compile the loop is a ``while_loop`` that stops as in eager mode.
TRACED_ITER = 40
#: Rows up to this length are solved on a full selection of the row (a cheap sort).
SHORT_ROW = 256
#: The candidate route is used while the estimated support is below n / SPARSE_FRACTION.
SPARSE_FRACTION = 6

#: evaluate(tau) -> (f(tau), -f'(tau)), both (B,).
Evaluator = Callable[[Tensor], tuple[Tensor, Tensor]]


def snap_below(dtype: torch.dtype) -> float:
    """Entries of a sparse mask within 4 eps of zero are set to zero (see Link.evaluate)."""
    return 4.0 * torch.finfo(dtype).eps


class Solution(NamedTuple):
    """Output of a threshold solve on rows (B, n).

    Attributes:
        y: the mask, (B, n).
        g: slopes G'(z)/t, (B, n) for the dense routes, (B, K) on the candidates.
        idx: (B, K) column indices of the candidates, or an empty tensor (dense routes).
        rows: (R,) rows that were re-solved densely after their candidate check failed.
        g_rows: (R, n) dense slopes of those rows.
    """

    y: Tensor
    g: Tensor
    idx: Tensor
    rows: Tensor
    g_rows: Tensor


class RowRules(NamedTuple):
    """Per-row classification (B,) bool masks; see the table in the module docstring."""

    nan: Tensor
    zero: Tensor
    pos: Tensor
    ones: Tensor
    n_pos: Tensor

    @property
    def regular(self) -> Tensor:
        return ~(self.nan | self.zero | self.pos | self.ones)


def classify_rows(k: Tensor, n_fin: Tensor, n_pos: Tensor, nan: Tensor) -> RowRules:
    """Classifies rows from their counts of finite and of +inf entries."""
    zero = (k <= 0) & ~nan
    pos = (n_pos >= k) & ~zero & ~nan
    ones = (n_fin + n_pos <= k) & ~zero & ~pos & ~nan
    return RowRules(nan, zero, pos, ones, n_pos)


def rules_from_values(v: Tensor, k: Tensor) -> RowRules:
    """Classifies whole rows (one pass per count)."""
    nan = torch.isnan(v).any(-1)
    n_fin = torch.isfinite(v).sum(-1).to(v.dtype)
    n_pos = (v == math.inf).sum(-1).to(v.dtype)
    return classify_rows(k, n_fin, n_pos, nan)


def apply_rules(v: Tensor, y: Tensor, g: Tensor, k: Tensor, rules: RowRules) -> tuple[Tensor, Tensor]:
    """Overwrites the rows set by a rule (see the module docstring)."""
    if not is_tracing() and bool(rules.regular.all()):
        return y, g
    col = lambda m: m.unsqueeze(-1)  # noqa: E731
    y_rule = torch.where(col(rules.pos), (v == math.inf) * col(k / rules.n_pos.clamp(min=1)), 0.0)
    y_rule = torch.where(col(rules.ones), (v > -math.inf).to(v.dtype), y_rule)
    y_rule = torch.where(col(rules.nan), math.nan, y_rule)
    regular = col(rules.regular)
    y = torch.where(regular, y, y_rule)
    g = torch.where(regular, g, torch.where(col(rules.nan), math.nan, 0.0))
    return y, g


def newton(
    evaluate: Evaluator,
    k: Tensor,
    lo: Tensor,
    hi: Tensor,
    tau: Tensor,
    done: Tensor,
    *,
    t: float,
    m: int,
    value_dtype: torch.dtype,
    max_iter: int | None = None,
) -> tuple[Tensor, int]:
    """Safeguarded Newton iteration for f(tau) = 0 on each row, tau in float64.

    Args:
        evaluate: returns f(tau) and d = -f'(tau) >= 0, both float64.
        k: budgets (B,); they scale the tolerance on f.
        lo: (B,) lower end of the bracket, f(lo) >= 0.
        hi: (B,) upper end of the bracket, f(hi) <= 0.
        tau: (B,) starting point in [lo, hi].
        done: (B,) rows to leave alone (set by a rule).
        t: temperature (scale of tau).
        m: row length (scales the rounding error of the sums).
        value_dtype: dtype of the values, whose rounding limits how small f can get.
        max_iter: cap (default MAX_ITER, or TRACED_ITER when tracing).

    Returns:
        tau (B,) and the number of iterations run (a 0-dim tensor).
    """
    tracing = is_tracing()
    compiling = torch.compiler.is_compiling()
    if max_iter is None:
        max_iter = TRACED_ITER if tracing and not compiling else MAX_ITER
    f64 = torch.float64
    k, lo, hi, tau = k.to(f64), lo.to(f64), hi.to(f64), tau.to(f64)
    eps = torch.finfo(f64).eps
    # The values' rounding makes f noisy at about eps_v * (active entries), so Newton
    # steps shrink to about eps_v * t and no further: below that y no longer changes.
    step_tol = 8.0 * torch.finfo(value_dtype).eps * t

    def step(it: Tensor, lo: Tensor, hi: Tensor, tau: Tensor, done: Tensor, dx: Tensor, dx_old: Tensor):
        f, d = evaluate(tau)
        positive = f > 0  # tau is too small
        lo = torch.where(positive, tau, lo)
        hi = torch.where(positive, hi, tau)
        delta = f / d  # inf or NaN where d = 0: every comparison below is then False
        candidate = tau + delta
        # Newton inside the bracket and at least halving the step before last (as in
        # Numerical Recipes' rtsafe); otherwise bisection, which cannot cycle.
        accept = (candidate > lo) & (candidate < hi) & (2.0 * delta.abs() < dx_old.abs())
        small = delta.abs() <= (2.0 * eps * tau.abs()).clamp(min=step_tol)
        converged = (f == 0) | (hi - lo <= 2.0 * eps * (lo.abs() + hi.abs())) | small
        new_tau = torch.where(accept, candidate, torch.where(converged | done, tau, 0.5 * (lo + hi)))
        new_tau = torch.where(done, tau, new_tau)
        return it + 1, lo, hi, new_tau, done | converged, new_tau - tau, dx.clone()

    width = hi - lo
    state = (torch.zeros((), dtype=torch.long, device=tau.device), lo, hi, tau, done, width, width.clone())
    if compiling:
        # One traced loop body instead of max_iter unrolled copies: fast to compile.
        state = while_loop(lambda it, lo, hi, tau, done, *_: (it < max_iter) & ~done.all(), step, state)
        return state[3], state[0]
    for _ in range(max_iter):
        state = step(*state)
        if not tracing and bool(state[4].all()):
            break
    return state[3], state[0]


# --------------------------------------------------------------------------- dense route


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


def dense_evaluator(v: Tensor, k: Tensor, t: float, link: Link) -> tuple[Evaluator, Tensor | None]:
    """f and -f' by a few passes over whole rows, and the (B, n) buffer they reuse.

    The buffer (None when tracing) can hold the final mask once the iteration is done.
    """
    k = k.to(torch.float64)
    buffer = None if is_tracing() else torch.empty_like(v)

    def evaluate(tau: Tensor) -> tuple[Tensor, Tensor]:
        if buffer is None:
            y, gp = link(shifted(v, tau, t))
            total, slope = y.sum(-1, dtype=torch.float64), gp.sum(-1, dtype=torch.float64)
        else:
            total, slope = link.sums(shifted(v, tau, t, out=buffer))
        return total.to(torch.float64) - k, slope.to(torch.float64) / t

    return evaluate, buffer


def row_range(v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Finite min and max of each row, with its NaN flag and counts of finite and +inf entries.

    A plain min and max tell which rows hold a NaN or an infinity; only then are the
    entries counted (boolean reductions are slow on CPU).
    """
    vmax, vmin = v.amax(-1), v.amin(-1)
    n = float(v.shape[-1])
    if not is_tracing() and bool(torch.isfinite(vmax).all() & torch.isfinite(vmin).all()):
        full = torch.full_like(vmax, n)
        return vmin, vmax, torch.zeros_like(vmax, dtype=torch.bool), full, torch.zeros_like(vmax)
    finite = torch.isfinite(v)
    nan = torch.isnan(vmax)
    n_fin = finite.sum(-1).to(v.dtype)
    n_pos = (v == math.inf).sum(-1).to(v.dtype)
    vmax = torch.where(finite, v, -math.inf).amax(-1)
    vmin = torch.where(finite, v, math.inf).amin(-1)
    return vmin, vmax, nan, n_fin, n_pos


def dense_bracket(v: Tensor, k: Tensor, t: float, link: Link) -> tuple[Tensor, Tensor, RowRules]:
    """Brackets tau on whole rows from their finite min and max, and classifies the rows."""
    vmin, vmax, nan, n_fin, n_pos = row_range(v)
    rules = classify_rows(k, n_fin, n_pos, nan)
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
    y, gp = link.evaluate(
        shifted(v, tau, t, out=buffer), in_place=buffer is not None, snap=snap_below(v.dtype)
    )
    y, g = apply_rules(v, y, gp.div_(t) if buffer is not None else gp / t, k, rules)
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
    r = torch.sqrt(d * d + torch.exp(head + tail))
    beta = torch.where(d >= 0, torch.log(d + r) - tail, head - torch.log(r - d))
    return (t * beta).squeeze(-1)


def solve_sort(v: Tensor, k: Tensor, t: float, link: Link) -> tuple[Tensor, Tensor, Tensor]:
    """The O(n log n) route: full sort, then the closed form of the link."""
    rules = rules_from_values(v, k)
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
    y, g = apply_rules(v, y, gp / t, k, rules)
    return tau, y, g


# ----------------------------------------------------------------------- candidate route


def estimate_support(x: Tensor, order: float, lower: Callable[[Tensor], Tensor]) -> int:
    """How many of the largest entries of each row a sparse output can touch.

    The support lies above ``lower(x_(order))``, a bound computed from the ``order``-th
    largest entry (for the mask: x_(k+1) - t). On rows longer than 4096 entries the
    order statistic and the count above the bound are estimated on a strided subsample
    of about 4096 entries, with a margin. On shorter rows a selection would cost as much
    as the solve itself, so the guess is simply 1.5 times the order plus 4. Either way the
    guess only decides how many candidates to select: the result is checked afterwards
    and rows with too few candidates are solved again.
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


def solve_candidates(
    x: Tensor, k: Tensor, t: float, link: Link, K: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Solves a sparse link on the K largest entries of each row.

    Returns the candidate indices (B, K), the mask and slopes on them (B, K), the
    thresholds (B,) in float64, and a (B,) flag of rows to solve again: those whose K-th
    value is above the threshold (the support may reach beyond the candidates), with
    more than K entries +inf, or with a NaN (so that the whole row becomes NaN).
    """
    n = x.shape[-1]
    vals, idx = torch.topk(x, K, dim=-1, sorted=True)
    # The candidates are few: solve them in float64, so that a float32 mask is exact to
    # float32 rounding of the output rather than of (x - tau)/t.
    vals, k = vals.to(torch.float64), k.to(torch.float64)
    whole_row = K == n
    bottom = vals[:, -1]
    # Sorted rows: all finite iff the first and last are (topk puts NaN first).
    clean = bool(torch.isfinite(vals[:, [0, -1]]).all() & (k > 0).all() & (k < n).all())
    if clean:
        rules, regular, s, k_safe = None, None, vals, k
    else:
        nan = torch.isnan(vals[:, 0])
        n_pos = (vals == math.inf).sum(-1).to(vals.dtype)
        # The count of finite entries is exact when the candidates reach down to -inf;
        # otherwise there are at least K of them (counted as n: it only matters for rules).
        n_fin = torch.isfinite(vals).sum(-1).to(vals.dtype)
        if not whole_row:
            n_fin = torch.where(bottom == -math.inf, n_fin, float(n))
        rules = classify_rows(k, n_fin, n_pos, nan)
        regular = rules.regular
        s, k_safe = finite_stand_ins(vals, t + 1.0), torch.where(regular, k, 1.0)
    # tau lies in [x_(floor k + 1) - t, x_(ceil k)] for every sparse link.
    below = torch.floor(k_safe).long().clamp(max=K - 1).unsqueeze(-1)
    above = (torch.ceil(k_safe).long() - 1).clamp(0, K - 1).unsqueeze(-1)
    lo = s.gather(-1, below).squeeze(-1) - t
    hi = s.gather(-1, above).squeeze(-1)
    evaluate, _ = dense_evaluator(s, k_safe, t, link)
    done = torch.zeros_like(k, dtype=torch.bool) if regular is None else ~regular
    tau, _ = newton(evaluate, k_safe, lo, hi, 0.5 * (lo + hi), done, t=t, m=K, value_dtype=x.dtype)
    if rules is not None:
        tau = torch.where(regular, tau, 0.0)
    y, gp = link.evaluate((vals - tau.unsqueeze(-1)) / t, snap=snap_below(x.dtype))
    g = gp / t
    if rules is not None:
        y, g = apply_rules(vals, y, g, k, rules)
    if whole_row:
        failed = torch.zeros_like(bottom, dtype=torch.bool)
    elif rules is None:
        failed = bottom > tau
    else:
        failed = (regular & (bottom > tau)) | (rules.pos & (bottom == math.inf)) | rules.nan
    return idx, y.to(x.dtype), g.to(x.dtype), tau, failed


def _retry(x: Tensor, k: Tensor, t: float, link: Link, tau: Tensor) -> tuple[Tensor, Tensor]:
    """Dense y and g for rows whose candidates were too few.

    The threshold found on too few candidates is a lower bound of the true one (adding
    entries only raises the sum), so the entries above it are enough candidates: one
    count, one selection. Rows with NaN, and rows whose support is a large part of the
    row, are solved by the dense route.
    """
    n = x.shape[-1]
    counts = (x > tau.unsqueeze(-1)).sum(-1)
    K = int(counts.amax().item()) + 1
    if K * SPARSE_FRACTION > n or bool(torch.isnan(x).any()):
        _, y, g = solve_dense(x, k, t, link)
        return y, g
    idx, yc, gc, _, _ = solve_candidates(x, k, t, link, min(K, n))
    return scatter_rows(x, idx, yc), scatter_rows(x, idx, gc)


def solve(x: Tensor, k: Tensor, t: float, link: Link, solver: str = "auto") -> Solution:
    """Solves the threshold equation on rows ``x`` (B, n) and returns the mask and slopes.

    Args:
        x: (B, n) rows in the compute dtype.
        k: (B,) budgets in [0, n].
        t: temperature > 0.
        link: the link G.
        solver: ``"auto"`` (candidates for sparse links when the support is small, else
            dense), ``"newton"`` (dense safeguarded Newton) or ``"sort"`` (sort route).
    """
    B, n = x.shape

    def dense(y: Tensor, g: Tensor) -> Solution:
        # Distinct empty tensors: outputs of an autograd.Function must not alias.
        return Solution(
            y, g, x.new_empty(0, dtype=torch.long), x.new_empty(0, dtype=torch.long), x.new_empty(0)
        )

    if solver == "sort":
        _, y, g = solve_sort(x, k, t, link)
        return dense(y, g)
    if solver == "auto" and link.sparse and not is_tracing() and B > 0 and n > 0:
        k_max = float(k.amax().item())
        K = estimate_support(x, min(k_max + 1.0, n), lambda kth: kth - t)
        K = max(K, min(n, math.floor(k_max) + 1))
        if K * SPARSE_FRACTION <= n or n <= SHORT_ROW:
            idx, yc, gc, tau, failed = solve_candidates(x, k, t, link, K)
            y = scatter_rows(x, idx, yc)
            if not bool(failed.any()):
                return Solution(y, gc, idx, idx.new_empty(0), x.new_empty(0))
            rows = failed.nonzero().squeeze(-1)
            x_rows = x.index_select(0, rows)
            y_rows, g_rows = _retry(x_rows, k.index_select(0, rows), t, link, tau.index_select(0, rows))
            gc = gc.index_fill(0, rows, 0.0)
            return Solution(y.index_copy(0, rows, y_rows), gc, idx, rows, g_rows)
    _, y, g = solve_dense(x, k, t, link)
    return dense(y, g)
