"""The threshold family on CPU: one fused numba pass structure per row, rows in parallel.

This module is imported on first use (numba is loaded then, not at ``import softtopk``).
Every function here works on one row or a batch of rows (B, n) of float32 or float64
values; budgets, temperatures and thresholds are float64 per row. The row rules
(NaN, k = 0, +inf entries, fewer entries than k) are applied per row, as in
:mod:`softtopk._rows`; a ruled row gets tau = +inf (k = 0, or the +inf entries share k),
-inf (every entry above -inf gets 1) or NaN (a NaN in the row or in k).

Forward of a row, sparse links (clip for p = 2, the power link for p < 2):

1. scan the row: NaN, +inf and -inf counts;
2. a lower bound L of tau: tau >= x_(floor k + 1) - t, with x_(floor k + 1) found in one
   pass that keeps the few largest entries (small k), by quickselect, or, on long rows,
   estimated by an order statistic of a strided sample with a margin;
3. one pass: write y = 0 and collect the entries above L (values and indices);
4. a safeguarded Newton iteration on the candidates, in float64 (for p = 2 it ends on
   the exact closed form of the final linear piece); for p = 2 and few candidates it
   starts from tau read off the sorted candidates and checks it in one step;
5. check tau >= L (then no entry below L can reach the mask); if not, collect again
   above the tau found (a lower bound of the true one) and solve again;
6. write y on the candidates.

Rows of at most SHORT entries (MoE routers) sort their finite entries whole instead of
steps 2-3; with the clip link and an integer k, a row whose gap x_(k) - x_(k+1) exceeds t
is hard, and tau is the middle of its flat piece, read off the sorted entries.

Forward of a row, dense links (logistic, Laplace): rows of at most TINY finite entries
iterate on all of them, and so do longer rows whose band (below) would hold more than
half their sample. Otherwise the entries far from tau enter the sums through power
series: below L, G(z) = sum_j (-1)^(j+1) e^(jz) (logistic) or
e^z / 2 (Laplace), and e^((x - tau)/t) = e^((x - L)/t) e^((L - tau)/t), so one pass
stores u = e^((x - L)/t) for each such entry and accumulates sum u^j once; above H
likewise with e^((H - x)/t). Newton then iterates on the entries of the band (L, H)
only, and the output pass turns each stored u into G without another exponential. The
band comes from a strided sample with margins (and, when the sample holds less than
one entry above tau, from the row's largest entry); tau must end at least Z0 t inside it
(so the series' error is below e^(-(M+1) Z0), under float64 rounding), or the row is
solved again on every entry. The dense links' steps are Halley's (cubic convergence,
from the sums of G'' alongside G'), safeguarded by the bracket as Newton's, and the
last one is not checked by evaluating f where its bound puts tau within the tolerance.
They take no exponential per entry: each entry's e^((x - anchor)/t) is stored for an
anchor within 30 t of tau (computed again when tau moves further) and divided by
e^((tau - anchor)/t). Rows of at most SHORT entries are solved LANES at a time, one row
per vector lane, in lockstep (:func:`_short_dense_rows`). The passes over a row's entries
(the tails' exponentials and power sums, Newton's sums, the output, the backward) are
leaf loops without branches or libm calls, which LLVM vectorises; e^x there is
:func:`_exp`.

Backward of a row: with h = G'(z), grad_x = h/t (v - c), c = <h, v>/sum h, grad_k = c.
The sparse links read h off the mask value (G'(G^{-1}(y))): two passes, no exponential
(the power link first collects its support, where h takes a power per entry). The dense
links read it off y only where y <= 1/2, and take it from z = (x - tau)/t, one
exponential each, on the entries above 1/2 (about k of a row, collected first), whose
1 - y has rounded; a row whose slopes all but underflow has c summed again relative to
its largest slope. Short rows of the dense links are done LANES at a time, one per
vector lane, with every slope from z where y > 0 (:func:`_short_dense_backward_lanes`).
The dense links' Newton sums a row as (the count of entries above tau - k) plus the
fractions, G below tau and -(1 - G) above it, so that no 1 - G is rounded away and
tau is exact also where every entry saturates.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

CLIP, POWER, LOGISTIC, LAPLACE = 0, 1, 2, 3

#: Sparse links: rows with at most this many finite entries select x_(floor k + 1) on all
#: of them; longer rows estimate it from a strided sample.
SMALL = 2048
#: The clip link (p = 2) sorts at most this many candidates and reads tau off the
#: sorted values (Newton then checks it in one step); more candidates go to Newton alone.
SORTED = 64
#: Rows of at most this many entries are sorted whole (each entry placed at its rank), not selected in.
SHORT = 16
#: Rows are scanned for candidates in blocks of this many entries (:func:`_collect`).
COLLECT_BLOCK = 64
#: The sparse links' backward (the power link's, topk_mag's) finds the entries with a
#: slope in blocks on rows longer than this; on shorter rows most blocks hold one (k = 10
#: of 1000: 7 % slower in blocks, of 4096: 27 % faster).
BLOCK_SCAN = 2048
#: x_(r) for r up to this is found in one pass that keeps the r largest entries seen;
#: larger r by quickselect.
FEW = 16
#: Dense links: rows with at most this many finite entries are solved on all of them
#: (Newton's vectorised steps over a whole row cost less than the band's passes there).
TINY = 4096
#: Size of the strided sample that brackets tau on longer rows.
SAMPLE = 1024
#: The dense links' band comes from two rough solves on a strided sample of this size
#: (each Newton step evaluates the link on all of it).
DENSE_SAMPLE = 256
#: Terms of the logistic tail series, and how far (in units of t) tau must be from the
#: band's ends: the series' error per entry is at most e^(-(SERIES + 1) * Z0).
SERIES = 6
Z0 = 6.0
#: Newton iterations at most, plus log2(bracket width / step) (the bracket at least halves
#: on every rejected step).
MAX_ITER = 200
#: A dense link's Newton evaluates e^((x - tau)/t) as e^((x - anchor)/t) / e^((tau - anchor)/t)
#: while tau stays within this many t of the anchor (the quotient's rounding grows with it).
ANCHOR = 30.0
#: Short rows of the dense links are solved LANES at a time, one per vector lane, with at
#: most LANE_STEPS Newton (Halley) steps in lockstep before a lane goes to the row path.
LANES = 32
LANE_STEPS = 8
#: The rows of a block's lane state V (:func:`_lane_step`): k, t, tau, the bracket, the
#: anchor of the exponentials, the last step, the flags stopped and plain (1.0 or 0.0),
#: u = e^((tau - anchor)/t) and 1/t; and of its sums S (:func:`_lane_sums`).
_K, _T, _TAU, _LO, _HI, _AT, _STEP, _STOPPED, _PLAIN, _U, _INV_T = range(11)
_ABOVE, _M, _M_ABOVE, _SLOPE, _CURV, _CURV_ABOVE = range(6)

_jit = numba.njit(cache=True, nogil=True, fastmath=False)
#: Small helpers of the row loops are inlined into them: a call between compiled functions
#: passes every array as a reference-counted struct, which costs more than a short row.
_inline = numba.njit(cache=True, nogil=True, fastmath=False, inline="always")
#: Leaf loops over a row that LLVM vectorises: their sums may be reassociated (summed in
#: SIMD lanes, so their rounding differs from a left-to-right sum by a few ulps of the
#: sum), and a float division by zero gives inf or NaN as IEEE says instead of raising
#: (that test would keep the loop scalar).
_simd = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"}, error_model="numpy")
#: Leaf loops that vectorise without reassociation (no sums): IEEE division, and a * b + c
#: contracted to one fused multiply-add (rounded once), which halves :func:`_exp`'s work.
_vec = numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")


@intrinsic
def _pow2(typingctx, m):  # pragma: no cover - compiled
    """2.0 ** m for an int64 m in [-1022, 1023], from its bits (a shift, which vectorises)."""

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.add(args[0], ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())

    return types.float64(types.int64), codegen


def _flip_negatives(builder, bits, width):
    """LLVM IR: the integer ``bits`` (of ``width``) with its bits below the sign flipped when negative."""
    low = ir.Constant(ir.IntType(width), (1 << (width - 1)) - 1)
    sign = builder.ashr(bits, ir.Constant(ir.IntType(width), width - 1))  # all ones when negative
    return builder.xor(bits, builder.and_(sign, low))


@intrinsic
def _order_key(typingctx, v):  # pragma: no cover - compiled
    """An int64 that orders as the float v (float32 or float64) does: -0 just below +0.

    The float's bits as a signed integer, with the 31 (or 63) bits below the sign flipped
    on negative floats: integer min and max over keys vectorise, where a float min or max
    with its NaN rules stays scalar. The key of -v is the complement of v's; NaN keys lie
    beyond those of +-inf.
    """
    width = 32 if v == types.float32 else 64

    def codegen(context, builder, signature, args):
        key = _flip_negatives(builder, builder.bitcast(args[0], ir.IntType(width)), width)
        return builder.sext(key, ir.IntType(64)) if width == 32 else key

    return types.int64(v), codegen


@intrinsic
def _of_order_key(typingctx, key, like):  # pragma: no cover - compiled
    """The float of ``like``'s dtype whose :func:`_order_key` is ``key``, as a float64."""
    width = 32 if like == types.float32 else 64

    def codegen(context, builder, signature, args):
        key = builder.trunc(args[0], ir.IntType(32)) if width == 32 else args[0]
        bits = _flip_negatives(builder, key, width)  # (its own inverse)
        if width == 32:
            return builder.fpext(builder.bitcast(bits, ir.FloatType()), ir.DoubleType())
        return builder.bitcast(bits, ir.DoubleType())

    return types.float64(key, like), codegen


@intrinsic
def _inf_key(typingctx, like):  # pragma: no cover - compiled
    """:func:`_order_key` of +inf in ``like``'s dtype (that of -inf is its complement)."""
    value = 0x7F800000 if like == types.float32 else 0x7FF0000000000000

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(64), value)

    return types.int64(like), codegen


