"""The sparse top-k in magnitude on CPU: one numba pass structure per row, rows in parallel.

This module is imported on first use (numba is loaded then, not at ``import softtopk``).
It computes what :func:`softtopk.topk_mag` defines, on rows x (B, n) of float32 or float64
values, with integer budgets k (B,) in float64; s = abs(x) and r = 1/(p - 1) in {1, 3}.

Forward of a row:

1. count NaN and infinite magnitudes; a NaN, or more infinite entries than k, makes the row
   NaN; infinite entries are kept as they are and take their share of k;
2. select a = s_(k) and b = s_(k+1) among the finite magnitudes (one partition, no sort;
   a row of at most SHORT entries sorts its magnitudes whole instead, and its entries
   above tau are a prefix of that order); the top set is the k largest, ties at a broken
   by the lowest index;
3. tau lies in [min(lo, b), b] with lo = a - u(a), the k-th entry's own value; when
   lo >= b nothing pools and tau = b;
4. otherwise a safeguarded Newton iteration on the entries above lo, in float64, solves
   h(tau) = sum_{top, pooled} ((s - tau)^r - l^r tau) + sum_{rest} (s - tau)_+^r = 0
   (h is decreasing; for r = 1 it is piecewise linear and Newton ends on the exact root);
5. write y = sign(x) psi(s).

The unknown is the offset w = b - tau in [0, (b - a) + u(a)], not tau itself, and each
gap is s - tau = (s - b) + w: for p = 4/3 the gaps of tied entries at a small l are
far below the rounding of s (two ties at s = 1e8 with l = 1e-6 have gaps of 4e-4), and
s - tau computed from a rounded tau loses them.

A row's (b, w), a and the number of ties at a in the top set are all the backward needs
besides x: it rebuilds the Jacobian diag(d) - left right^T / W in two passes. b is NaN
for a NaN row, +inf when nothing is kept and -inf when every finite entry is kept (w = 0).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..threshold._cpu import BLOCK_SCAN, COLLECT_BLOCK, FEW, SHORT, _kth_largest, _rank_sort, _rth_largest_few

#: Newton iterations at most (the bracket at least halves on every rejected step).
MAX_ITER = 200
EPS = 2.220446049250313e-16
#: Rows of at most SMALL entries select s_(k+1) among all of them; longer rows first
#: bound it from below by a strided sample (every 8th entry, at most about SAMPLE).
SMALL = 64
SAMPLE = 1024

_jit = numba.njit(cache=True, nogil=True, fastmath=False)
#: The per-row functions are inlined into the row loops: a call between compiled functions
#: passes every array as a reference-counted struct, which costs more than a short row.
_inline = numba.njit(cache=True, nogil=True, fastmath=False, inline="always")


@_inline
def _own_gap(s, l, r):  # pragma: no cover - compiled
    """u = s - v for an unpooled top entry: the root of u^r + l^r u = l^r s (u >= 0)."""
    if r == 1:
        return l * s / (1.0 + l)
    a = l * l * l
    b = a * s
    # Beyond b = 1 the cubic is solved for w = u / b^(1/3): w^3 + (a / b^(2/3)) w = 1, whose
    # coefficients stay in range ((b / 2)^2 overflows once abs(x) l^3 nears 1e154).
    scale = b ** (1.0 / 3.0) if b > 1.0 else 1.0
    a = a / (scale * scale)
    b = b / (scale * scale * scale) if b > 1.0 else b
    root = math.sqrt((0.5 * b) ** 2 + (a / 3.0) ** 3)
    p = 0.5 * b + root
    q = 0.5 * b - root
    u = math.copysign(abs(p) ** (1.0 / 3.0), p) + math.copysign(abs(q) ** (1.0 / 3.0), q)
    for _ in range(2):
        u = u - (u * u * u + a * u - b) / (3.0 * u * u + a)
    return u * scale


@_inline
def _evaluate(sv, st, c, b, w, lr, r):  # pragma: no cover - compiled
    """h, -h' at tau = b - w and the sum of the magnitudes of h's terms on the c candidates.

    sv holds the candidates' s - b.
    """
    f = 0.0
    d = 0.0
    size = 0.0
    tau = b - w
    for j in range(c):
        gap = sv[j] + w
        if gap <= 0.0:
            continue
        if r == 1:
            power = gap
            slope = 1.0
        else:
            power = gap * gap * gap
            slope = 3.0 * gap * gap
        if st[j]:
            if power < lr * tau:
                f += power - lr * tau
                d += slope + lr
                size += power + lr * tau
        else:
            f += power
            d += slope
            size += power
    return f, d, size


@_jit
def _solve(sv, st, c, b, top, lr, r):  # pragma: no cover - compiled
    """The offset w in [0, top] of the root tau = b - w of h by safeguarded Newton.

    h(b) <= 0 <= h(b - top); h increases with w, with slope -h'.
    """
    lo = 0.0
    hi = top
    w = 0.5 * top
    for _ in range(MAX_ITER):
        f, d, size = _evaluate(sv, st, c, b, w, lr, r)
        if abs(f) <= 4.0 * EPS * size:  # a root up to the rounding of h's sum
            return w
        if f > 0.0:
            hi = w
        else:
            lo = w
        new = w - f / d if d > 0.0 else 0.5 * (lo + hi)
        if not (lo < new < hi):
            new = 0.5 * (lo + hi)
        if new == w or hi - lo <= 1e-15 * abs(hi):
            return new
        w = new
    return w


@_inline
def _is_top(s, a, m, seen):  # pragma: no cover - compiled
    """Whether an entry of magnitude s is in the top set, and the ties at a seen so far."""
    if s > a:
        return True, seen
    if s == a:
        return seen < m, seen + 1
    return False, seen


@_jit
def _collect(x, lower, sv, si):  # pragma: no cover - compiled
    """Finite magnitudes above ``lower`` into (sv, si), in index order; returns their count.

    As the threshold kernels' ``_collect``: blocks of COLLECT_BLOCK entries get a
    branch-free test (it vectorises), and only the blocks holding a candidate are copied.
    """
    n = x.shape[0]
    full = n - n % COLLECT_BLOCK
    c = 0
    for j in range(0, full, COLLECT_BLOCK):
        hits = False
        for i in range(j, j + COLLECT_BLOCK):
            s = abs(x[i])
            hits |= (s > lower) & (s < math.inf)
        if hits:
            for i in range(j, j + COLLECT_BLOCK):
                s = abs(x[i])
                if s > lower and s < math.inf:
                    sv[c] = s
                    si[c] = i
                    c += 1
    for i in range(full, n):
        s = abs(x[i])
        if s > lower and s < math.inf:
            sv[c] = s
            si[c] = i
            c += 1
    return c


@_jit
def _scan(x, y):  # pragma: no cover - compiled
    """Writes y = 0 and returns the row's number of infinite magnitudes and whether it has a NaN.

    Branch-free passes (they vectorise); the infinite entries are then copied to y.
    """
    n = x.shape[0]
    for i in range(n):
        y[i] = 0.0
    n_inf = 0
    nan = False
    for i in range(n):
        s = abs(x[i])
        n_inf += s == math.inf
        nan |= s != s
    if n_inf > 0:
        for i in range(n):
            if abs(x[i]) == math.inf:
                y[i] = x[i]
    return n_inf, nan


@_inline
def _nan_row(y, info):  # pragma: no cover - compiled
    """A NaN row: a NaN in it, or more infinite entries than k."""
    for i in range(y.shape[0]):
        y[i] = math.nan
    info[0] = math.nan
    info[1] = 0.0
    info[2] = math.nan
    info[3] = 0.0


@_inline
def _keep_none_or_all(x, kk, l, r, debias, y, info):  # pragma: no cover - compiled
    """Nothing finite kept (kk = 0, tau = +inf), or every finite entry kept (tau = -inf)."""
    if kk > 0:
        for i in range(x.shape[0]):
            v = x[i]
            s = abs(v)
            if s < math.inf:
                y[i] = v + 0.0 if debias else math.copysign(s - _own_gap(s, l, r), v) + 0.0
    info[0] = -math.inf if kk > 0 else math.inf
    info[1] = 0.0
    info[2] = -math.inf
    info[3] = 0.0


@_inline
def _output(x, i, s, top, b, w, l, lr, r, debias, y):  # pragma: no cover - compiled
    """y[i] = sign(x_i) psi(s) for an entry of magnitude s above tau = b - w."""
    tau = b - w
    gap = (s - b) + w
    power = gap if r == 1 else gap * gap * gap
    if top and not power < lr * tau:
        out = s if debias else s - _own_gap(s, l, r)
    else:
        z = gap / l
        out = z if r == 1 else z * z * z
        if debias:
            out += gap
    y[i] = math.copysign(out, x[i]) + 0.0


@_inline
def _forward_row(x, k, l, r, debias, y, buf, sv, si, st, info):  # pragma: no cover - compiled
    """One row: writes y and info = (b, w, a, ties of a in the top set); tau = b - w."""
    n = x.shape[0]
    lr = l**r
    lower = -1.0  # collect every finite magnitude, unless a sample gives a bound
    if n > SMALL and (int(k) + 1) * 8 < n:
        # s_(k+1) estimated from a strided sample, with a margin towards smaller values
        stride = max(8, n // SAMPLE)
        m = 0
        for i in range(0, n, stride):
            s = abs(x[i])
            if s < math.inf:
                buf[m] = s
                m += 1
        js = (int(k) + 1) * m / n
        j = int(math.ceil(js + 3.0 * math.sqrt(js) + 3.0))
        if j <= m:
            # below the own value of an entry under s_(k+1): below the pooled block's reach
            v = _kth_largest(buf, m, j)
            lower = v - _own_gap(v, l, r)
    n_inf, nan = _scan(x, y)
    c = _collect(x, lower, sv, si)
    nf = n - n_inf
    if nan or n_inf > k:
        _nan_row(y, info)
        return
    kk = int(k) - n_inf
    if kk == 0 or kk >= nf:
        _keep_none_or_all(x, kk, l, r, debias, y, info)
        return
    need = kk + 1
    if c < need:
        lower = -1.0
        c = _collect(x, lower, sv, si)
    if need <= FEW:  # buf[:need] ends sorted, largest first
        b = _rth_largest_few(sv[:c], need, buf)
        a = buf[kk - 1]
    else:  # quickselect leaves the kk largest in buf[:kk], unordered
        for j in range(c):
            buf[j] = sv[j]
        b = _kth_largest(buf, c, need)
        a = buf[0]
        for j in range(1, kk):
            a = min(a, buf[j])
    n_gt = 0
    for j in range(c):
        if sv[j] > a:
            n_gt += 1
    m = kk - n_gt  # ties at a that the top set takes, lowest index first
    # tau lies in [b - span, b]: the k-th entry's own value a - u(a) is b - ((b - a) + u(a)),
    # and the root is >= 0 (h(0) >= 0)
    span = min((b - a) + _own_gap(a, l, r), b)
    w = 0.0
    if span > 0.0:
        lo = (b - span) * (1.0 - 4.0 * EPS)  # no entry above the bracket is left out by rounding
        if lo < lower:  # the support may reach below the candidates: collect down to lo
            c = _collect(x, lo, sv, si)
        else:
            cc = 0
            for j in range(c):
                if sv[j] > lo:
                    sv[cc] = sv[j]
                    si[cc] = si[j]
                    cc += 1
            c = cc
        seen = 0
        for j in range(c):
            top, seen = _is_top(sv[j], a, m, seen)
            st[j] = top
            sv[j] -= b  # exact for the entries near b, where the gaps are small
        w = _solve(sv, st, c, b, span, lr, r)
    # (_output's body written out: calling it here made the long rows' forward about
    # 5 % slower at (32, 32768))
    tau = b - w
    seen = 0
    for j in range(c):
        i = si[j]
        s = abs(x[i])
        top, seen = _is_top(s, a, m, seen)
        gap = (s - b) + w
        if not gap > 0.0:
            continue
        power = gap if r == 1 else gap * gap * gap
        if top and not power < lr * tau:
            out = s if debias else s - _own_gap(s, l, r)
        else:
            z = gap / l
            out = z if r == 1 else z * z * z
            if debias:
                out += gap
        y[i] = math.copysign(out, x[i]) + 0.0
    info[0] = b
    info[1] = w
    info[2] = a
    info[3] = m


@_inline
def _short_forward_row(x, k, l, r, debias, y, buf, sv, si, st, info):  # pragma: no cover - compiled
    """:func:`_forward_row` on a short row (at most SHORT entries): its magnitudes sorted whole.

    The stable sort puts the top set (the k largest, ties at a by the lowest index) first,
    and the entries above tau form a prefix of the order.
    """
    n = x.shape[0]
    n_inf = 0
    nan = False
    for i in range(n):
        v = x[i]
        s = abs(v)
        buf[i] = s
        y[i] = v if s == math.inf else 0.0
        n_inf += s == math.inf
        nan |= s != s
    if nan or n_inf > k:
        _nan_row(y, info)
        return
    kk = int(k) - n_inf
    if kk == 0 or kk >= n - n_inf:
        _keep_none_or_all(x, kk, l, r, debias, y, info)
        return
    nf = _rank_sort(buf[:n], sv, si)
    lr = l**r
    a = sv[kk - 1]
    b = sv[kk]
    m = 0  # ties at a that the top set takes
    for j in range(kk):
        m += sv[j] == a
    span = min((b - a) + _own_gap(a, l, r), b)
    w = 0.0
    if span > 0.0:
        lo = (b - span) * (1.0 - 4.0 * EPS)
        c = 0
        while c < nf and sv[c] > lo:
            st[c] = c < kk
            c += 1
        for j in range(c):
            buf[j] = sv[j] - b  # exact for the entries near b, where the gaps are small
        w = _solve(buf, st, c, b, span, lr, r)
    for j in range(nf):
        s = sv[j]
        if not (s - b) + w > 0.0:
            break
        _output(x, si[j], s, j < kk, b, w, l, lr, r, debias, y)
    info[0] = b
    info[1] = w
    info[2] = a
    info[3] = m


@_jit
def _forward_rows(x, k, l, r, debias, y, info, start, stop):  # pragma: no cover - compiled
    n = x.shape[1]
    buf = np.empty(n, dtype=np.float64)
    sv = np.empty(n, dtype=np.float64)
    si = np.empty(n, dtype=np.int64)
    st = np.empty(n, dtype=np.bool_)
    if n <= SHORT:
        for b in range(start, stop):
            _short_forward_row(x[b], k[b], l, r, debias, y[b], buf, sv, si, st, info[b])
        return
    for b in range(start, stop):
        _forward_row(x[b], k[b], l, r, debias, y[b], buf, sv, si, st, info[b])


@numba.njit(cache=True, parallel=True)
def forward(x, k, l, r, debias, y, info, chunks):  # pragma: no cover - compiled
    """Writes y (B, n) and info (B, 4) = (b, w, a, ties) of rows x (B, n), rows in parallel."""
    B = x.shape[0]
    chunks = max(1, min(B, chunks))
    per = (B + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        _forward_rows(x, k, l, r, debias, y, info, ch * per, min(B, (ch + 1) * per))


@_jit
def forward_serial(x, k, l, r, debias, y, info):  # pragma: no cover - compiled
    """:func:`forward` on the calling thread (small batches: no thread wake-up)."""
    _forward_rows(x, k, l, r, debias, y, info, 0, x.shape[0])


@_jit
def _entry(s, b, w, top, l, lr, r, debias):  # pragma: no cover - compiled
    """(d, right, in_block, pooled) of one finite entry: its Jacobian terms in s (tau = b - w)."""
    gap = (s - b) + w
    tau = b - w
    if not gap > 0.0:
        return 0.0, 0.0, False, False
    power = gap if r == 1 else gap * gap * gap
    pooled = top and power < lr * tau
    if top and not pooled:
        if debias:
            return 1.0, 0.0, False, False
        if r == 1:
            return 1.0 / (1.0 + l), 0.0, False, False
        u = _own_gap(s, l, r)
        return 3.0 * u * u / (3.0 * u * u + lr), 0.0, False, False
    right = 1.0 if r == 1 else 3.0 * gap * gap
    d = right / lr  # r z^(r-1) / l with z = gap / l
    if debias:
        d += 1.0
    return d, right, True, pooled


@_inline
def _coupling(x, si, c, a, m, b, w, l, lr, r, debias, gy, scale):  # pragma: no cover - compiled
    """The block's sums over the entries si[:c] above tau, with v = sign gy scale.

    Returns W, sum_block d (v - v_ref), the pooled and block counts and v_ref, the first
    block entry's v: the cotangents are taken relative to it (see ``_backward_row``).
    """
    weight = 0.0
    coupled = 0.0
    n_pooled = 0
    n_block = 0
    ref = 0.0
    seen = 0
    for j in range(c):
        i = si[j]
        v = x[i]
        s = abs(v)
        if s == math.inf:
            continue
        top, seen = _is_top(s, a, m, seen)
        d, right, block, pooled = _entry(s, b, w, top, l, lr, r, debias)
        if block:
            weight += right
            if pooled:
                weight += lr
                n_pooled += 1
            g = gy[i] * scale
            g = g if v > 0.0 else -g
            if n_block == 0:
                ref = g
            n_block += 1
            coupled += d * (g - ref)
    return weight, coupled, n_pooled, n_block, ref


@_jit
def _above(x, b, w, si):  # pragma: no cover - compiled
    """The indices of the entries above tau = b - w ((s - b) + w > 0) or infinite, in order.

    In blocks of COLLECT_BLOCK entries, as :func:`_collect`: a branch-free test of each
    block, then the copy of the blocks that hold such an entry.
    """
    n = x.shape[0]
    full = n - n % COLLECT_BLOCK
    c = 0
    for j in range(0, full, COLLECT_BLOCK):
        hits = False
        for i in range(j, j + COLLECT_BLOCK):
            s = abs(x[i])
            hits |= ((s - b) + w > 0.0) | (s == math.inf)
        if hits:
            for i in range(j, j + COLLECT_BLOCK):
                s = abs(x[i])
                if (s - b) + w > 0.0 or s == math.inf:
                    si[c] = i
                    c += 1
    for i in range(full, n):
        s = abs(x[i])
        if (s - b) + w > 0.0 or s == math.inf:
            si[c] = i
            c += 1
    return c


@_inline
def _backward_row(x, info, l, r, debias, gy, gx, si):  # pragma: no cover - compiled
    """One row's gradient; si: scratch for the indices of the entries above tau."""
    n = x.shape[0]
    b = info[0]
    if b != b:
        for i in range(n):
            gx[i] = math.nan
        return
    w = info[1]
    a = info[2]
    m = int(info[3])
    lr = l**r
    # the entries above tau (and the infinite ones) in one pass; the gradient is 0 elsewhere
    c = 0
    if n <= SMALL:
        # a short row keeps a good share of its entries: each index is written and kept by
        # counting it, with no branch to mispredict
        for i in range(n):
            s = abs(x[i])
            si[c] = i
            c += ((s - b) + w > 0.0) | (s == math.inf)
    elif n <= BLOCK_SCAN:  # (a long row keeps few: the branch is predicted, and the stores are saved)
        for i in range(n):
            s = abs(x[i])
            if (s - b) + w > 0.0 or s == math.inf:
                si[c] = i
                c += 1
    else:  # only the blocks that hold one are copied
        c = _above(x, b, w, si)
    # grad_s = d v - right (sum_block d v) / W. On the block d = right / l^r (+ 1 debiased)
    # and W = sum_block right + l^r n_pooled, so for ties with equal cotangents the two
    # terms agree to a relative n l^r / W, far below rounding at a small l or a large s.
    # With v = ref + u on the block, ref's share is formed exactly,
    # d_i - right_i (sum_block d) / W = right_i n_pooled / W (+ 1 - right_i n_block / W),
    # and the rounding error scales with the spread of v over the block, not its size.
    scale = 1.0
    weight, coupled, n_pooled, n_block, ref = _coupling(x, si, c, a, m, b, w, l, lr, r, debias, gy, scale)
    if not (abs(coupled) < math.inf and abs(ref) < math.inf):
        # a cotangent near the float64 limit: the sums are formed on it scaled by 2^-1000
        scale = 2.0**-1000
        weight, coupled, n_pooled, n_block, ref = _coupling(x, si, c, a, m, b, w, l, lr, r, debias, gy, scale)
    cw = coupled / weight if weight > 0.0 else 0.0
    pooled_w = n_pooled / weight if weight > 0.0 else 0.0
    block_w = n_block / weight if weight > 0.0 else 0.0
    for i in range(n):
        gx[i] = 0.0
    seen = 0
    for j in range(c):
        i = si[j]
        v = x[i]
        s = abs(v)
        if s == math.inf:
            gx[i] = gy[i]
            continue
        if v == 0.0:
            continue  # abs has no slope at 0: gradient 0 (a row keeping every entry has tau = -inf)
        top, seen = _is_top(s, a, m, seen)
        d, right, block, pooled = _entry(s, b, w, top, l, lr, r, debias)
        g = gy[i] * scale
        g = g if v > 0.0 else -g
        if block:
            share = right * pooled_w
            if debias:
                share += 1.0 - right * block_w
            g = d * (g - ref) - right * cw + ref * share
        else:
            g = d * g
        g = g if v > 0.0 else -g
        gx[i] = g if scale == 1.0 else g / scale


@_jit
def _backward_rows(x, info, l, r, debias, gy, gx, start, stop):  # pragma: no cover - compiled
    si = np.empty(x.shape[1], dtype=np.int64)
    for b in range(start, stop):
        _backward_row(x[b], info[b], l, r, debias, gy[b], gx[b], si)


@numba.njit(cache=True, parallel=True)
def backward(x, info, l, r, debias, gy, gx, chunks):  # pragma: no cover - compiled
    """grad_x of rows x (B, n) given the forward's info (B, 4) and grad_y (B, n)."""
    B = x.shape[0]
    chunks = max(1, min(B, chunks))
    per = (B + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        _backward_rows(x, info, l, r, debias, gy, gx, ch * per, min(B, (ch + 1) * per))


@_jit
def backward_serial(x, info, l, r, debias, gy, gx):  # pragma: no cover - compiled
    """:func:`backward` on the calling thread."""
    _backward_rows(x, info, l, r, debias, gy, gx, 0, x.shape[0])