#: The smallest int64, below every :func:`_order_key` of a float.
_LOWEST_KEY = np.int64(-(2**63))
#: The largest int64, above every :func:`_order_key` of a float.
_HIGHEST_KEY = np.int64(2**63 - 1)


_LOG2E = 1.4426950408889634
#: ln 2 in two parts: the first has 32 significant bits, so m * _LN2_HI is exact for |m| < 2^21.
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082149292705877e-10


@numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy", inline="always")
def _exp(w):  # pragma: no cover - compiled
    r"""e^w in float64 within 1 ulp of ``math.exp``, in straight-line code that vectorises.

    .. math:: e^w = 2^m e^r, \quad m = \lfloor w \log_2 e + 1/2 \rfloor, \quad |r| \le \ln(2) / 2

    with e^r from its Taylor series to r^13 (remainder below 4e-18) and 2^m applied in
    two factors, so that results in the subnormal range round once. w is clamped to
    [-746, 710] first (e^w is 0 or inf beyond); NaN stays NaN. ``math.exp`` is a call
    to libm, which keeps a loop scalar: 4.3 ns an entry here, against 1.3 ns for this
    one in a loop that vectorises.
    """
    v = min(max(w, -746.0), 710.0)
    mf = math.floor(v * _LOG2E + 0.5)
    r = (v - mf * _LN2_HI) - mf * _LN2_LO
    q = 1.0 / 6227020800.0
    q = q * r + 1.0 / 479001600.0
    q = q * r + 1.0 / 39916800.0
    q = q * r + 1.0 / 3628800.0
    q = q * r + 1.0 / 362880.0
    q = q * r + 1.0 / 40320.0
    q = q * r + 1.0 / 5040.0
    q = q * r + 1.0 / 720.0
    q = q * r + 1.0 / 120.0
    q = q * r + 1.0 / 24.0
    q = q * r + 1.0 / 6.0
    q = q * r + 0.5
    q = q * r + 1.0
    q = q * r + 1.0
    m = np.int64(mf)
    half = m >> 1
    out = q * _pow2(half) * _pow2(m - half)
    return w if w != w else out


@_vec
def _anchor(vals, c, anchor, t, ev):  # pragma: no cover - compiled
    """ev[j] = e^((vals[j] - anchor)/t) for j < c and ev[c] = anchor (see :func:`_newton_inline`)."""
    for j in range(c):
        ev[j] = _exp((vals[j] - anchor) / t)
    ev[c] = anchor


@_inline
def _link(z, code, a):  # pragma: no cover - compiled
    """G(z) and G'(z) of link ``code`` (a = 1/(p-1) for the power link).

    A whole a >= 2 up to rounding (p = 4/3 gives a = 3 + 4e-16) takes z^(a-1) by
    products instead of a call to libm's pow, which costs more than the rest of a Newton
    step.
    """
    if code == CLIP:
        if z <= 0.0:
            return 0.0, 0.0
        if z >= 1.0:
            return 1.0, 0.0
        return z, 1.0
    if code == POWER:
        if z <= 0.0:
            return 0.0, 0.0
        if z >= 1.0:
            return 1.0, 0.0
        m = round(a)
        if abs(a - m) <= 1e-12 * a and 2 <= m <= 8:  # (m = 1: p within 1e-12 of 2)
            zp = z
            for _ in range(m - 2):
                zp *= z
        else:
            zp = z ** (a - 1.0)
        return zp * z, a * zp
    if code == LOGISTIC:
        if z >= 0.0:
            e = math.exp(-z)
            y = 1.0 / (1.0 + e)
            return y, y * e / (1.0 + e)
        e = math.exp(z)
        y = e / (1.0 + e)
        return y, y / (1.0 + e)
    if z <= 0.0:
        e = 0.5 * math.exp(z)
        return e, e
    e = 0.5 * math.exp(-z)
    return 1.0 - e, e


@_inline
def _slope_of_value(y, code, a, p):  # pragma: no cover - compiled
    """G'(G^{-1}(y)) (0 at y = 0 and y = 1)."""
    if not (y > 0.0 and y < 1.0):
        return 0.0
    if code == CLIP:
        return 1.0
    if code == POWER:
        return a * y ** (2.0 - p)
    if code == LOGISTIC:
        return y * (1.0 - y)
    return min(y, 1.0 - y)


@_inline
def _newton_inline(
    vals, c, kk, t, code, a, lo, hi, tau, tol, L, H, P, Q, terms, n_high, ev
):  # pragma: no cover
    """Safeguarded Newton for sum_j G((vals_j - tau)/t) + tails(tau) = kk on [lo, hi].

    Starts at ``tau`` (the bracket's middle when tau is outside it); f(lo) >= 0 >= f(hi).
    The dense links take Halley's step (Newton's corrected by f''), the sparse ones
    Newton's. Stops when the bracket closes, when a dense link's f is at the rounding
    level of its sum, or when a step is below ``tol`` (at least eps abs(tau) + 4 eps t:
    about one ulp of tau), or, for a dense link, when the step's error bound delta^2 / t
    is below half that; that last step is returned without evaluating f there. With ``terms`` > 0
    the entries below L and above H enter through their power sums P[:terms] and
    Q[:terms] (and n_high entries above H).

    A dense link evaluates its c entries without an exponential per step: ev[:c] holds
    e^((vals - anchor)/t) for an anchor within ANCHOR t of tau (recomputed, c
    exponentials, when tau moves further), so that e^((vals - tau)/t) = ev / u with one
    u = e^((tau - anchor)/t) per step (:func:`_dense_sums`), and ev[c] holds the anchor,
    on entry (NaN when ev holds nothing yet) and on return; while tau or u is not
    finite, the link is evaluated directly. The sparse links ignore ``ev``.
    """
    eps = 2.220446049250313e-16
    dense = code >= LOGISTIC
    anchor = ev[c] if dense else math.nan
    if not (tau > lo and tau < hi):
        tau = 0.5 * (lo + hi)
    width = hi - lo
    dx_old = width
    it = 0
    iters = MAX_ITER
    while it < iters:
        it += 1
        if it == MAX_ITER:
            # Bisection halves the bracket: a bracket many orders of magnitude wider than t
            # (one huge entry) needs log2(width / step) steps before Newton takes over.
            floor = max(tol, 4.0 * eps * t)
            if floor > 0.0 and width > floor and width < math.inf:
                iters += int(math.ceil(math.log2(width) - math.log2(floor)))
        # f = (n_high + entries above tau - kk) + fractions + tails: see _dense_sums
        f = n_high - kk if terms > 0 else -kk
        d = 0.0
        g2 = 0.0  # sum G''(z): Halley's correction (dense links)
        size = 0.0  # the sum of the magnitudes of f's fractions and tails
        anchored = False
        if dense and abs(tau) < math.inf:  # (a bracket can be infinite: k far below 1 ulp of n)
            if not abs(tau - anchor) <= ANCHOR * t:
                anchor = tau
                _anchor(vals, c, anchor, t, ev)
            u = math.exp((tau - anchor) / t)
            anchored = u > 0.0 and u < math.inf  # not so when t overflows
        if anchored:
            above, fr, size, gp, g2 = _dense_sums(ev, c, u, code)
            f += above  # (exact: an integer less kk)
            f += fr
            d += gp
        elif dense:
            above = 0.0
            fr = 0.0
            for j in range(c):
                z = (vals[j] - tau) / t
                g, gp = _link(z, code, a)
                q = _link(-z, code, a)[0] if z > 0.0 else g  # (1 - G above tau)
                above += 1.0 if z > 0.0 else 0.0
                fr += -q if z > 0.0 else g
                size += q
                d += gp
                side = -1.0 if z > 0.0 else 1.0
                g2 += side * gp * (1.0 - 2.0 * q) if code == LOGISTIC else side * gp
            f += above
            f += fr
        else:
            for j in range(c):
                g, gp = _link((vals[j] - tau) / t, code, a)
                f += g
                d += gp
        before = f
        f, d, g2 = _add_tails(f, d, g2, tau, t, code, L, H, P, Q, terms, 0.0)
        size += abs(f - before)
        slope = d  # sum G'(z)
        d /= t
        if f > 0.0:
            lo = tau
        else:
            hi = tau
        if f == 0.0 or hi - lo <= 0.5 * eps * (abs(lo) + abs(hi)):  # lo and hi adjacent
            return tau
        if code >= LOGISTIC and abs(f) <= 4.0 * eps * size:
            # A dense link's f at the rounding level of its own sum (the sum of its
            # fractions' and tails' magnitudes; its integer part is exact): no evaluation
            # tells tau from its neighbours, and a step rejected there
            # for not halving would send a bisection across the bracket. (A sparse link
            # iterates on: a tau a rounding error off its root can leave an entry just
            # inside (0, 1), where it would take a share of a hard row's gradient.)
            return tau
        delta = f / d if d > 0.0 else math.inf
        if dense:
            # Halley's step, delta / (1 - f f'' / (2 f'^2)): cubic convergence, where Newton's
            # is quadratic. The ratio sum G'' / sum G' lies in [-1, 1], so the correction
            # is below 1/2 while |delta| < t; beyond, Newton's step is taken.
            r = 0.5 * (delta / t) * (g2 / slope) if slope > 0.0 else 0.0
            if abs(r) < 0.5:
                delta = delta / (1.0 - r)
        cand = tau + delta
        step_tol = max(tol, eps * abs(tau) + 4.0 * eps * t)
        if abs(delta) <= step_tol:
            # A step below one ulp of tau: tau is the root up to rounding. The step may
            # round back onto tau, the end of the bracket just moved there, so it is not
            # tested against the bracket (a bisection from there would take ~50 steps).
            return cand if cand >= lo and cand <= hi else tau
        q = abs(delta) / t
        if dense and cand > lo and cand < hi and 16.0 * q <= 1.0 and abs(delta) * q <= 0.5 * step_tol:
            # The step lands within delta^2 / t of the root (|f''| <= f' e^(|delta|/t) / t
            # for both dense links, and Halley's correction is below delta^2 / (2 t)): within
            # half the tolerance, so f is not evaluated there. (delta^2 and t step_tol
            # overflow on rows near the float64 limit: the test is on |delta| / t <= 1/16.)
            return cand
        if cand > lo and cand < hi and 2.0 * abs(delta) < abs(dx_old):
            new = cand
        else:
            new = 0.5 * (lo + hi)
            delta = new - tau
        if abs(delta) <= max(tol, eps * abs(tau) + 4.0 * eps * t):  # about one ulp of tau
            return new
        dx_old = delta
        tau = new
    return tau


@_jit
def _newton(vals, c, kk, t, code, a, lo, hi, tau, tol, L, H, P, Q, terms, n_high, ev):  # pragma: no cover
    """:func:`_newton_inline` as a call, for the paths of long rows (one copy of its code)."""
    return _newton_inline(vals, c, kk, t, code, a, lo, hi, tau, tol, L, H, P, Q, terms, n_high, ev)


@_simd
def _dense_sums(ev, c, u, code):  # pragma: no cover - compiled
    """sum G(z_j) as (above, fractions), sum |fraction_j|, sum G'(z_j), sum G''(z_j); e^(z_j) = ev[j] / u.

    An entry above tau (e > u) counts 1 in ``above`` and -(1 - G) in ``fractions``, an
    entry below it G: the sum is above + fractions with no 1 - G rounded away, so on a
    row near the hard mask (every G within rounding of 0 or 1) f = (above - k) +
    fractions still has its digits. Each entry's fraction is m = min(G, 1 - G) (G's
    digits are lost only where it is near 1), so the sums are of m and of m over the
    entries above; G'' is G'(1 - 2G) (logistic) or +-G' (Laplace), signed by the side
    of tau, so it is summed likewise. ev[:c] in [0, inf], u > 0 finite; one division
    per entry and no branch, so the loop vectorises.
    """
    above = 0.0
    s = 0.0
    s_above = 0.0
    d = 0.0
    s2 = 0.0
    s2_above = 0.0
    if code == LOGISTIC:
        for j in range(c):
            e = ev[j]
            m = min(e, u) / (e + u)  # min(G, 1 - G), G = e / (e + u); 0 at e = inf
            high = 1.0 if e > u else 0.0
            gp = m * (1.0 - m)  # G' = G (1 - G)
            q = gp * (1.0 - 2.0 * m)  # |G''| = G' |1 - 2G|, positive below tau
            above += high
            s += m
            s_above += high * m
            d += gp
            s2 += q
            s2_above += high * q
        return above, s - 2.0 * s_above, s, d, s2 - 2.0 * s2_above
    for j in range(c):
        e = ev[j]
        m = 0.5 * (min(e, u) / max(e, u))  # e^(-|z|) / 2: G below tau, 1 - G above, G' and |G''|
        high = 1.0 if e > u else 0.0
        above += high
        s += m
        s_above += high * m
    return above, s - 2.0 * s_above, s, s, s - 2.0 * s_above


@numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy", inline="always")
def _dense_value(e, u, code):  # pragma: no cover - compiled
    """G(z) of a dense link from e / u = e^z (as :func:`_dense_sums`), in one division."""
    if code == LOGISTIC:
        return 1.0 if e == math.inf else e / (e + u)
    h = 0.5 * (min(e, u) / max(e, u))
    return h if e <= u else 1.0 - h


@_vec
def _dense_write_row(ev, c, u, code, y):  # pragma: no cover - compiled
    """:func:`_dense_write` with si[j] = j."""
    for j in range(c):
        y[j] = _dense_value(ev[j], u, code)


@_vec
def _dense_write(ev, c, u, code, si, y):  # pragma: no cover - compiled
    """y[si[j]] = G(z_j) for j < c, e^(z_j) = ev[j] / u."""
    for j in range(c):
        y[si[j]] = _dense_value(ev[j], u, code)


@_jit
def _add_tails(f, d, g2, tau, t, code, L, H, P, Q, terms, n_high):  # pragma: no cover - compiled
    """Adds the series of the entries below L and above H to f, to d = -t f' and to g2 = t^2 f''."""
    if terms == 0:
        return f, d, g2
    a = math.exp((L - tau) / t) if L > -math.inf else 0.0
    b = math.exp((tau - H) / t) if H < math.inf else 0.0
    if code == LOGISTIC:
        sign = 1.0
        aj = 1.0
        bj = 1.0
        for j in range(terms):
            aj *= a
            bj *= b
            low = aj * P[j]
            high = bj * Q[j]
            f += sign * (low - high)
            d += sign * (j + 1) * (low + high)
            g2 += sign * (j + 1) * (j + 1) * (low - high)
            sign = -sign
        return f + n_high, d, g2
    low = 0.5 * a * P[0]
    high = 0.5 * b * Q[0]
    return f + ((low - high) + n_high), d + (low + high), g2 + (low - high)


@_inline
def _scan(x):  # pragma: no cover - compiled
    """Counts of NaN, +inf and -inf entries of a row."""
    # branch-free sums of comparisons, which vectorise
    n_nan = 0
    n_pos = 0
    n_neg = 0
    for i in range(x.shape[0]):
        v = x[i]
        n_nan += v != v
        n_pos += v == math.inf
        n_neg += v == -math.inf
    return n_nan, n_pos, n_neg


@_inline
def _rule_row(x, k, y, n_nan, n_pos, n_neg):  # pragma: no cover - compiled
    """Applies the row rules; returns (ruled, tau) with tau the rule's sentinel."""
    n = x.shape[0]
    n_fin = n - n_nan - n_pos - n_neg
    if n_nan > 0 or not (k >= 0.0 and k <= n):
        for i in range(n):
            y[i] = math.nan
        return True, math.nan
    if k <= 0.0:
        for i in range(n):
            y[i] = 0.0
        return True, math.inf
    if n_pos >= k:
        share = k / n_pos
        for i in range(n):
            y[i] = share if x[i] == math.inf else 0.0
        return True, math.inf
    if n_fin + n_pos <= k:
        for i in range(n):
            y[i] = 1.0 if x[i] > -math.inf else 0.0
        return True, -math.inf
    return False, 0.0


@_jit
def _sample(x, sv, m_max):  # pragma: no cover - compiled
    """A strided sample of about ``m_max`` finite entries into sv; returns its size."""
    n = x.shape[0]
    stride = max(1, n // m_max)
    m = 0
    for i in range(0, n, stride):
        v = x[i]
        if v > -math.inf and v < math.inf:
            sv[m] = v
            m += 1
    return m


@_jit
def _kth_largest(a, m, r):  # pragma: no cover - compiled
    """The r-th largest (1-based) of a[:m], by quickselect in place (a[:m] is reordered)."""
    lo = 0
    hi = m - 1
    target = r - 1  # position in descending order
    while lo < hi:
        mid = (lo + hi) // 2
        # median of three as the pivot
        x0, x1, x2 = a[lo], a[mid], a[hi]
        if (x0 >= x1) == (x1 >= x2):
            pivot = x1
        elif (x1 >= x0) == (x0 >= x2):
            pivot = x0
        else:
            pivot = x2
        i = lo
        j = hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                tmp = a[i]
                a[i] = a[j]
                a[j] = tmp
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return a[target]
    return a[target]


@_jit
def _rth_largest_few(x, r, buf):  # pragma: no cover - compiled
    """The r-th largest finite entry of x (it has at least r), for a small r, in one pass.

    buf[:r] keeps the r largest entries seen, sorted: an entry below the smallest of them
    (most entries, once the pass is under way) costs one comparison.
    """
    m = 0
    for i in range(x.shape[0]):
        v = x[i]
        if not (v > -math.inf and v < math.inf):
            continue
        if m < r:
            j = m
            m += 1
        elif v > buf[r - 1]:
            j = r - 1
        else:
            continue
        while j > 0 and buf[j - 1] < v:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = v
    return buf[r - 1]


@_jit
def _collect(x, y, lower, upper, sv, si, zero):  # pragma: no cover - compiled
    """The entries in (lower, upper) into (sv, si), in the row's order; returns their count.

    ``upper`` is at most inf, so the entries taken are finite. With ``zero`` writes y = 0
    first. The row is taken in blocks of COLLECT_BLOCK entries: a branch-free test of the
    block, which vectorises, then the copy only in blocks that hold an entry (a band or
    the top candidates hold few): 0.2-0.25 ns an entry on rows of 32768, against 1.1 ns
    for one loop with the test in its branch.
    """
    n = x.shape[0]
    if zero:
        for i in range(n):
            y[i] = 0.0
    full = n - n % COLLECT_BLOCK
    c = 0
    for j in range(0, full, COLLECT_BLOCK):
        hits = False
        for i in range(j, j + COLLECT_BLOCK):
            v = x[i]
            hits |= (v > lower) & (v < upper)
        if hits:
            for i in range(j, j + COLLECT_BLOCK):
                v = x[i]
                if v > lower and v < upper:
                    sv[c] = v
                    si[c] = i
                    c += 1
    for i in range(full, n):
        v = x[i]
        if v > lower and v < upper:
            sv[c] = v
            si[c] = i
            c += 1
    return c


@_inline
def _sort_desc(sv, si, c):  # pragma: no cover - compiled
    """Sorts (sv, si)[:c] by value, largest first (insertion sort: c is small); ties keep their order."""
    for i in range(1, c):
        v = sv[i]
        idx = si[i]
        j = i
        while j > 0 and sv[j - 1] < v:
            sv[j] = sv[j - 1]
            si[j] = si[j - 1]
            j -= 1
        sv[j] = v
        si[j] = idx


@_inline
def _rank_sort(x, sv, si):  # pragma: no cover - compiled
    """The finite entries of a short row into (sv, si), largest first; returns their count.

    Each entry goes to its rank, the number of finite entries above it plus the equal ones
    before it: the order of a stable sort (ties keep their order), found by O(n^2)
    comparisons that vectorise (n <= SHORT) instead of an insertion's unpredictable branches.
    """
    n = x.shape[0]
    m = 0
    for i in range(n):
        v = x[i]
        if not (v > -math.inf and v < math.inf):
            continue
        r = 0
        for j in range(n):
            w = x[j]
            r += ((w > v) & (w < math.inf)) | ((w == v) & (j < i))
        sv[r] = v
        si[r] = i
        m += 1
    return m


@_inline
def _clip_root(sv, c, kk, t):  # pragma: no cover - compiled
    """tau with sum_j clip((sv_j - tau)/t, 0, 1) = kk, for sv[:c] sorted largest first.

    The sum is continuous, piecewise linear and decreasing in tau, with its breakpoints at
    the values (an entry enters the support) and the values minus t (an entry saturates).
    Walking them downwards with a entries saturated and b entries above tau, the first
    breakpoint where the sum reaches kk closes the piece whose line gives tau (on a flat
    piece, its middle). Sums are taken relative to sv[0], so that nearby large values do
    not cancel.
    """
    eps = 2.220446049250313e-16
    r = sv[0]
    a = 0
    b = 0
    S = 0.0  # sum of sv_j - r over the entries between a and b
    i = 0
    j = 0
    beta = 0.0
    above = 0.0  # the breakpoint passed last
    while i < c or j < b:
        enter = sv[i] - r if i < c else -math.inf
        sat = sv[j] - r - t if j < b else -math.inf
        beta = max(enter, sat)
        value = a + (S - (b - a) * beta) / t
        if value >= kk:
            rounding = 8.0 * eps * (kk + (abs(S) - (b - a) * beta) / t)
            if sat > enter and sv[b - 1] - r - t == sat and i < c and value - kk <= rounding:
                # The sum reaches kk (up to rounding) where the last entries of the support
                # (ties included) saturate, and stays flat below down to the next entry's
                # value: a hard row, whose threshold is taken in the middle of that piece.
                return r + 0.5 * (beta + enter)
            break
        above = beta
        if i < c and enter >= sat:  # (both -inf when a row's spread overflows)
            b += 1
            S += enter
            i += 1
        else:
            a += 1
            S -= sv[j] - r
            j += 1
            if a == b:
                S = 0.0  # no entry in between: exactly, without the rounding left by the updates
    if b == a:
        # the sum is flat (= kk, a hard row) on this piece: its middle, away from the
        # breakpoints where an entry would come out a rounding error off 0 or 1
        return r + 0.5 * (beta + above)
    return r + (S - t * (kk - a)) / (b - a)


@_jit
def _sparse_row(x, k, t, code, a, y, sv, si):  # pragma: no cover - compiled
    n = x.shape[0]
    n_nan, n_pos, n_neg = _scan(x)
    ruled, tau = _rule_row(x, k, y, n_nan, n_pos, n_neg)
    if ruled:
        return tau
    n_fin = n - n_pos - n_neg
    kk = k - n_pos  # the budget of the finite entries; the +inf ones get 1 each
    need = int(math.floor(kk)) + 1  # tau > x_(need) - t among the finite entries
    if n_fin > SMALL and need * 8 < n_fin:
        # x_(need) estimated from a strided sample, with a margin towards smaller values
        m = _sample(x, sv, SAMPLE)
        js = need * m / n_fin
        r = int(math.ceil(js + 3.0 * math.sqrt(js) + 3.0))
        lower = _kth_largest(sv, m, r) - t if r <= m else -math.inf
    elif need <= FEW:
        lower = _rth_largest_few(x, need, sv) - t
    else:
        m = _collect(x, y, -math.inf, math.inf, sv, si, False)
        lower = _kth_largest(sv, m, need) - t
    tau = 0.0
    c = 0
    for _ in range(4):
        c = _collect(x, y, lower, math.inf, sv, si, True)
        if c < need:
            lower = -math.inf
            c = _collect(x, y, lower, math.inf, sv, si, True)
        start = lower + t
        if code == CLIP and c <= SORTED:
            _sort_desc(sv, si, c)
            lo = sv[c - 1]
            hi = sv[0]
            start = _clip_root(sv, c, kk, t)
        else:
            lo = math.inf
            hi = -math.inf
            for j in range(c):
                lo = min(lo, sv[j])
                hi = max(hi, sv[j])
        # Newton from the root read off the sorted candidates checks it in one step
        tau = _newton(sv, c, kk, t, code, a, lo - t, hi, start, 0.0, 0.0, 0.0, sv, sv, 0, 0.0, sv)
        if tau >= lower:
            break
        lower = tau  # a lower bound of the true threshold: collect again above it
    if n_pos > 0:
        for i in range(n):
            if x[i] == math.inf:
                y[i] = 1.0
    _write_support(x, y, si, c, tau, t, code, a)
    return tau


@_inline
def _write_support(x, y, si, c, tau, t, code, a):  # pragma: no cover - compiled
    """y = G((x - tau)/t) on the candidates si[:c] (y is already 0 elsewhere)."""
    eps = 2.220446049250313e-16
    for j in range(c):
        v = x[si[j]]
        z = (v - tau) / t
        if z <= 16.0 * eps * (abs(v) + abs(tau)) / t:
            continue  # on the threshold up to rounding: outside the support
        y[si[j]] = _link(z, code, a)[0]


@_inline
def _hard_gap(sv, K, t):  # pragma: no cover - compiled
    """Whether sv[K - 1] - sv[K] exceeds t beyond rounding (sv sorted largest first, K >= 1).

    Then with a sparse link (clip or power, both 1 from z = 1 on and 0 up to z = 0) and
    k = K the sum is flat (= K) for tau between sv[K] and sv[K - 1] - t, and at its
    middle every z = (sv_j - tau)/t is at least 1 (j < K) or below 0 (j >= K) after
    rounding: the mask is the hard one, exactly.
    """
    if K < 1:
        return False
    eps = 2.220446049250313e-16
    return sv[K - 1] - sv[K] - t > 64.0 * eps * (abs(sv[0]) + abs(sv[K]) + t)


@_inline
def _short_sparse_row(x, k, t, code, a, y, sv, si):  # pragma: no cover - compiled
    """:func:`_sparse_row` on a short row (MoE routers): its finite entries sorted whole.

    The candidates are then the largest entries down to x_(need) - t, in order, so that
    for the clip link tau is read off them (:func:`_clip_root`) and Newton checks it.
    Its helpers (the scan, the row rules, the rank sort, the closed form, Newton) are
    inlined: a call between compiled functions passing arrays costs more than a short row.
    """
    n = x.shape[0]
    n_nan, n_pos, n_neg = _scan(x)
    ruled, tau = _rule_row(x, k, y, n_nan, n_pos, n_neg)
    if ruled:
        return tau
    kk = k - n_pos  # the budget of the finite entries; the +inf ones get 1 each
    need = int(math.floor(kk)) + 1  # tau > x_(need) - t among the finite entries
    m = _rank_sort(x, sv, si)
    if kk == need - 1 and _hard_gap(sv, need - 1, t):
        # A hard row: the kk largest saturate (z >= 1) before the next one enters (z > 0),
        # for either link, and tau is the middle of the flat piece between them (as
        # :func:`_clip_root` puts it)
        r = sv[0]
        for i in range(n):
            y[i] = 1.0 if x[i] == math.inf else 0.0
        for j in range(need - 1):
            y[si[j]] = 1.0
        return r + 0.5 * ((sv[need - 1] - r) + (sv[need - 2] - r - t))
    lower = sv[need - 1] - t
    c = need
    while c < m and sv[c] > lower:
        c += 1
    start = _clip_root(sv, c, kk, t) if code == CLIP else lower + t
    tau = _newton_inline(
        sv, c, kk, t, code, a, sv[c - 1] - t, sv[0], start, 0.0, 0.0, 0.0, sv, sv, 0, 0.0, sv
    )
    for i in range(n):
        y[i] = 1.0 if x[i] == math.inf else 0.0
    _write_support(x, y, si, c, tau, t, code, a)
    return tau


@_jit
def _inverse(q, code):  # pragma: no cover - compiled
    """G^{-1}(q) of a dense link, q in (0, 1)."""
    if code == LOGISTIC:
        return math.log(q) - math.log1p(-q)
    if q <= 0.5:
        return math.log(2.0 * q)
    return -math.log(2.0 * (1.0 - q))


@_jit
def _value_range(sv, m):  # pragma: no cover - compiled
    """min(sv[:m]) and max(sv[:m]) of finite values (inf and -inf when m = 0).

    Found on :func:`_order_key`, which vectorises: 0.11 ns an entry on long rows, where
    float min and max take 0.55.
    """
    if m == 0:
        return math.inf, -math.inf
    lo = _HIGHEST_KEY
    hi = _LOWEST_KEY
    for j in range(m):
        key = _order_key(sv[j])
        lo = min(lo, key)
        hi = max(hi, key)
    return _of_order_key(lo, sv[0]), _of_order_key(hi, sv[0])


@_jit
def _solve_values(sv, m, lo, hi, kk, t, code, tol, ev, start=math.nan):  # pragma: no cover - compiled
    """tau of a dense link on the values sv[:m] alone, to the absolute tolerance ``tol``.

    lo and hi are the values' range (:func:`_value_range`). Newton starts at ``start``,
    or at the middle of the bracket when it is NaN or outside.
    """
    # With q = kk / m, m G((lo - tau)/t) >= kk and m G((hi - tau)/t) <= kk bracket tau.
    shift = t * _inverse(kk / m, code)
    ev[m] = math.nan
    return _newton(
        sv, m, kk, t, code, 1.0, lo - shift - t, hi - shift + t, start, tol, 0.0, 0.0, sv, sv, 0, 0.0, ev
    )


@_jit
def _finite_max(x):  # pragma: no cover - compiled
    """The largest finite entry of x (-inf when there is none), as a float64.

    Found on :func:`_order_key` with an integer test for finiteness, which vectorises:
    0.15 ns an entry, where a conditional float max stays scalar (1.1 ns).
    """
    if x.shape[0] == 0:
        return -math.inf
    inf = _inf_key(x[0])
    top = _LOWEST_KEY
    for i in range(x.shape[0]):
        key = _order_key(x[i])
        finite = (key ^ (key >> 63)) < inf  # below +inf's key, and its complement below too
        top = max(top, key if finite else _LOWEST_KEY)
    return _of_order_key(top, x[0]) if top != _LOWEST_KEY else -math.inf


@_vec
def _copy_row(x, sv, si):  # pragma: no cover - compiled
    """sv = x in float64 and si = 0, 1, ..., n - 1."""
    for i in range(x.shape[0]):
        sv[i] = x[i]
        si[i] = i


@_vec
def _tail_exps(x, L, H, t, y, ev):  # pragma: no cover - compiled
    """The entries outside the band (L, H): e^((x - L)/t) below, e^((H - x)/t) above.

    Writes them to ev and to y (y = u below L, y = -1 - w above H, so that
    :func:`_write_tails` tells them apart); ev and y of the band's entries are left
    meaningless. -inf entries get u = 0, +inf entries w = 0.
    """
    for i in range(x.shape[0]):
        v = x[i]
        z = min(v - L, H - v) / t  # <= 0 outside the band, -inf at an infinite entry
        e = _exp(z)
        e = e if z <= 0.0 else 0.0
        ev[i] = e
        y[i] = e if v <= L else -1.0 - e


@_simd
def _tail_sums(x, L, H, ev, P, Q, terms):  # pragma: no cover - compiled
    """The tails' power sums, from :func:`_tail_exps`' ev; returns the count of finite entries above H.

    P[j] = sum u^(j+1) over the entries below L and Q[j] = sum w^(j+1) over those above
    H, for j < terms (1 or SERIES). +inf entries are not counted: the row's budget kk
    already excludes them.
    """
    n_high = 0.0
    p1 = p2 = p3 = p4 = p5 = p6 = 0.0
    q1 = q2 = q3 = q4 = q5 = q6 = 0.0
    if terms == 1:
        for i in range(x.shape[0]):
            v = x[i]
            e = ev[i]
            p1 += e if v <= L else 0.0
            q1 += e if v >= H else 0.0
            n_high += 1.0 if (v >= H) & (v < math.inf) else 0.0
    else:
        for i in range(x.shape[0]):
            v = x[i]
            high = v >= H
            u = ev[i] if v <= L else 0.0
            w = ev[i] if high else 0.0
            n_high += 1.0 if high & (v < math.inf) else 0.0
            u2 = u * u
            w2 = w * w
            p1 += u
            p2 += u2
            p3 += u2 * u
            p4 += u2 * u2
            p5 += u2 * u2 * u
            p6 += u2 * u2 * u2
            q1 += w
            q2 += w2
            q3 += w2 * w
            q4 += w2 * w2
            q5 += w2 * w2 * w
            q6 += w2 * w2 * w2
    P[0] = p1
    Q[0] = q1
    if terms > 1:
        P[1], P[2], P[3], P[4], P[5] = p2, p3, p4, p5, p6
        Q[1], Q[2], Q[3], Q[4], Q[5] = q2, q3, q4, q5, q6
    return n_high


@_vec
def _write_tails(x, L, H, a_low, b_high, logistic, y):  # pragma: no cover - compiled
    """y of the entries outside the band, from :func:`_tail_exps`' y.

    a_low = e^((L - tau)/t) and b_high = e^((tau - H)/t); the band's y stay as they are.
    """
    for i in range(x.shape[0]):
        v = x[i]
        s = y[i]
        e_low = s * a_low  # e^z below L
        e_high = (-1.0 - s) * b_high  # e^(-z) above H
        if logistic:
            g_low = e_low / (1.0 + e_low)
            g_high = 1.0 / (1.0 + e_high)
        else:
            g_low = 0.5 * e_low
            g_high = 1.0 - 0.5 * e_high
        y[i] = g_low if v <= L else (g_high if v >= H else s)


@_jit
def _write_values(sv, ev, si, c, tau, t, code, y, whole):  # pragma: no cover - compiled
    """y[si[j]] = G((sv[j] - tau)/t) for j < c, after :func:`_newton` left ev[:c + 1].

    ``whole``: the values are the whole row in its order (si[j] = j), written in place.
    """
    anchor = ev[c]
    if abs(tau - anchor) <= ANCHOR * t:  # (False when the anchor is NaN)
        u = math.exp((tau - anchor) / t)
        if u > 0.0 and u < math.inf:
            if whole:
                _dense_write_row(ev, c, u, code, y)
            else:
                _dense_write(ev, c, u, code, si, y)
            return
    for j in range(c):
        y[si[j]] = _link((sv[j] - tau) / t, code, 1.0)[0]


@_jit
def _dense_row(x, k, t, code, y, sv, si, P, Q, top, ev):  # pragma: no cover - compiled
    n = x.shape[0]
    n_nan, n_pos, n_neg = _scan(x)
    ruled, tau = _rule_row(x, k, y, n_nan, n_pos, n_neg)
    if ruled:
        return tau
    n_fin = n - n_pos - n_neg
    kk = k - n_pos
    logistic = code == LOGISTIC
    terms = SERIES if logistic else 1
    guess = math.nan
    if n_fin > TINY:
        # A band (L, H) around tau, from rough solves on a strided sample whose budget
        # is widened by three standard deviations either way.
        m = _sample(x, sv, DENSE_SAMPLE)
        ks = kk * m / n_fin
        spread = 3.0 * math.sqrt(ks) + 3.0 if m < n_fin else 0.0
        s_lo, s_hi = _value_range(sv, m)
        lo_s = _solve_values(
            sv, m, s_lo, s_hi, min(ks + spread, m - 0.5 * min(1.0, m - ks)), t, code, 0.05 * t, ev
        )
        hi_s = _solve_values(sv, m, s_lo, s_hi, max(ks - spread, 0.5 * min(1.0, ks)), t, code, 0.05 * t, ev)
        if ks < 1.0:
            # The sample holds less than one entry above tau on average, so hi_s can fall
            # short of tau (the row's top entries are not in it). tau is at most where
            # every finite entry, at the row's largest, would give kk / n_fin.
            bound = _finite_max(x) - t * _inverse(kk / n_fin, code)
            if bound < math.inf:
                hi_s = max(hi_s, bound)
        L = lo_s - (Z0 + 1.0) * t
        H = hi_s + (Z0 + 1.0) * t
        guess = 0.5 * (lo_s + hi_s)
        inside = 0
        for j in range(m):
            inside += (sv[j] > L) & (sv[j] < H)
        if 2 * inside <= m:  # most entries are tails (else Newton on every entry costs less)
            _tail_exps(x, L, H, t, y, ev)
            n_high = _tail_sums(x, L, H, ev, P, Q, terms)
            c = _collect(x, y, L, H, sv, si, False)
            lo = L + Z0 * t
            hi = H - Z0 * t
            # The band's values relative to Newton's start, which f(lo) and f(hi) use too.
            _anchor(sv, c, guess, t, ev)
            u_lo = math.exp((lo - guess) / t)
            u_hi = math.exp((hi - guess) / t)
            if u_lo > 0.0 and u_hi < math.inf:
                above, fr = _dense_sums(ev, c, u_lo, code)[:2]
                f_lo = (above + n_high - kk) + fr
                above, fr = _dense_sums(ev, c, u_hi, code)[:2]
                f_hi = (above + n_high - kk) + fr
            else:
                f_lo = n_high - kk
                f_hi = n_high - kk
                for j in range(c):
                    f_lo += _link((sv[j] - lo) / t, code, 1.0)[0]
                    f_hi += _link((sv[j] - hi) / t, code, 1.0)[0]
            f_lo = _add_tails(f_lo, 0.0, 0.0, lo, t, code, L, H, P, Q, terms, 0.0)[0]
            f_hi = _add_tails(f_hi, 0.0, 0.0, hi, t, code, L, H, P, Q, terms, 0.0)[0]
            if f_lo >= 0.0 and f_hi <= 0.0:
                tau = _newton(sv, c, kk, t, code, 1.0, lo, hi, guess, 0.0, L, H, P, Q, terms, n_high, ev)
                _write_tails(x, L, H, math.exp((L - tau) / t), math.exp((tau - H) / t), logistic, y)
                _write_values(sv, ev, si, c, tau, t, code, y, False)
                return tau
    # Short rows, wide bands and bands that missed tau: Newton on every finite entry, from
    # the sample's estimate or, on short rows, from between x_(floor k) and x_(floor k + 1)
    # when k is small and t is below the entries' mean gap (tau lies there as t -> 0);
    # else from the middle of the bracket, which is nearer tau when t is large.
    need = int(math.floor(kk)) + 1
    start = guess
    if n <= SHORT:
        # a short row's finite entries sorted whole (MoE routers): x_(need) is sv[need - 1]
        whole = False
        c = _rank_sort(x, sv, si)
        v_lo, v_hi = sv[c - 1], sv[0]
        if need <= c and t * c < v_hi - v_lo:
            start = 0.5 * (sv[need - 2] + sv[need - 1]) if need >= 2 else sv[0]
    else:
        whole = n_fin == n  # no infinite entry: the row is the values, in its order
        if whole:
            _copy_row(x, sv, si)
            c = n
        else:
            c = _collect(x, y, -math.inf, math.inf, sv, si, False)
        v_lo, v_hi = _value_range(sv, c)
        if start != start and need <= FEW and need <= c and t * c < v_hi - v_lo:
            below = _rth_largest_few(sv[:c], need, top)
            start = 0.5 * (top[need - 2] + below) if need >= 2 else below
    tau = _solve_values(sv, c, v_lo, v_hi, kk, t, code, 0.0, ev, start)
    if not whole:
        for i in range(n):
            v = x[i]
            if v == math.inf:
                y[i] = 1.0
            elif v == -math.inf:
                y[i] = 0.0
    _write_values(sv, ev, si, c, tau, t, code, y, whole)
    return tau


@_vec
def _lane_exps(X, anc, tt, n, lanes, EV):  # pragma: no cover - compiled
    """EV[j, r] = e^((X[j, r] - anc[r]) / tt[r]) on a block of lanes (:func:`_short_dense_rows`)."""
    for j in range(n):
        for r in range(lanes):
            EV[j, r] = _exp((X[j, r] - anc[r]) / tt[r])


@_vec
def _lane_sums(EV, V, n, lanes, code, S):  # pragma: no cover - compiled
    """:func:`_dense_sums` on each lane of a block at its tau, e^(z_j) = EV[j, r] / u[r].

    u = e^((tau - anchor)/t) goes to V[_U] (the state of :func:`_lane_step`); S[:, r] gets
    the count above tau, sum m, sum m above, sum G', sum |G''| and sum |G''| above
    (m = min(G, 1 - G)), each lane summed left to right.
    """
    for r in range(lanes):
        V[_U, r] = _exp((V[_TAU, r] - V[_AT, r]) / V[_T, r])
    U = V[_U]
    for q in range(6):
        for r in range(lanes):
            S[q, r] = 0.0
    if code == LOGISTIC:
        for j in range(n):
            for r in range(lanes):
                e = EV[j, r]
                u = U[r]
                m = min(e, u) / (e + u)
                high = 1.0 if e > u else 0.0
                gp = m * (1.0 - m)
                q = gp * (1.0 - 2.0 * m)
                S[_ABOVE, r] += high
                S[_M, r] += m
                S[_M_ABOVE, r] += high * m
                S[_SLOPE, r] += gp
                S[_CURV, r] += q
                S[_CURV_ABOVE, r] += high * q
    else:
        for j in range(n):
            for r in range(lanes):
                e = EV[j, r]
                u = U[r]
                m = 0.5 * (min(e, u) / max(e, u))
                high = 1.0 if e > u else 0.0
                S[_ABOVE, r] += high
                S[_M, r] += m
                S[_M_ABOVE, r] += high * m
        for r in range(lanes):
            S[_SLOPE, r] = S[_M, r]
            S[_CURV, r] = S[_M, r]
            S[_CURV_ABOVE, r] = S[_M_ABOVE, r]


@_vec
def _lane_step(S, V, lanes):  # pragma: no cover - compiled
    """One safeguarded Halley step of :func:`_newton_inline` on each live lane.

    V[:, r] is lane r's state, its rows named by _K ... _INV_T (1.0 and 0.0 for the flags
    _STOPPED and _PLAIN), S[:, r] its sums from :func:`_lane_sums`.
    """
    eps = 2.220446049250313e-16
    for r in range(lanes):
        tr = V[_T, r]
        tv = V[_TAU, r]
        lo = V[_LO, r]
        hi = V[_HI, r]
        u = V[_U, r]
        anchored = (abs(tv - V[_AT, r]) <= ANCHOR * tr) & (u > 0.0) & (u < math.inf)
        f = (S[_ABOVE, r] - V[_K, r]) + (S[_M, r] - 2.0 * S[_M_ABOVE, r])
        slope = S[_SLOPE, r]
        g2 = S[_CURV, r] - 2.0 * S[_CURV_ABOVE, r]
        new_lo = tv if f > 0.0 else lo
        new_hi = hi if f > 0.0 else tv
        # (two divisions where the row path takes six: a lane's steps are a chain of them)
        w = f / slope  # Newton's step over t
        delta = w * tr if slope > 0.0 else math.inf
        ratio = 0.5 * w * (g2 / slope) if slope > 0.0 else 0.0
        delta = delta / (1.0 - ratio) if abs(ratio) < 0.5 else delta
        cand = tv + delta
        step_tol = eps * abs(tv) + 4.0 * eps * tr
        at_root = (f == 0.0) | (new_hi - new_lo <= 0.5 * eps * (abs(new_lo) + abs(new_hi)))
        at_root = at_root | (abs(f) <= 4.0 * eps * S[_M, r])
        tiny = abs(delta) <= step_tol
        inside = (cand > new_lo) & (cand < new_hi)
        q = abs(delta) * V[_INV_T, r]  # |delta| / t
        predicted = inside & (16.0 * q <= 1.0) & (abs(delta) * q <= 0.5 * step_tol)
        nxt = cand if inside & (2.0 * abs(delta) < abs(V[_STEP, r])) else 0.5 * (new_lo + new_hi)
        settled = abs(nxt - tv) <= step_tol
        closed = (cand >= new_lo) & (cand <= new_hi)
        result = nxt
        result = cand if predicted else result
        result = (cand if closed else tv) if tiny else result
        result = tv if at_root else result
        live = V[_STOPPED, r] == 0.0
        V[_PLAIN, r] = V[_PLAIN, r] if anchored | (not live) else 0.0
        V[_TAU, r] = result if live else tv
        V[_LO, r] = new_lo if live else lo
        V[_HI, r] = new_hi if live else hi
        V[_STEP, r] = (nxt - tv) if live else V[_STEP, r]
        stop = at_root | tiny | predicted | settled | (not anchored)
        V[_STOPPED, r] = 1.0 if stop | (not live) else 0.0


@_vec
def _lane_order_stats(X, kk, n, lanes, rank, above_k, below_k):  # pragma: no cover - compiled
    """x_(need - 1) (the largest when need = 1) and x_(need) of each lane, need = floor(kk) + 1.

    Each entry's rank is the count of entries above it and of equal ones before it (ties
    by position, so the ranks are 0..n-1); the two entries are picked by rank.
    """
    for r in range(lanes):
        above_k[r] = 0.0
        below_k[r] = 0.0
    for i in range(n):
        for r in range(lanes):
            rank[r] = 0.0
        for j in range(n):
            for r in range(lanes):
                v = X[i, r]
                w = X[j, r]
                rank[r] += 1.0 if (w > v) | ((w == v) & (j < i)) else 0.0
        for r in range(lanes):
            v = X[i, r]
            need = np.floor(kk[r]) + 1.0  # (a float: k is NaN on lanes that are not plain)
            above_k[r] += v if rank[r] == max(need - 2.0, 0.0) else 0.0
            below_k[r] += v if rank[r] == need - 1.0 else 0.0


@_jit
def _short_dense_rows(x, k, t, code, y, tau, start, stop, lanes):  # pragma: no cover - compiled
    """:func:`_dense_row` on rows start..stop-1 of at most SHORT entries, ``lanes`` rows at a time.

    A short row's solve is a chain of dependent steps (the exponentials, Newton's sums
    and tests), each waiting for the one before: one row at a time leaves the core idle.
    Here each row of a block takes one lane: the block is transposed to (n, lanes), and
    every step (the exponentials, :func:`_dense_sums`, Halley's safeguarded step and its
    stopping tests, as in :func:`_newton_inline`) runs on all lanes in loops over the
    lanes without branches, which vectorise, until every lane has stopped. A lane whose
    row is not plain (a non-finite entry or temperature, k at or beyond the rules'
    bounds, an entry beyond 1e300 in size, tau moving more than ANCHOR t from its
    anchor, or no stop within LANE_STEPS steps) is solved by :func:`_dense_row`, and so
    are the rows after the last full block.
    """
    n = x.shape[1]
    X = np.empty((n, lanes), dtype=np.float64)
    EV = np.empty((n, lanes), dtype=np.float64)
    S = np.empty((6, lanes), dtype=np.float64)
    V = np.empty((11, lanes), dtype=np.float64)
    near = np.empty(lanes, dtype=np.bool_)
    above_k = np.empty(lanes, dtype=np.float64)
    below_k = np.empty(lanes, dtype=np.float64)
    rank = np.empty(lanes, dtype=np.float64)
    sv = np.empty(n, dtype=np.float64)
    si = np.empty(n, dtype=np.int64)
    P = np.empty(SERIES, dtype=np.float64)
    Q = np.empty(SERIES, dtype=np.float64)
    top = np.empty(FEW, dtype=np.float64)
    ev = np.empty(n + 1, dtype=np.float64)
    b = start
    while b + lanes <= stop:
        any_near = False
        for r in range(lanes):
            kk = k[b + r]
            tr = t[b + r]
            plain = (kk > 0.0) & (kk < n) & (tr > 0.0) & (tr < math.inf)
            lo_v = math.inf
            hi_v = -math.inf
            for j in range(n):
                v = np.float64(x[b + r, j])
                X[j, r] = v
                lo_v = min(lo_v, v)
                hi_v = max(hi_v, v)
                plain &= abs(v) <= 1e300  # (False at NaN)
            # the bracket of _solve_values (n = 0 is not plain)
            shift = tr * _inverse(kk / n, code) if plain else 0.0
            V[_K, r] = kk
            V[_T, r] = tr
            V[_INV_T, r] = 1.0 / tr if plain else 0.0
            V[_LO, r] = lo_v - shift - tr
            V[_HI, r] = hi_v - shift + tr
            V[_STOPPED, r] = 0.0 if plain else 1.0
            V[_PLAIN, r] = 1.0 if plain else 0.0
            near[r] = plain & (tr * n < hi_v - lo_v)
            any_near |= near[r]
        if any_near:
            _lane_order_stats(X, V[_K], n, lanes, rank, above_k, below_k)
        for r in range(lanes):
            lo = V[_LO, r]
            hi = V[_HI, r]
            s = math.nan
            if near[r]:
                s = 0.5 * (above_k[r] + below_k[r]) if V[_K, r] >= 1.0 else above_k[r]
            s = s if (s > lo) & (s < hi) else 0.5 * (lo + hi)
            V[_TAU, r] = s
            V[_AT, r] = s
            V[_STEP, r] = hi - lo
        _lane_exps(X, V[_AT], V[_T], n, lanes, EV)
        for _ in range(LANE_STEPS):
            _lane_sums(EV, V, n, lanes, code, S)
            _lane_step(S, V, lanes)
            if V[_STOPPED].min() > 0.0:
                break
        for r in range(lanes):
            tv = V[_TAU, r]
            u = _exp((tv - V[_AT, r]) / V[_T, r])
            V[_U, r] = u
            anchored = (abs(tv - V[_AT, r]) <= ANCHOR * V[_T, r]) & (u > 0.0) & (u < math.inf)
            V[_PLAIN, r] = V[_PLAIN, r] if anchored & (V[_STOPPED, r] > 0.0) else 0.0
        for r in range(lanes):
            if V[_PLAIN, r] > 0.0:
                tau[b + r] = V[_TAU, r]
                u = V[_U, r]
                for j in range(n):
                    y[b + r, j] = _dense_value(EV[j, r], u, code)
            else:
                tau[b + r] = _dense_row(x[b + r], k[b + r], t[b + r], code, y[b + r], sv, si, P, Q, top, ev)
        b += lanes
    for i in range(b, stop):
        tau[i] = _dense_row(x[i], k[i], t[i], code, y[i], sv, si, P, Q, top, ev)


@_jit
def _forward_rows(x, k, t, code, p, y, tau, start, stop):  # pragma: no cover - compiled
    """Rows start..stop-1 of :func:`forward`, with their own scratch."""
    n = x.shape[1]
    a = 1.0 / (p - 1.0) if code == POWER else 1.0
    sv = np.empty(n, dtype=np.float64)
    si = np.empty(n, dtype=np.int64)
    P = np.empty(SERIES, dtype=np.float64)
    Q = np.empty(SERIES, dtype=np.float64)
    top = np.empty(FEW, dtype=np.float64)
    sparse = code == CLIP or code == POWER
    ev = np.empty(0 if sparse else n + 1, dtype=np.float64)  # the dense links' Newton only
    if sparse and n <= SHORT:
        for b in range(start, stop):
            tau[b] = _short_sparse_row(x[b], k[b], t[b], code, a, y[b], sv, si)
        return
    if n <= SHORT:
        _short_dense_rows(x, k, t, code, y, tau, start, stop, LANES)
        return
    for b in range(start, stop):
        if sparse:
            tau[b] = _sparse_row(x[b], k[b], t[b], code, a, y[b], sv, si)
        else:
            tau[b] = _dense_row(x[b], k[b], t[b], code, y[b], sv, si, P, Q, top, ev)


@numba.njit(cache=True, parallel=True)
def forward(x, k, t, code, p, y, tau, chunks):  # pragma: no cover - compiled
    """Writes the mask y (B, n) and the thresholds tau (B,) of rows x (B, n).

    The rows are split into ``chunks`` runs that threads take in parallel; each run
    allocates its scratch (two rows' worth) once.
    """
    B = x.shape[0]
    chunks = max(1, min(B, chunks))
    per = (B + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        _forward_rows(x, k, t, code, p, y, tau, ch * per, min(B, (ch + 1) * per))


@_jit
def forward_serial(x, k, t, code, p, y, tau):  # pragma: no cover - compiled
    """:func:`forward` on the calling thread (small batches: no thread wake-up)."""
    _forward_rows(x, k, t, code, p, y, tau, 0, x.shape[0])


@_inline
def _backward_row(y, x, tb, tt, v, code, a, p, grad_x, si, hs):  # pragma: no cover - compiled
    """One row of :func:`backward`; returns grad_k.

    si, hs: scratch for a row's indices and slopes (hs from :func:`_slope_scratch`).
    """
    n = y.shape[0]
    if tb != tb:
        for i in range(n):
            grad_x[i] = math.nan
        return math.nan
    if tb == math.inf or tb == -math.inf:
        for i in range(n):
            grad_x[i] = 0.0
        return 0.0
    scale = 1.0 / tt
    if code == CLIP:
        # h = 1 on the support (0 < y < 1) and 0 elsewhere: two branch-free passes
        sh, shv = _clip_backward_sums(y, v)
        c = shv / sh if sh > 0.0 else 0.0
        _clip_backward_write(y, v, c, scale, grad_x)
        return c
    if code == POWER:
        # the power link: one pass over y collects the support (0 < y < 1, where h > 0),
        # and the gradient is zero elsewhere; on long rows in blocks (hs takes the values)
        m = 0
        if n > BLOCK_SCAN:
            m = _collect(y, y, 0.0, 1.0, hs, si, False)
        else:
            for i in range(n):
                if y[i] > 0.0 and y[i] < 1.0:
                    si[m] = i
                    m += 1
        sh = 0.0
        shv = 0.0
        for j in range(m):
            i = si[j]
            h = _slope_of_value(y[i], code, a, p)
            sh += h
            shv += h * v[i]
        c = shv / sh if sh > 0.0 else 0.0
        for i in range(n):
            grad_x[i] = 0.0
        for j in range(m):
            i = si[j]
            grad_x[i] = _slope_of_value(y[i], code, a, p) * scale * (v[i] - c)
        return c
    return _dense_backward_row(y, x, tb, tt, v, code, grad_x, si, hs)


#: A dense row whose slopes sum below this has c summed again relative to its largest
#: slope (:func:`_scaled_dense_c`): below it, the slopes that underflowed (y below the
#: smallest normal float32, about 1e-38) could weigh in c.
TINY_SLOPES = 2.0**-60


@_inline
def _dense_backward_row(y, x, tb, tt, v, code, grad_x, si, hs):  # pragma: no cover - compiled
    """A dense link's row of :func:`backward` (tau finite); returns c.

    h = G'(z) is taken from y where y <= 1/2: y (1 - y) (logistic) or y (Laplace), exact
    there. Where y > 1/2, 1 - y has rounded (to a few ulps, or to 0 where an entry
    saturates), so h is taken from z = (x - tau)/t: e/(1 + e)^2 or e/2 with
    e = exp(-|z|). The passes over the row are branch-free and vectorise; the entries
    above 1/2 (about k of the row) are collected into si (:func:`_collect`) and given
    their h (into hs) apart, so that the exponential is taken on them only.
    """
    sh, shv, high = _dense_low_sums(y, v, code)
    m = 0
    if high > 0:
        m = _collect(y, y, 0.5, math.inf, hs, si, False)  # (their y into hs, replaced by h below)
        for j in range(m):
            i = si[j]
            e = math.exp(-abs(x[i] - tb) / tt)
            h = e / ((1.0 + e) * (1.0 + e)) if code == LOGISTIC else 0.5 * e
            hs[j] = h
            if h > 0.0:  # (h v would be NaN at h = 0, v = inf)
                sh += h
                shv += h * v[i]
    c = shv / sh if sh >= TINY_SLOPES else _scaled_dense_c(x, tb, tt, v, code)
    scale = 1.0 / tt
    _dense_low_write(y, v, c, scale, code, grad_x)
    for j in range(m):
        i = si[j]
        grad_x[i] = hs[j] * scale * (v[i] - c) if hs[j] > 0.0 else 0.0
    return c


@_simd
def _dense_low_sums(y, v, code):  # pragma: no cover - compiled
    """sum h and sum h v over the entries with 0 < y <= 1/2 of a dense row, and the count above 1/2."""
    sh = 0.0
    shv = 0.0
    high = 0
    for i in range(y.shape[0]):
        yi = y[i]
        h = yi * (1.0 - yi) if code == LOGISTIC else np.float64(yi)
        low = (yi > 0.0) & (yi <= 0.5)  # (h v would be NaN at h = 0, v = inf)
        sh += h if low else 0.0
        shv += h * v[i] if low else 0.0
        high += 1 if yi > 0.5 else 0
    return sh, shv, high


@_vec
def _dense_low_write(y, v, c, scale, code, grad_x):  # pragma: no cover - compiled
    """grad_x = h/t (v - c) where 0 < y <= 1/2 and 0 elsewhere (see :func:`_dense_low_sums`), scale = 1/t."""
    for i in range(y.shape[0]):
        yi = y[i]
        h = yi * (1.0 - yi) if code == LOGISTIC else np.float64(yi)
        low = (yi > 0.0) & (yi <= 0.5)
        grad_x[i] = h * scale * (v[i] - c) if low else 0.0


@_jit
def _scaled_dense_c(x, tb, tt, v, code):  # pragma: no cover - compiled
    """c = <h, v>/sum h of a dense row from w = h e^m, m the smallest finite |z| (largest w about 1).

    For rows whose slopes all (nearly) underflow: every |z| beyond about 40. 0 when no |z|
    is finite (no slope).
    """
    n = x.shape[0]
    m = math.inf
    for i in range(n):
        m = min(m, abs(x[i] - tb) / tt)
    if not m < math.inf:
        return 0.0
    sw = 0.0
    swv = 0.0
    for i in range(n):
        q = abs(x[i] - tb) / tt
        w = math.exp(m - q)
        if code == LOGISTIC:
            e = math.exp(-q)
            w = w / ((1.0 + e) * (1.0 + e))
        if w > 0.0:
            sw += w
            swv += w * v[i]
    return swv / sw


@_simd
def _clip_backward_sums(y, v):  # pragma: no cover - compiled
    """The size of the clip link's support (0 < y < 1) and the sum of v over it."""
    sh = 0.0
    shv = 0.0
    for i in range(y.shape[0]):
        yi = y[i]
        inside = (yi > 0.0) & (yi < 1.0)
        sh += 1.0 if inside else 0.0
        shv += v[i] if inside else 0.0
    return sh, shv


@_vec
def _clip_backward_write(y, v, c, scale, grad_x):  # pragma: no cover - compiled
    """grad_x = (v - c)/t on the clip link's support and 0 elsewhere, scale = 1/t."""
    for i in range(y.shape[0]):
        yi = y[i]
        inside = (yi > 0.0) & (yi < 1.0)
        grad_x[i] = scale * (v[i] - c) if inside else 0.0


@numba.njit(cache=True, parallel=True)
def backward(y, x, tau, t, v, code, p, grad_x, grad_k, chunks):  # pragma: no cover - compiled
    """grad_x = h/t (v - c) and grad_k = c, c = <h, v>/sum h, with h = G'(z).

    The sparse links read h off y (G'(G^{-1}(y))) and ignore x; the dense links read the
    forward's input rows x too (see :func:`_dense_backward_row`).
    """
    B = y.shape[0]
    chunks = max(1, min(B, chunks))
    per = (B + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        _backward_rows(y, x, tau, t, v, code, p, grad_x, grad_k, ch * per, min(B, (ch + 1) * per))


@_jit
def backward_serial(y, x, tau, t, v, code, p, grad_x, grad_k):  # pragma: no cover - compiled
    """:func:`backward` on the calling thread."""
    _backward_rows(y, x, tau, t, v, code, p, grad_x, grad_k, 0, y.shape[0])


@_inline
def _ruled_backward(tb, grad_x, grad_k, b):  # pragma: no cover - compiled
    """A rule's row (tau not finite): NaN gradients for NaN rows, zeros otherwise; whether it is one."""
    if tb == tb and abs(tb) < math.inf:
        return False
    fill = math.nan if tb != tb else 0.0
    for i in range(grad_x.shape[1]):
        grad_x[b, i] = fill
    grad_k[b] = fill
    return True


@_simd
def _short_clip_backward(y, tau, t, v, grad_x, grad_k, start, stop):  # pragma: no cover - compiled
    """:func:`_backward_row` of the clip link for short rows start..stop-1.

    One call for the rows: on short rows a call per row would cost more than its passes.
    h is 1 on 0 < y < 1, and 0 elsewhere.
    """
    n = y.shape[1]
    for b in range(start, stop):
        if _ruled_backward(tau[b], grad_x, grad_k, b):
            continue
        sh = 0.0
        shv = 0.0
        for i in range(n):
            yi = y[b, i]
            inside = (yi > 0.0) & (yi < 1.0)  # (v would be NaN times 0 at v = inf)
            sh += 1.0 if inside else 0.0
            shv += v[b, i] if inside else 0.0
        c = shv / sh if sh > 0.0 else 0.0
        scale = 1.0 / t[b]
        for i in range(n):
            yi = y[b, i]
            inside = (yi > 0.0) & (yi < 1.0)
            grad_x[b, i] = scale * (v[b, i] - c) if inside else 0.0
        grad_k[b] = c


@_simd
def _short_dense_backward(y, x, tau, t, v, code, grad_x, grad_k, start, stop):  # pragma: no cover - compiled
    """:func:`_dense_backward_row` for short rows start..stop-1, written out in one call.

    (A call per row to the row's passes would cost more than the passes on short rows.)
    """
    n = y.shape[1]
    si = np.empty(n, dtype=np.int64)
    hs = np.empty(n, dtype=np.float64)
    for b in range(start, stop):
        if _ruled_backward(tau[b], grad_x, grad_k, b):
            continue
        tb = tau[b]
        tt = t[b]
        sh = 0.0
        shv = 0.0
        m = 0
        for i in range(n):
            yi = y[b, i]
            h = yi * (1.0 - yi) if code == LOGISTIC else np.float64(yi)
            low = (yi > 0.0) & (yi <= 0.5)
            sh += h if low else 0.0
            shv += h * v[b, i] if low else 0.0
            si[m] = i
            m += 1 if yi > 0.5 else 0
        for j in range(m):
            i = si[j]
            e = math.exp(-abs(x[b, i] - tb) / tt)
            h = e / ((1.0 + e) * (1.0 + e)) if code == LOGISTIC else 0.5 * e
            hs[j] = h
            sh += h if h > 0.0 else 0.0
            shv += h * v[b, i] if h > 0.0 else 0.0
        c = shv / sh if sh >= TINY_SLOPES else _scaled_dense_c(x[b], tb, tt, v[b], code)
        scale = 1.0 / tt
        for i in range(n):
            yi = y[b, i]
            h = yi * (1.0 - yi) if code == LOGISTIC else np.float64(yi)
            low = (yi > 0.0) & (yi <= 0.5)
            grad_x[b, i] = h * scale * (v[b, i] - c) if low else 0.0
        for j in range(m):
            i = si[j]
            grad_x[b, i] = hs[j] * scale * (v[b, i] - c) if hs[j] > 0.0 else 0.0
        grad_k[b] = c


@_vec
def _lane_backward(X, Y, Vg, tau_l, t_l, n, lanes, code, H, sh, shv):  # pragma: no cover - compiled
    """The slopes H[j, r] = G'((X[j, r] - tau_l[r]) / t_l[r]) of a block and their sums per lane.

    An entry whose mask value Y[j, r] is 0 has no slope (H = 0), as on the row path: its
    slope from z can be positive where y has underflowed (z below about -104 in
    float32). sh[r] = sum_j H[j, r] and shv[r] = sum_j H[j, r] Vg[j, r] over the
    entries with a slope, each lane summed left to right
    (:func:`_short_dense_backward_lanes`).
    """
    for r in range(lanes):
        sh[r] = 0.0
        shv[r] = 0.0
    for j in range(n):
        for r in range(lanes):
            e = _exp(-abs(X[j, r] - tau_l[r]) / t_l[r])
            h = e / ((1.0 + e) * (1.0 + e)) if code == LOGISTIC else 0.5 * e
            h = h if Y[j, r] > 0.0 else 0.0
            H[j, r] = h
            sh[r] += h
            shv[r] += h * Vg[j, r] if h > 0.0 else 0.0


@_jit
def _short_dense_backward_lanes(
    y, x, tau, t, v, code, grad_x, grad_k, start, stop
):  # pragma: no cover - compiled
    """:func:`_short_dense_backward` on rows start..stop-1, LANES rows at a time (one per lane).

    As in the forward (:func:`_short_dense_rows`), a block of rows is transposed so that
    the exponentials and sums of its rows' slopes run in loops over the lanes, which
    vectorise. Every slope is taken from z = (x - tau)/t, on the entries with y > 0 (as
    on the row path, an entry whose y is 0 has none). Rows set by a rule, rows whose
    slopes all but underflow (sum h < TINY_SLOPES) and the rows after the last full
    block go to :func:`_short_dense_backward`.
    """
    n = y.shape[1]
    lanes = LANES
    X = np.empty((n, lanes), dtype=np.float64)
    Y = np.empty((n, lanes), dtype=np.float64)
    Vg = np.empty((n, lanes), dtype=np.float64)
    H = np.empty((n, lanes), dtype=np.float64)
    tau_l = np.empty(lanes, dtype=np.float64)
    t_l = np.empty(lanes, dtype=np.float64)
    sh = np.empty(lanes, dtype=np.float64)
    shv = np.empty(lanes, dtype=np.float64)
    b = start
    while b + lanes <= stop:
        for r in range(lanes):
            tb = tau[b + r]
            tau_l[r] = tb if abs(tb) < math.inf else 0.0  # (NaN and +-inf: ruled rows)
            t_l[r] = t[b + r]
            for j in range(n):
                X[j, r] = x[b + r, j]
                Y[j, r] = y[b + r, j]
                Vg[j, r] = v[b + r, j]
        _lane_backward(X, Y, Vg, tau_l, t_l, n, lanes, code, H, sh, shv)
        for r in range(lanes):
            tb = tau[b + r]
            if not (abs(tb) < math.inf and sh[r] >= TINY_SLOPES and t_l[r] > 0.0):
                _short_dense_backward(y, x, tau, t, v, code, grad_x, grad_k, b + r, b + r + 1)
                continue
            c = shv[r] / sh[r]
            scale = 1.0 / t_l[r]
            for j in range(n):
                h = H[j, r]
                grad_x[b + r, j] = h * scale * (Vg[j, r] - c) if h > 0.0 else 0.0
            grad_k[b + r] = c
        b += lanes
    _short_dense_backward(y, x, tau, t, v, code, grad_x, grad_k, b, stop)


@_jit
def _short_backward(y, x, tau, t, v, code, grad_x, grad_k, start, stop):  # pragma: no cover - compiled
    """:func:`_backward_row` of the clip, logistic and Laplace links for short rows start..stop-1."""
    if code == CLIP:
        _short_clip_backward(y, tau, t, v, grad_x, grad_k, start, stop)
    else:
        _short_dense_backward_lanes(y, x, tau, t, v, code, grad_x, grad_k, start, stop)


@_jit
def _short_power_backward(y, tau, t, v, a, p, grad_x, grad_k, start, stop):  # pragma: no cover - compiled
    """:func:`_short_backward` of the power link: h = a y^(2 - p) on the support, 0 elsewhere.

    The support's indices are collected first, so that the pow is taken on the support
    only (a pow under a condition in a loop over the row is taken on every entry).
    """
    n = y.shape[1]
    e = 2.0 - p
    si = np.empty(n, dtype=np.int64)
    for b in range(start, stop):
        if _ruled_backward(tau[b], grad_x, grad_k, b):
            continue
        m = 0
        for i in range(n):
            grad_x[b, i] = 0.0
            yi = y[b, i]
            si[m] = i
            m += 1 if (yi > 0.0) & (yi < 1.0) else 0
        sh = 0.0
        shv = 0.0
        for j in range(m):
            i = si[j]
            h = a * np.float64(y[b, i]) ** e
            sh += h
            shv += h * v[b, i]
        c = shv / sh if sh > 0.0 else 0.0
        scale = 1.0 / t[b]
        for j in range(m):
            i = si[j]
            grad_x[b, i] = a * np.float64(y[b, i]) ** e * scale * (v[b, i] - c)
        grad_k[b] = c


@_jit
def _slope_scratch(n, code):  # pragma: no cover - compiled
    """The scratch ``hs`` of :func:`_backward_row` for rows of n entries.

    The dense links' slopes, or the power link's support values on rows beyond BLOCK_SCAN;
    empty otherwise.
    """
    dense = not (code == CLIP or code == POWER)
    return np.empty(n if dense or (code == POWER and n > BLOCK_SCAN) else 0, dtype=np.float64)


@_jit
def _backward_rows(y, x, tau, t, v, code, p, grad_x, grad_k, start, stop):  # pragma: no cover - compiled
    """Rows start..stop-1 of :func:`backward`, with their own scratch."""
    a = 1.0 / (p - 1.0) if code == POWER else 1.0
    if y.shape[1] <= SHORT:
        if code == POWER:
            _short_power_backward(y, tau, t, v, a, p, grad_x, grad_k, start, stop)
        else:
            _short_backward(y, x, tau, t, v, code, grad_x, grad_k, start, stop)
        return
    si = np.empty(y.shape[1], dtype=np.int64)
    hs = _slope_scratch(y.shape[1], code)
    for b in range(start, stop):
        grad_k[b] = _backward_row(y[b], x[b], tau[b], t[b], v[b], code, a, p, grad_x[b], si, hs)
