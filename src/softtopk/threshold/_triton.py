"""The threshold family in Triton: a program per row or per tile of a long row, no host sync.

This module is imported on first use of the Triton route (triton is loaded then, not at
``import softtopk``). On CPU tensors the kernels run under the Triton interpreter, which
must be switched on before the first Triton call of the process (``TRITON_INTERPRET=1``);
that is how they are tested without a GPU.

Forward of a row (``G`` the link, ``k`` and ``t`` the row's budget and temperature, read
from device tensors):

1. scan the row: NaN, +inf and finite counts, finite min and max; the row rules
   (NaN row, k = 0, +inf entries sharing k, fewer entries than k) are decided here and
   written with their threshold sentinels (NaN, +inf, -inf);
2. in the scaled variable s = (tau - max)/t, a bracket taken from the row:
   [u_min - 1, 0] with u = (x - max)/t for the sparse links (every finite entry
   saturated at one end, none active at the other), [u_min - G^{-1}(q) - 1,
   1 - G^{-1}(q)] with q = k / n for the dense ones (each widened a little against
   rounding);
3. a safeguarded Newton iteration in float32 on the row held on chip (a Newton step
   when it stays in the bracket and halves the last step, else bisection; at most a
   fixed number of steps, ending when the step or the bracket is below the precision);
4. the same iteration in float64 from there, recentred on c, the float32 value (float64
   for float64 rows) nearest that rough threshold, so that x - c is exact near tau and
   z = (x - c)/t - s keeps its digits however large |x|/t is. It takes one to three
   steps: for p = 2 a Newton step is the closed form of the linear piece it starts on,
   (sum_S x - t (k - U)) / |S| over the active entries S and the U saturated ones, so
   it ends exactly (for p < 2 a root on the value of an entry, where G is flat, is
   taken exactly);
5. write y = G((x - tau)/t) (sparse links: zero within rounding of the threshold) and
   tau.

A dense link's sums in steps 3 and 4 split sum G - k as (entries above tau - k) plus
fractions (G below tau, -G(-z) above it), scaled by e^M with M the row's smallest |z|
(:func:`_dense_terms`, :func:`_row_sums`): on a row near the hard mask, sum G - k rounds
to 0 all across the gap around tau, and these sums still tell tau apart there.

No step reads a value on the host: k, t and every decision stay on the device.

Rows of at most :data:`ONCHIP_MAX` entries are held on chip for the whole solve, one
program per row (:func:`_forward_kernel`). Longer rows take the split route, a program per
tile of :data:`SPLIT_BLOCK` entries (several such chunks once a row has more than
:data:`SPLIT_TILES` of them), so that a few long rows still fill the GPU:

- a launch counts and bounds each tile (:func:`_split_scan_kernel`);
- :data:`SPLIT_STEPS` launches take one step of the solve each
  (:func:`_split_step_kernel`): every program of a row reduces the tiles' sums of the
  launch before, all to the same value, takes the step, and sums its tile at the next
  points. A step evaluates :data:`SPLIT_POINTS` points, the Newton iterate and a grid of
  the bracket, so the bracket shrinks at least that many times per launch;
- a launch writes y and tau of the rows solved (:func:`_split_write_kernel`); a row
  still unsolved then is solved from the start by :func:`_forward_kernel`, one program
  reading it in chunks of :data:`CHUNK` at every step.

The number of launches does not depend on the data, so the host never waits on a value.
Every launch passes ``enable_fp_fusion=False``: no fused multiply-add, so that compiled
kernels round as the interpreter does (a breakpoint's z = (x - c)/t - s is then exactly 0).

Backward of a row: with h = G'(z), grad_x = h/t (v - c), c = <h, v>/sum h, grad_k = c,
in float64 whatever the row's dtype (in float32 the products h v of a nearly hard row
fall into the subnormal range, where c = <h, v>/sum h loses its digits). The sparse
links read h off the mask value (G'(G^{-1}(y))); the dense links take it from
z = (x - tau)/t, with x the forward's input (where an entry saturates, 1 - y has
rounded), and c from w = h e^m, m the row's smallest |z|, which does not underflow where
every h does. A long row's backward is two launches over its tiles: the tiles' sums
(a dense row's relative to the tile's own smallest |z|), then c and grad_x.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._links import SCALE_LIMIT

CLIP, POWER, LOGISTIC, LAPLACE = 0, 1, 2, 3
#: Phase of a row of the split route once it is solved (0 rough Newton, 1 float64 Newton,
#: 2 and 3 the power link's breakpoint check).
DONE = tl.constexpr(4)

#: Rows with at most this many entries are held on chip for the whole solve (in registers,
#: spilled to local memory for the longest); float64 rows at most half as many.
ONCHIP_MAX = 32768
#: Chunk of a longer row read per step, and of the backward's passes.
CHUNK = 4096
#: Rows longer than ONCHIP_MAX take the split route: a program per tile of SPLIT_BLOCK
#: entries (of a whole number of SPLIT_BLOCK chunks once a row has more than SPLIT_TILES
#: of them, since every program reduces all the row's tiles), SPLIT_STEPS launches of one
#: solver step each (rows not solved by then are finished one program per row).
SPLIT_BLOCK = 4096
SPLIT_TILES = 128
SPLIT_STEPS = 16
#: Points at which a step of the split route evaluates a row's sums (one read of the tile; a
#: power of two, for tl.arange).
SPLIT_POINTS = 8
#: Steps of the float32 phase and of the float64 phase at most (each stops early once
#: converged; a rejected Newton step halves the bracket).
ITER_LOW = 64
ITER_F64 = 100
#: A dense link's scaled sums are taken times e^M with M at most this where the count
#: above tau differs from k (:func:`_dense_scale`): the bound of :meth:`Link.sums` in
#: float64, and one that keeps n e^M far from overflow in the float32 rough phase.
SCALE_F64 = tl.constexpr(SCALE_LIMIT)
SCALE_F32 = tl.constexpr(60.0)


@triton.jit
def _link(z, LINK: tl.constexpr, a):
    """G(z) and G'(z) of the link (a = 1/(p - 1) for the power link), in the dtype of z."""
    if LINK == 0:
        g = tl.minimum(tl.maximum(z, 0.0), 1.0)
        gp = ((z > 0.0) & (z < 1.0)).to(z.dtype)
    elif LINK == 1:
        zc = tl.minimum(tl.maximum(z, 0.0), 1.0)
        inside = zc > 0.0
        zp = tl.exp((a - 1.0) * tl.log(tl.where(inside, zc, 1.0)))
        g = tl.where(inside, zp * zc, 0.0)
        gp = tl.where(inside & (zc < 1.0), a * zp, 0.0)
    elif LINK == 2:
        e = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + e)
        g = tl.where(z >= 0.0, r, e * r)
        gp = e * r * r
    else:
        e = 0.5 * tl.exp(-tl.abs(z))
        g = tl.where(z <= 0.0, e, 1.0 - e)
        gp = e
    return g, gp


@triton.jit
def _slope(y, LINK: tl.constexpr, a):
    """G'(G^{-1}(y)), 0 at y = 0 and y = 1 (a = 1/(p - 1) for the power link)."""
    inside = (y > 0.0) & (y < 1.0)
    if LINK == 0:
        h = inside.to(y.dtype)
    elif LINK == 1:
        h = tl.where(inside, a * tl.exp((1.0 - 1.0 / a) * tl.log(tl.where(inside, y, 1.0))), 0.0)
    elif LINK == 2:
        h = tl.where(inside, y * (1.0 - y), 0.0)
    else:
        h = tl.where(inside, tl.minimum(y, 1.0 - y), 0.0)
    return h


@triton.jit
def _z(xc, center, scale, s, DT: tl.constexpr):
    """z = (x - center) scale - s on a tile in DT (-inf at non-finite entries)."""
    xv = xc.to(DT)
    valid = (xv > float("-inf")) & (xv < float("inf"))
    return tl.where(valid, (xv - center) * scale - s, float("-inf"))


@triton.jit
def _terms(xc, center, scale, s, a, LINK: tl.constexpr, DT: tl.constexpr):
    """G and G' at z = (x - center) scale - s on a tile (non-finite entries contribute 0)."""
    return _link(_z(xc, center, scale, s, DT), LINK, a)


@triton.jit
def _dense_terms(z, m, LINK: tl.constexpr):
    """A dense link's terms of f = sum G(z) - kk on a tile: (above, fraction, magnitude, G').

    G is split as above + fraction: an entry above the threshold (z > 0) counts 1 in
    ``above`` with the fraction -(1 - G) = -G(-z), an entry below it 0 with the fraction
    G; the magnitude is min(G, 1 - G). So no 1 - G rounds away, and on a row near the
    hard mask (every G within rounding of 0 or 1) f = (above - kk) + fractions keeps its
    digits. The fraction, magnitude and G' are scaled by e^m (m at most the tile's
    smallest |z|), so that they do not underflow where every |z| exceeds the exponent
    range.
    """
    az = tl.abs(z)
    es = tl.exp(m - az)  # e^(-|z|) e^m
    if LINK == 2:
        r = 1.0 / (1.0 + es * tl.exp(-m))
        mag = es * r
        gp = mag * r
    else:
        mag = 0.5 * es
        gp = mag
    high = z > 0.0
    return high.to(z.dtype), tl.where(high, -mag, mag), mag, gp


@triton.jit
def _dense_scale(above, m, kk, LIM: tl.constexpr):
    """The exponent M of a dense row's scaled sums from its count above and smallest |z| m.

    M = m where the count equals kk (f is the fractions alone), else min(m, LIM), so that
    (above - kk) e^M does not overflow; 0 where the row has no finite z.
    """
    m = tl.where(m < float("inf"), m, 0.0)
    return tl.where(above == kk, m, tl.minimum(m, LIM))


@triton.jit
def _count_part(above, kk, M):
    """(above - kk) e^M, the exact integer part of a dense row's scaled f."""
    same = above == kk
    return tl.where(same, 0.0, (above - kk) * tl.exp(tl.where(same, 0.0, M)))


@triton.jit
def _row_sums(
    xrow,
    n,
    xt,
    center,
    scale,
    s,
    kk,
    a,
    LINK: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    ONCHIP: tl.constexpr,
    LIM: tl.constexpr,
):
    """f = sum G(z) - kk, d = sum G'(z) and f's size over the row, z = (x - center) scale - s.

    In DT. A sparse link's f is the plain sum and its size, the rounding scale of f,
    kk + 1. A dense link's f is (above - kk) + fractions and its size the sum of the
    fractions' magnitudes (:func:`_dense_terms`), all three times e^M
    (:func:`_dense_scale`, LIM its bound where the count differs from kk): the sign of
    f, the Newton step f/d and the stop |f| <= 4 eps size do not depend on the scale.
    """
    offs = tl.arange(0, BLOCK)
    if LINK <= 1:
        if ONCHIP:
            g, d = _terms(xt, center, scale, s, a, LINK, DT)
            f = tl.sum(g, axis=0) - kk
            d = tl.sum(d, axis=0)
        else:
            acc_g = tl.zeros([BLOCK], DT)
            acc_d = tl.zeros([BLOCK], DT)
            for start in range(0, n, BLOCK):
                idx = start + offs
                xc = tl.load(xrow + idx, mask=idx < n, other=float("-inf"))
                g, gp = _terms(xc, center, scale, s, a, LINK, DT)
                acc_g += g
                acc_d += gp
            f = tl.sum(acc_g, axis=0) - kk
            d = tl.sum(acc_d, axis=0)
        size = kk + 1.0
    elif ONCHIP:
        z = _z(xt, center, scale, s, DT)
        above = tl.sum((z > 0.0).to(DT), axis=0)
        M = _dense_scale(above, tl.min(tl.abs(z), axis=0), kk, LIM)
        _, frac, mag, gp = _dense_terms(z, M, LINK)
        f = _count_part(above, kk, M) + tl.sum(frac, axis=0)
        d = tl.sum(gp, axis=0)
        size = tl.sum(mag, axis=0)
    else:
        # a first pass for the count above and the smallest |z|, a second for the sums
        acc_a = tl.zeros([BLOCK], DT)
        acc_z = tl.full([BLOCK], float("inf"), DT)
        for start in range(0, n, BLOCK):
            idx = start + offs
            z = _z(tl.load(xrow + idx, mask=idx < n, other=float("-inf")), center, scale, s, DT)
            acc_a += (z > 0.0).to(DT)
            acc_z = tl.minimum(acc_z, tl.abs(z))
        above = tl.sum(acc_a, axis=0)
        M = _dense_scale(above, tl.min(acc_z, axis=0), kk, LIM)
        acc_f = tl.zeros([BLOCK], DT)
        acc_m = tl.zeros([BLOCK], DT)
        acc_d = tl.zeros([BLOCK], DT)
        for start in range(0, n, BLOCK):
            idx = start + offs
            z = _z(tl.load(xrow + idx, mask=idx < n, other=float("-inf")), center, scale, s, DT)
            _, frac, mag, gp = _dense_terms(z, M, LINK)
            acc_f += frac
            acc_m += mag
            acc_d += gp
        f = _count_part(above, kk, M) + tl.sum(acc_f, axis=0)
        d = tl.sum(acc_d, axis=0)
        size = tl.sum(acc_m, axis=0)
    return f, d, size


@triton.jit
def _next_above(xrow, n, xt, center, scale, s, BLOCK: tl.constexpr, ONCHIP: tl.constexpr):
    """The smallest finite x with (x - center) scale > s, in float64 (+inf when none)."""
    if ONCHIP:
        xv = xt.to(tl.float64)
        above = (xv < float("inf")) & ((xv - center) * scale - s > 0.0)
        xb = tl.min(tl.where(above, xv, float("inf")), axis=0)
    else:
        offs = tl.arange(0, BLOCK)
        acc = tl.full([BLOCK], float("inf"), tl.float64)
        for start in range(0, n, BLOCK):
            idx = start + offs
            xv = tl.load(xrow + idx, mask=idx < n, other=float("-inf")).to(tl.float64)
            above = (xv < float("inf")) & ((xv - center) * scale - s > 0.0)
            acc = tl.minimum(acc, tl.where(above, xv, float("inf")))
        xb = tl.min(acc, axis=0)
    return xb


@triton.jit
def _solve(
    xrow,
    n,
    xt,
    center,
    scale,
    kk,
    lo,
    hi,
    s,
    a,
    active,
    LINK: tl.constexpr,
    DT: tl.constexpr,
    EPS: tl.constexpr,
    ITER: tl.constexpr,
    BLOCK: tl.constexpr,
    ONCHIP: tl.constexpr,
    FSTOP: tl.constexpr,
    LIM: tl.constexpr,
):
    """Safeguarded Newton for sum G((x - center) scale - s) = kk in s on [lo, hi], from s.

    f(lo) >= 0 >= f(hi). At most ITER steps; stops when the bracket or the step is below
    the precision EPS (with FSTOP also when |f| is within its rounding), or at once when
    ``active`` is false. FSTOP suits a rough solve, and the dense links, whose f keeps its
    digits (:func:`_row_sums`); a sparse link iterates on, since an entry y = 1e-15 left
    by a rough tau instead of 0 would carry the whole gradient of a hard row. LIM bounds
    the exponent of a dense link's scaled sums in DT (:func:`_dense_scale`).
    """
    s = tl.where((s > lo) & (s < hi), s, 0.5 * (lo + hi))
    dx_old = hi - lo
    done = active == 0
    it = 0
    while (it < ITER) & (done == 0):
        f, d, size = _row_sums(xrow, n, xt, center, scale, s, kk, a, LINK, DT, BLOCK, ONCHIP, LIM)
        lo, hi, s, dx_old, done = _newton_update(f, d, size, lo, hi, s, dx_old, EPS, FSTOP)
        it += 1
    return s


@triton.jit
def _newton_update(f, d, size, lo, hi, s, dx_old, EPS: tl.constexpr, FSTOP: tl.constexpr):
    """One step of the safeguarded Newton iteration from s, where f = sum G - kk, d = sum G'.

    Returns the new (lo, hi, s, dx_old, done); the stops are :func:`_newton_step`'s.
    """
    above = f > 0.0
    lo = tl.where(above, s, lo)
    hi = tl.where(above, hi, s)
    stop, delta, tol = _newton_step(s, f, d, size, lo, hi, EPS, FSTOP)
    cand = s + delta
    # a Newton step below the precision ends the iteration (s + delta may round to s)
    tiny = tl.abs(delta) <= tol
    ok = tiny | ((cand > lo) & (cand < hi) & (2.0 * tl.abs(delta) < tl.abs(dx_old)))
    new = tl.where(ok, cand, 0.5 * (lo + hi))
    delta = new - s
    small = tl.abs(delta) <= tol
    s = tl.where(stop, s, new)
    return lo, hi, s, delta, stop | small


@triton.jit
def _newton_step(s, f, d, size, lo, hi, EPS: tl.constexpr, FSTOP: tl.constexpr):
    """At s, where f = sum G - kk and d = sum G': (stop, Newton step, step tolerance).

    Stop when f = 0 or the bracket [lo, hi] is below the precision EPS, with FSTOP also
    when |f| is within the rounding of its sum, 4 EPS ``size`` (see :func:`_row_sums`):
    there no evaluation tells s from its neighbours, and the iterates would wander in
    the noise.
    """
    stop = (f == 0.0) | (hi - lo <= 2.0 * EPS * (tl.abs(lo) + tl.abs(hi)))
    if FSTOP:
        stop = stop | (tl.abs(f) <= 4.0 * EPS * size)
    has_d = d > 0.0
    delta = tl.where(has_d, f / tl.where(has_d, d, 1.0), float("inf"))
    return stop, delta, 4.0 * EPS * (tl.abs(s) + 1.0)


@triton.jit
def _write(
    xc,
    idx,
    n,
    yrow,
    m,
    inv_t,
    s,
    tau,
    a,
    k,
    n_pos,
    rule,
    LINK: tl.constexpr,
    SNAP: tl.constexpr,
    NARROW: tl.constexpr,
):
    """The mask on a tile of the row: the link's value on regular rows, the rules' elsewhere."""
    xv = xc.to(tl.float64)
    z = (xv - m) * inv_t - s
    if SNAP:
        z = tl.where(z <= 16.0 * 2.220446049250313e-16 * (tl.abs(xv) + tl.abs(tau)) * inv_t, 0.0, z)
    y, _ = _link(tl.where(xv > float("-inf"), z, float("-inf")), LINK, a)
    y = tl.where(xv == float("inf"), 1.0, y)
    share = k / tl.maximum(n_pos, 1.0)
    y = tl.where(rule == 3, tl.where(xv == float("inf"), share, 0.0), y)
    y = tl.where(rule == 4, tl.where(xv > float("-inf"), 1.0, 0.0), y)
    y = tl.where(rule == 2, 0.0, y)
    y = tl.where(rule == 1, float("nan"), y)
    if NARROW:  # through float32 (the interpreter casts float64 to bfloat16 wrongly)
        y = y.to(tl.float32)
    tl.store(yrow + idx, y.to(yrow.dtype.element_ty), mask=idx < n)


@triton.jit
def _rules_and_bracket(n_nan, posf, finf, vmin, vmax, k, n, inv_t, LINK: tl.constexpr):
    """A row's rule, finite budget kk, centre m and first bracket [lo, hi] in s = (tau - m)/t.

    From its counts (NaN, +inf, finite; posf and finf in float64) and finite extremes in
    float64. Rules: 0 regular, 1 NaN (a NaN entry, or k outside [0, n]), 2 k = 0, 3 the
    +inf entries share k, 4 every entry gets 1. The bracket: [u_min - 1, 0] with
    u = (x - m)/t for the sparse links, [u_min - G^{-1}(q) - 1, 1 - G^{-1}(q)] with
    q = kk / finite count for the dense ones, each widened a little against rounding.
    """
    k_ok = (k >= 0.0) & (k <= n.to(tl.float64))
    rule = tl.where(
        (n_nan > 0) | (k_ok == 0),
        1,
        tl.where(k <= 0.0, 2, tl.where(posf >= k, 3, tl.where(finf + posf <= k, 4, 0))),
    )
    regular = rule == 0
    kk = k - posf  # the budget of the finite entries; each +inf entry takes 1
    m = tl.where(regular, vmax, 0.0)
    umin = tl.where(regular, (vmin - m) * inv_t, 0.0)
    if LINK <= 1:
        lo = umin - 1.5
        hi = umin * 0.0 + 0.5
    else:
        q = tl.where(regular, kk / tl.maximum(finf, 1.0), 0.5)
        if LINK == 2:
            ginv = tl.log(q) - tl.log(1.0 - q)
        else:
            ginv = tl.where(q <= 0.5, tl.log(2.0 * q), -tl.log(2.0 * (1.0 - q)))
        lo = umin - ginv - 1.0
        hi = 1.0 - ginv
    return rule, kk, m, lo, hi


@triton.jit(do_not_specialize=["n_row"])
def _forward_kernel(
    x_ptr,
    k_ptr,
    t_ptr,
    y_ptr,
    tau_ptr,
    phase_ptr,
    n_row,
    a_hi,
    a_lo,
    LINK: tl.constexpr,
    LOW: tl.constexpr,
    NARROW: tl.constexpr,
    ITER_LOW: tl.constexpr,
    ITER_F64: tl.constexpr,
    BLOCK: tl.constexpr,
    ONCHIP: tl.constexpr,
    FINISH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * n_row
    yrow = y_ptr + row * n_row
    if FINISH:
        # finishing the split route: a row it solved already is read as empty and left alone
        live = tl.load(phase_ptr + row) != DONE
        n = tl.where(live, n_row, 0)
    else:
        live = True
        n = n_row
    k = tl.load(k_ptr + row).to(tl.float64)
    t = tl.load(t_ptr + row).to(tl.float64)
    a = tl.cast(a_hi, tl.float64) + tl.cast(a_lo, tl.float64)
    offs = tl.arange(0, BLOCK)
    # 1. scan: NaN, +inf and finite counts, finite min and max
    if ONCHIP:
        xt = tl.load(xrow + offs, mask=offs < n, other=float("-inf")).to(LOW)
        fin = (xt > float("-inf")) & (xt < float("inf"))
        n_nan = tl.sum((xt != xt).to(tl.int32), axis=0)
        n_pos = tl.sum((xt == float("inf")).to(tl.int32), axis=0)
        n_fin = tl.sum(fin.to(tl.int32), axis=0)
        vmax = tl.max(tl.where(fin, xt, float("-inf")), axis=0)
        vmin = tl.min(tl.where(fin, xt, float("inf")), axis=0)
    else:
        xt = tl.zeros([BLOCK], LOW)  # not used: chunks are read at every step
        c_nan = tl.zeros([BLOCK], tl.int32)
        c_pos = tl.zeros([BLOCK], tl.int32)
        c_fin = tl.zeros([BLOCK], tl.int32)
        t_max = tl.full([BLOCK], float("-inf"), LOW)
        t_min = tl.full([BLOCK], float("inf"), LOW)
        for start in range(0, n, BLOCK):
            idx = start + offs
            xc = tl.load(xrow + idx, mask=idx < n, other=float("-inf")).to(LOW)
            fc = (xc > float("-inf")) & (xc < float("inf"))
            c_nan += (xc != xc).to(tl.int32)
            c_pos += (xc == float("inf")).to(tl.int32)
            c_fin += fc.to(tl.int32)
            t_max = tl.maximum(t_max, tl.where(fc, xc, float("-inf")))
            t_min = tl.minimum(t_min, tl.where(fc, xc, float("inf")))
        n_nan = tl.sum(c_nan, axis=0)
        n_pos = tl.sum(c_pos, axis=0)
        n_fin = tl.sum(c_fin, axis=0)
        vmax = tl.max(t_max, axis=0)
        vmin = tl.min(t_min, axis=0)
    # 2. the row rules: 0 regular, 1 NaN, 2 k = 0, 3 +inf entries share k, 4 all ones
    posf = n_pos.to(tl.float64)
    inv_t = 1.0 / t
    rule, kk, m, lo, hi = _rules_and_bracket(
        n_nan, posf, n_fin.to(tl.float64), vmin.to(tl.float64), vmax.to(tl.float64), k, n, inv_t, LINK
    )
    regular = rule == 0
    # 3. a float32 phase (on the row held on chip), 4. the float64 phase from there
    s_low = _solve(
        xrow,
        n,
        xt,
        m.to(tl.float32),
        inv_t.to(tl.float32),
        kk.to(tl.float32),
        lo.to(tl.float32),
        hi.to(tl.float32),
        (0.5 * (lo + hi)).to(tl.float32),
        a.to(tl.float32),
        regular,
        LINK,
        tl.float32,
        1.1920928955078125e-07,
        ITER_LOW,
        BLOCK,
        ONCHIP,
        True,
        SCALE_F32,
    )
    # Recentre on c, the float32 (float64) value nearest the rough threshold: x - c is
    # exact near the threshold, so z = (x - c)/t - s keeps its digits however large |x|/t.
    tau_low = m + t * s_low.to(tl.float64)
    c = tau_low.to(LOW).to(tl.float64)
    c = tl.where(regular & (tl.abs(c) < float("inf")), c, m)
    shift = (m - c) * inv_t
    s = _solve(
        xrow,
        n,
        xt,
        c,
        inv_t,
        kk,
        lo + shift,
        hi + shift,
        (tau_low - c) * inv_t,
        a,
        regular,
        LINK,
        tl.float64,
        2.220446049250313e-16,
        ITER_F64,
        BLOCK,
        ONCHIP,
        LINK >= 2,
        SCALE_F64,
    )
    if LINK == 1:
        # A root on a breakpoint x_b (an entry leaving the support), where G = z^a is flat:
        # Newton creeps up to it and stops where y_b = z^a no longer moves the float64 sum,
        # leaving a y_b of 1e-30 that would carry the whole gradient of a hard row. Take
        # x_b itself when it solves the equation at least as well.
        xb = _next_above(xrow, n, xt, c, inv_t, s, BLOCK, ONCHIP)
        s_b = (xb - c) * inv_t
        f_s, _, _ = _row_sums(xrow, n, xt, c, inv_t, s, kk, a, LINK, tl.float64, BLOCK, ONCHIP, SCALE_F64)
        f_b, _, _ = _row_sums(xrow, n, xt, c, inv_t, s_b, kk, a, LINK, tl.float64, BLOCK, ONCHIP, SCALE_F64)
        take = regular & (xb < float("inf")) & (tl.abs(f_b) <= tl.abs(f_s))
        s = tl.where(take, s_b, s)
    tau = c + t * s
    # 5. the mask and the threshold
    SNAP: tl.constexpr = LINK <= 1
    if ONCHIP:
        _write(xt, offs, n, yrow, c, inv_t, s, tau, a, k, posf, rule, LINK, SNAP, NARROW)
    else:
        for start in range(0, n, BLOCK):
            idx = start + offs
            xc = tl.load(xrow + idx, mask=idx < n, other=float("-inf"))
            _write(xc, idx, n, yrow, c, inv_t, s, tau, a, k, posf, rule, LINK, SNAP, NARROW)
    tau = _ruled_tau(tau, rule)
    tl.store(tau_ptr + row, tau, mask=live)


@triton.jit
def _ruled_tau(tau, rule):
    """tau of a row by its rule: tau itself (0), NaN (1), +inf (2, 3) or -inf (4).

    Rules: 0 regular, 1 NaN, 2 k = 0, 3 +inf entries share k, 4 every entry gets 1.
    """
    tau = tl.where(rule == 4, float("-inf"), tl.where((rule == 2) | (rule == 3), float("inf"), tau))
    return tl.where(rule == 1, float("nan"), tau)


@triton.jit
def _backward_coefficient(sh, shv, tau):
    """c = sum h v / sum h (0 without a slope), and whether the row is NaN or set by a rule."""
    c = tl.where(sh > 0.0, shv / tl.where(sh > 0.0, sh, 1.0), 0.0)
    return c, tau != tau, (tau == float("inf")) | (tau == float("-inf"))


@triton.jit
def _abs_z(xrow, idx, n, tau, scale):
    """|z| = |x - tau| / t (scale = 1/t) on a tile of x in float64 (inf at an infinite x and past the end)."""
    xc = tl.load(xrow + idx, mask=idx < n, other=float("-inf")).to(tl.float64)
    return tl.abs((xc - tau) * scale)


@triton.jit
def _min_abs_z(az):
    """The smallest finite |z| of a tile (inf when it has none)."""
    return tl.min(tl.where(az < float("inf"), az, float("inf")), axis=0)


@triton.jit
def _backward_tile(yrow, xrow, vrow, idx, n, a, tau, scale, m, LINK: tl.constexpr, DT: tl.constexpr):
    """A tile's v, slope h and scaled slope w in DT (0 past the row's end).

    Sparse links: h = G'(G^{-1}(y)) from the mask and w = h. Dense links: h = G'(z) at
    z = (x - tau)/t (scale = 1/t) from the forward's input and w = h e^m, that is
    e^(m - |z|) r with r = 1/(1 + e^-|z|)^2 (logistic) or 1/2 (Laplace).
    """
    mask = idx < n
    vc = tl.load(vrow + idx, mask=mask, other=0.0).to(DT)
    if LINK <= 1:
        yc = tl.load(yrow + idx, mask=mask, other=0.0).to(DT)
        h = _slope(yc, LINK, a)
        w = h
    else:
        az = _abs_z(xrow, idx, n, tau, scale).to(DT)
        e = tl.exp(-az)
        s = tl.exp(m - az)
        if LINK == 2:
            r = 1.0 / (1.0 + e)
            h = e * r * r
            w = s * r * r
        else:
            h = 0.5 * e
            w = 0.5 * s
    return vc, h, w


@triton.jit
def _backward_write(gxrow, idx, n, h, vc, scale, c, nan_row, ruled):
    """grad_x = h/t (v - c) on a tile (NaN on a NaN row, 0 on a row set by a rule)."""
    gx = tl.where(h != 0.0, h * scale * (vc - c), 0.0)
    gx = tl.where(nan_row, float("nan"), tl.where(ruled, 0.0, gx))
    tl.store(gxrow + idx, gx.to(gxrow.dtype.element_ty), mask=idx < n)


@triton.jit(do_not_specialize=["n"])
def _backward_kernel(
    y_ptr,
    x_ptr,
    tau_ptr,
    t_ptr,
    v_ptr,
    gx_ptr,
    gk_ptr,
    n,
    a_hi,
    a_lo,
    LINK: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    ONCHIP: tl.constexpr,
):
    """grad_x and grad_k of a row, one program per row (held on chip, or read in chunks).

    c = sum w v / sum w: a dense row's w = h e^m, m its smallest finite |z| (a first
    pass), which does not underflow where every h does; a sparse row's w = h.
    """
    row = tl.program_id(0).to(tl.int64)
    yrow = y_ptr + row * n
    xrow = x_ptr + row * n
    vrow = v_ptr + row * n
    gxrow = gx_ptr + row * n
    tau = tl.load(tau_ptr + row).to(tl.float64)
    t = tl.load(t_ptr + row).to(tl.float64)
    scale64 = 1.0 / t
    a = (tl.cast(a_hi, tl.float64) + tl.cast(a_lo, tl.float64)).to(DT)
    offs = tl.arange(0, BLOCK)
    m = tl.full([], 0.0, tl.float64)
    if LINK >= 2:
        if ONCHIP:
            m = _min_abs_z(_abs_z(xrow, offs, n, tau, scale64))
        else:
            m = tl.full([], float("inf"), tl.float64)
            for start in range(0, n, BLOCK):
                m = tl.minimum(m, _min_abs_z(_abs_z(xrow, start + offs, n, tau, scale64)))
        m = tl.where(m < float("inf"), m, 0.0)
    if ONCHIP:
        vt, h, w = _backward_tile(yrow, xrow, vrow, offs, n, a, tau, scale64, m, LINK, DT)
        sw = tl.sum(w, axis=0)
        swv = tl.sum(tl.where(w != 0.0, w * vt, 0.0), axis=0)
    else:
        acc_w = tl.zeros([BLOCK], DT)
        acc_wv = tl.zeros([BLOCK], DT)
        for start in range(0, n, BLOCK):
            vc, hc, wc = _backward_tile(yrow, xrow, vrow, start + offs, n, a, tau, scale64, m, LINK, DT)
            acc_w += wc
            acc_wv += tl.where(wc != 0.0, wc * vc, 0.0)
        sw = tl.sum(acc_w, axis=0)
        swv = tl.sum(acc_wv, axis=0)
    c, nan_row, ruled = _backward_coefficient(sw, swv, tau)
    scale = scale64.to(DT)
    if ONCHIP:
        _backward_write(gxrow, offs, n, h, vt, scale, c, nan_row, ruled)
    else:
        for start in range(0, n, BLOCK):
            vc, hc, wc = _backward_tile(yrow, xrow, vrow, start + offs, n, a, tau, scale64, m, LINK, DT)
            _backward_write(gxrow, start + offs, n, hc, vc, scale, c, nan_row, ruled)
    gk = tl.where(nan_row, float("nan"), tl.where(ruled, 0.0, c.to(tl.float64)))
    tl.store(gk_ptr + row, gk)


@triton.jit
def _tile_of_program(nb):
    """(row, tile) of this program: the split route's grid is flat, B * nb programs."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // nb, pid % nb


@triton.jit
def _chunk(j, c, chunks, BLOCK: tl.constexpr):
    """The indices of chunk c of tile j (a tile is ``chunks`` chunks of BLOCK entries)."""
    return (j * chunks + c) * BLOCK + tl.arange(0, BLOCK)


@triton.jit(do_not_specialize=["n", "nb", "chunks"])
def _split_scan_kernel(x_ptr, scan_ptr, n, nb, chunks, LOW: tl.constexpr, BLOCK: tl.constexpr):
    """Split route, first pass: a tile's NaN, +inf and finite counts, finite min and max."""
    row, j = _tile_of_program(nb)
    c_nan = tl.zeros([BLOCK], tl.int32)
    c_pos = tl.zeros([BLOCK], tl.int32)
    c_fin = tl.zeros([BLOCK], tl.int32)
    t_max = tl.full([BLOCK], float("-inf"), LOW)
    t_min = tl.full([BLOCK], float("inf"), LOW)
    for ch in range(0, chunks):
        idx = _chunk(j, ch, chunks, BLOCK)
        xc = tl.load(x_ptr + row * n + idx, mask=idx < n, other=float("-inf")).to(LOW)
        fin = (xc > float("-inf")) & (xc < float("inf"))
        c_nan += (xc != xc).to(tl.int32)
        c_pos += (xc == float("inf")).to(tl.int32)
        c_fin += fin.to(tl.int32)
        t_max = tl.maximum(t_max, tl.where(fin, xc, float("-inf")))
        t_min = tl.minimum(t_min, tl.where(fin, xc, float("inf")))
    out = scan_ptr + (row * nb + j) * 5
    tl.store(out, tl.sum(c_nan, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(c_pos, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(c_fin, axis=0).to(tl.float64))
    tl.store(out + 3, tl.min(t_min, axis=0).to(tl.float64))
    tl.store(out + 4, tl.max(t_max, axis=0).to(tl.float64))


@triton.jit
def _split_total(ptr, nb, stride, RBLOCK: tl.constexpr):
    """The sum over a row's tiles of one field of the split route's partials, in tile order."""
    offs = tl.arange(0, RBLOCK)
    acc = tl.zeros([RBLOCK], tl.float64)
    for start in range(0, nb, RBLOCK):
        i = start + offs
        acc += tl.load(ptr + i * stride, mask=i < nb, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _split_extreme(ptr, nb, stride, RBLOCK: tl.constexpr, LARGEST: tl.constexpr):
    """The max (LARGEST) or min over a row's tiles of one field of the split route's partials."""
    offs = tl.arange(0, RBLOCK)
    if LARGEST:
        acc = tl.full([RBLOCK], float("-inf"), tl.float64)
        for start in range(0, nb, RBLOCK):
            i = start + offs
            acc = tl.maximum(acc, tl.load(ptr + i * stride, mask=i < nb, other=float("-inf")))
        out = tl.max(acc, axis=0)
    else:
        acc = tl.full([RBLOCK], float("inf"), tl.float64)
        for start in range(0, nb, RBLOCK):
            i = start + offs
            acc = tl.minimum(acc, tl.load(ptr + i * stride, mask=i < nb, other=float("inf")))
        out = tl.min(acc, axis=0)
    return out


@triton.jit
def _split_point_totals(ptr, nb, W, RBLOCK: tl.constexpr, NPOINT: tl.constexpr):
    """Per evaluation point, the sum over a row's tiles of the split route's partials.

    ``ptr`` points at the row's first tile; a tile holds W fields, the NPOINT points'
    values first. Sums in tile order, so every program of the row gets the same value.
    """
    tiles = tl.arange(0, RBLOCK)[:, None]
    points = tl.arange(0, NPOINT)[None, :]
    acc = tl.zeros([RBLOCK, NPOINT], tl.float64)
    for start in range(0, nb, RBLOCK):
        i = start + tiles
        acc += tl.load(ptr + i * W + points, mask=(i < nb) & (points < NPOINT), other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _split_point_min(ptr, nb, W, RBLOCK: tl.constexpr, NPOINT: tl.constexpr):
    """Per evaluation point, the min over a row's tiles of one field of the partials."""
    tiles = tl.arange(0, RBLOCK)[:, None]
    points = tl.arange(0, NPOINT)[None, :]
    acc = tl.full([RBLOCK, NPOINT], float("inf"), tl.float64)
    for start in range(0, nb, RBLOCK):
        i = start + tiles
        mask = (i < nb) & (points < NPOINT)
        acc = tl.minimum(acc, tl.load(ptr + i * W + points, mask=mask, other=float("inf")))
    return tl.min(acc, axis=0)


@triton.jit
def _split_point_scaled(ptr, mptr, M, nb, W, RBLOCK: tl.constexpr, NPOINT: tl.constexpr):
    """Per evaluation point, sum_j S_j e^(M - m_j) over a row's tiles j.

    S_j is a tile's sum scaled by e^(m_j) (field ``ptr``, m_j field ``mptr``; a tile
    with no finite z has m_j = inf and S_j = 0); M (per point) is at most every m_j.
    """
    tiles = tl.arange(0, RBLOCK)[:, None]
    points = tl.arange(0, NPOINT)[None, :]
    acc = tl.zeros([RBLOCK, NPOINT], tl.float64)
    for start in range(0, nb, RBLOCK):
        i = start + tiles
        mask = (i < nb) & (points < NPOINT)
        part = tl.load(ptr + i * W + points, mask=mask, other=0.0)
        mj = tl.load(mptr + i * W + points, mask=mask, other=float("inf"))
        acc += tl.where(mj < float("inf"), part * tl.exp(M[None, :] - mj), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _multipoint_update(
    at, f, d, size, M, lo, hi, EPS: tl.constexpr, FSTOP: tl.constexpr, NPOINT: tl.constexpr
):
    """One step of the split route's solve from f = sum G - kk, d = sum G' at the points ``at``.

    f, d and ``size`` (f's rounding scale) are each point's sums times e^M (per point).
    Each point moves an end of the bracket [lo, hi] (f(lo) >= 0 >= f(hi)). The stops are
    :func:`_newton_step`'s at the point with the smallest |f| (compared as
    log|f| - M); otherwise the Newton step from the point with the smallest |f| among
    those with a slope (d > 0) is taken when it stays in the bracket, else the bracket's
    middle. Returns (lo, hi, s, done).
    """
    lo = tl.maximum(lo, tl.max(tl.where(f > 0.0, at, float("-inf")), axis=0))
    hi = tl.minimum(hi, tl.min(tl.where(f > 0.0, float("inf"), at), axis=0))
    # (a row that is done still takes the step, on stale sums, and its state is kept)
    af = tl.abs(f)
    err = tl.where(
        f == f, tl.where(af > 0.0, tl.log(tl.where(af > 0.0, af, 1.0)) - M, float("-inf")), float("inf")
    )
    ar = tl.arange(0, NPOINT)
    best = ar == tl.argmin(err, axis=0)
    s = tl.sum(tl.where(best, at, 0.0), axis=0)
    size_best = tl.sum(tl.where(best, size, 0.0), axis=0)
    stop, _, _ = _newton_step(s, tl.sum(tl.where(best, f, 0.0), axis=0), 1.0, size_best, lo, hi, EPS, FSTOP)
    # the Newton step from the best point with a slope (a saturated point has none)
    sloped = tl.where(d > 0.0, err, float("inf"))
    base = ar == tl.argmin(sloped, axis=0)
    base = tl.where(tl.min(sloped, axis=0) < float("inf"), base, best)
    sn = tl.sum(tl.where(base, at, 0.0), axis=0)
    _, delta, tol = _newton_step(
        sn,
        tl.sum(tl.where(base, f, 0.0), axis=0),
        tl.sum(tl.where(base, d, 0.0), axis=0),
        size_best,
        lo,
        hi,
        EPS,
        FSTOP,
    )
    cand = sn + delta
    ok = (tl.abs(delta) <= tol) | ((cand > lo) & (cand < hi))
    new = tl.where(ok, cand, 0.5 * (lo + hi))
    done = stop | (tl.abs(new - sn) <= tol)
    return lo, hi, tl.where(stop, s, new), done


@triton.jit
def _points(s, lo, hi, NPOINT: tl.constexpr):
    """The points a split step evaluates: s, then NPOINT - 1 evenly inside [lo, hi]."""
    i = tl.arange(0, NPOINT).to(tl.float64)
    return tl.where(i == 0.0, s, lo + i * ((hi - lo) / NPOINT))


@triton.jit(do_not_specialize=["n", "nb", "chunks", "B", "src", "dst"])
def _split_step_kernel(
    x_ptr,
    k_ptr,
    t_ptr,
    scan_ptr,
    rc_ptr,
    st_ptr,
    part_ptr,
    n,
    nb,
    chunks,
    B,
    src,
    dst,
    a_hi,
    a_lo,
    LINK: tl.constexpr,
    LOW: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
    NPOINT: tl.constexpr,
    FIRST: tl.constexpr,
):
    """Split route: one step of a row's solve, by every tile of the row at once.

    Every program of the row reduces the tiles' sums of the previous step (in the same
    order, so to the same value), takes the step they call for and writes its own tile's
    sums at the new points; the row's first program writes the new state. The state and
    the sums alternate between two slots (``src`` read, ``dst`` written), so no program
    waits on another within a launch.

    A row goes through the phases of :func:`_forward_kernel`'s solve: 0, a rough solve
    (float32 precision) centred on the row's maximum m; 1, the float64 solve recentred on
    c, the float32 value (float64 for float64 rows) nearest the rough threshold; for the
    power link 2 and 3, the breakpoint check; then DONE. A step evaluates the sums at
    NPOINT points in one read of the tile: the Newton iterate and a grid of the bracket
    (phases 2 and 3 use the first point only).
    """
    row, j = _tile_of_program(nb)
    k = tl.load(k_ptr + row).to(tl.float64)
    t = tl.load(t_ptr + row).to(tl.float64)
    inv_t = 1.0 / t
    a = tl.cast(a_hi, tl.float64) + tl.cast(a_lo, tl.float64)
    W: tl.constexpr = 5 * NPOINT + 1
    rcp = rc_ptr + row * 6
    if FIRST:
        # the row's counts and extremes, then its rules and bracket as _forward_kernel has them
        scan = scan_ptr + row * nb * 5
        n_nan = _split_total(scan, nb, 5, RBLOCK)
        posf = _split_total(scan + 1, nb, 5, RBLOCK)
        finf = _split_total(scan + 2, nb, 5, RBLOCK)
        vmin = _split_extreme(scan + 3, nb, 5, RBLOCK, False)
        vmax = _split_extreme(scan + 4, nb, 5, RBLOCK, True)
        rule, kk, m, lo, hi = _rules_and_bracket(n_nan, posf, finf, vmin, vmax, k, n, inv_t, LINK)
        regular = rule == 0
        if j == 0:
            tl.store(rcp, rule.to(tl.float64))
            tl.store(rcp + 1, kk)
            tl.store(rcp + 2, m)
            tl.store(rcp + 3, lo)
            tl.store(rcp + 4, hi)
            tl.store(rcp + 5, posf)
        phase = tl.where(regular, 0.0, DONE * 1.0)
        s = 0.5 * (lo + hi)
        center = m
        f_s = 0.0 * m
        s_b = 0.0 * m
    else:
        kk = tl.load(rcp + 1)
        m = tl.load(rcp + 2)
        old = st_ptr + (src * B + row) * 7
        phase = tl.load(old)
        lo = tl.load(old + 1)
        hi = tl.load(old + 2)
        s = tl.load(old + 3)
        center = tl.load(old + 4)
        f_s = tl.load(old + 5)
        s_b = tl.load(old + 6)
        parts = part_ptr + (src * B + row) * nb * W
        at = _points(s, lo, hi, NPOINT)
        # f = sum G - kk, d = sum G' and f's size at each point, as _row_sums has them
        if LINK <= 1:
            f = _split_point_totals(parts + NPOINT, nb, W, RBLOCK, NPOINT) - kk
            d = _split_point_totals(parts + 2 * NPOINT, nb, W, RBLOCK, NPOINT)
            size = d * 0.0 + (kk + 1.0)
            M = d * 0.0
        else:
            above = _split_point_totals(parts, nb, W, RBLOCK, NPOINT)
            mz = parts + 4 * NPOINT
            M = _dense_scale(above, _split_point_min(mz, nb, W, RBLOCK, NPOINT), kk, SCALE_F64)
            f = _count_part(above, kk, M) + _split_point_scaled(parts + NPOINT, mz, M, nb, W, RBLOCK, NPOINT)
            d = _split_point_scaled(parts + 2 * NPOINT, mz, M, nb, W, RBLOCK, NPOINT)
            size = _split_point_scaled(parts + 3 * NPOINT, mz, M, nb, W, RBLOCK, NPOINT)
        f_first = tl.sum(tl.where(tl.arange(0, NPOINT) == 0, f, 0.0), axis=0)
        xb = _split_extreme(parts + 5 * NPOINT, nb, W, RBLOCK, False)
        # phases 0 and 1: a step of the rough and of the float64 solve
        lo0, hi0, s0, done0 = _multipoint_update(
            at, f, d, size, M, lo, hi, 1.1920928955078125e-07, True, NPOINT
        )
        lo1, hi1, s1, done1 = _multipoint_update(
            at, f, d, size, M, lo, hi, 2.220446049250313e-16, LINK >= 2, NPOINT
        )
        # the rough solve done: recentre on c, so that x - c is exact near the threshold
        tau_low = m + t * s0
        c = tau_low.to(LOW).to(tl.float64)
        c = tl.where(tl.abs(c) < float("inf"), c, m)
        shift = (m - c) * inv_t
        lo_c = tl.load(rcp + 3) + shift
        hi_c = tl.load(rcp + 4) + shift
        s_c = (tau_low - c) * inv_t
        s_c = tl.where((s_c > lo_c) & (s_c < hi_c), s_c, 0.5 * (lo_c + hi_c))
        in0 = phase == 0.0
        in1 = phase == 1.0
        moved = in0 & done0
        lo = tl.where(moved, lo_c, tl.where(in0, lo0, tl.where(in1, lo1, lo)))
        hi = tl.where(moved, hi_c, tl.where(in0, hi0, tl.where(in1, hi1, hi)))
        center = tl.where(moved, c, center)
        # phase 3: the breakpoint x_b (its sum was taken) when it solves the equation as well
        take = (phase == 3.0) & (tl.abs(f_first) <= tl.abs(f_s))
        s = tl.where(moved, s_c, tl.where(in0, s0, tl.where(in1, s1, tl.where(take, s_b, s))))
        # phase 2 (power link): the sum at s and the next entry above s, x_b, were taken
        in2 = phase == 2.0
        f_s = tl.where(in2, f_first, f_s)
        s_b = tl.where(in2, (xb - center) * inv_t, s_b)
        if LINK == 1:
            after1 = 2.0
        else:
            after1 = DONE * 1.0
        after2 = tl.where(xb < float("inf"), 3.0, DONE * 1.0)
        later = tl.where(in2, after2, tl.where(phase == 3.0, DONE * 1.0, phase))
        phase = tl.where(moved, 1.0, tl.where(in1 & done1, after1, later))
    if j == 0:
        new = st_ptr + (dst * B + row) * 7
        tl.store(new, phase)
        tl.store(new + 1, lo)
        tl.store(new + 2, hi)
        tl.store(new + 3, s)
        tl.store(new + 4, center)
        tl.store(new + 5, f_s)
        tl.store(new + 6, s_b)
    if phase != DONE * 1.0:
        # this tile's sums at the new points (a row that is done reads no entry); phase 3
        # evaluates the breakpoint in place of the iterate
        at = _points(tl.where(phase == 3.0, s_b, s), lo, hi, NPOINT)
        ar = tl.arange(0, NPOINT)
        acc_c = tl.zeros([NPOINT], tl.float64)
        acc_f = tl.zeros([NPOINT], tl.float64)
        acc_d = tl.zeros([NPOINT], tl.float64)
        acc_m = tl.zeros([NPOINT], tl.float64)
        acc_z = tl.full([NPOINT], float("inf"), tl.float64)
        acc_b = tl.full([BLOCK], float("inf"), tl.float64)
        for ch in range(0, chunks):
            idx = _chunk(j, ch, chunks, BLOCK)
            xc = tl.load(x_ptr + row * n + idx, mask=idx < n, other=float("-inf"))
            for i in tl.static_range(NPOINT):
                at_i = tl.sum(tl.where(ar == i, at, 0.0), axis=0)
                point = ar == i
                if LINK <= 1:
                    g, gp = _terms(xc, center, inv_t, at_i, a, LINK, tl.float64)
                    acc_f += tl.where(point, tl.sum(g, axis=0), 0.0)
                    acc_d += tl.where(point, tl.sum(gp, axis=0), 0.0)
                else:
                    # the tile's sums scaled by e^(its smallest |z| so far), rescaled as it falls
                    z = _z(xc, center, inv_t, at_i, tl.float64)
                    m_old = tl.min(tl.where(point, acc_z, float("inf")), axis=0)
                    m_new = tl.minimum(m_old, tl.min(tl.abs(z), axis=0))
                    m_use = tl.where(m_new < float("inf"), m_new, 0.0)
                    keep = tl.where(m_old < float("inf"), tl.exp(m_use - m_old), 0.0)
                    high, frac, mag, gp = _dense_terms(z, m_use, LINK)
                    acc_c += tl.where(point, tl.sum(high, axis=0), 0.0)
                    acc_f = tl.where(point, acc_f * keep + tl.sum(frac, axis=0), acc_f)
                    acc_d = tl.where(point, acc_d * keep + tl.sum(gp, axis=0), acc_d)
                    acc_m = tl.where(point, acc_m * keep + tl.sum(mag, axis=0), acc_m)
                    acc_z = tl.where(point, m_new, acc_z)
            if LINK == 1:
                xv = xc.to(tl.float64)
                above = (xv < float("inf")) & ((xv - center) * inv_t - s > 0.0)
                acc_b = tl.minimum(acc_b, tl.where(above, xv, float("inf")))
        out = part_ptr + ((dst * B + row) * nb + j) * W
        tl.store(out + ar, acc_c)
        tl.store(out + NPOINT + ar, acc_f)
        tl.store(out + 2 * NPOINT + ar, acc_d)
        tl.store(out + 3 * NPOINT + ar, acc_m)
        tl.store(out + 4 * NPOINT + ar, acc_z)
        tl.store(out + 5 * NPOINT, tl.min(acc_b, axis=0))


@triton.jit(do_not_specialize=["n", "nb", "chunks", "B", "src"])
def _split_write_kernel(
    x_ptr,
    k_ptr,
    t_ptr,
    rc_ptr,
    st_ptr,
    y_ptr,
    tau_ptr,
    n,
    nb,
    chunks,
    B,
    src,
    a_hi,
    a_lo,
    LINK: tl.constexpr,
    NARROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Split route, last pass: the mask on a tile of every row the steps solved, and its tau."""
    row, j = _tile_of_program(nb)
    k = tl.load(k_ptr + row).to(tl.float64)
    t = tl.load(t_ptr + row).to(tl.float64)
    a = tl.cast(a_hi, tl.float64) + tl.cast(a_lo, tl.float64)
    rule = tl.load(rc_ptr + row * 6).to(tl.int32)
    posf = tl.load(rc_ptr + row * 6 + 5)
    state = st_ptr + (src * B + row) * 7
    live = tl.load(state) == DONE * 1.0
    s = tl.load(state + 3)
    c = tl.load(state + 4)
    tau = c + t * s
    n_live = tl.where(live, n, 0)
    SNAP: tl.constexpr = LINK <= 1
    for ch in range(0, chunks):
        idx = _chunk(j, ch, chunks, BLOCK)
        xc = tl.load(x_ptr + row * n + idx, mask=idx < n_live, other=float("-inf"))
        _write(xc, idx, n_live, y_ptr + row * n, c, 1.0 / t, s, tau, a, k, posf, rule, LINK, SNAP, NARROW)
    tau = _ruled_tau(tau, rule)
    tl.store(tau_ptr + row, tau, mask=live & (j == 0))


@triton.jit(do_not_specialize=["n", "nb", "chunks"])
def _split_backward_sums_kernel(
    y_ptr,
    x_ptr,
    tau_ptr,
    t_ptr,
    v_ptr,
    part_ptr,
    n,
    nb,
    chunks,
    a_hi,
    a_lo,
    LINK: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Split route of the backward, first pass: a tile's m_j, sum w and sum w v.

    A dense row's w = h e^(m_j), m_j the tile's smallest finite |z| (+inf and zero sums
    where it has none); a sparse row's w = h and m_j = 0.
    """
    row, j = _tile_of_program(nb)
    tau = tl.load(tau_ptr + row).to(tl.float64)
    scale64 = 1.0 / tl.load(t_ptr + row).to(tl.float64)
    a = (tl.cast(a_hi, tl.float64) + tl.cast(a_lo, tl.float64)).to(DT)
    xrow = x_ptr + row * n
    m = tl.full([], 0.0, tl.float64)
    if LINK >= 2:
        m = tl.full([], float("inf"), tl.float64)
        for ch in range(0, chunks):
            m = tl.minimum(m, _min_abs_z(_abs_z(xrow, _chunk(j, ch, chunks, BLOCK), n, tau, scale64)))
    m_used = tl.where(m < float("inf"), m, 0.0)
    acc_w = tl.zeros([BLOCK], DT)
    acc_wv = tl.zeros([BLOCK], DT)
    for ch in range(0, chunks):
        idx = _chunk(j, ch, chunks, BLOCK)
        vc, h, w = _backward_tile(
            y_ptr + row * n, xrow, v_ptr + row * n, idx, n, a, tau, scale64, m_used, LINK, DT
        )
        acc_w += w
        acc_wv += tl.where(w != 0.0, w * vc, 0.0)
    out = part_ptr + (row * nb + j) * 3
    tl.store(out, m)
    tl.store(out + 1, tl.sum(acc_w, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(acc_wv, axis=0).to(tl.float64))


@triton.jit
def _split_scaled_totals(ptr, nb, RBLOCK: tl.constexpr):
    """sum_j S_j e^(m - m_j) and sum_j SV_j e^(m - m_j), m = min_j m_j, over the tiles' (m_j, S_j, SV_j)."""
    m = _split_extreme(ptr, nb, 3, RBLOCK, False)
    offs = tl.arange(0, RBLOCK)
    acc_w = tl.zeros([RBLOCK], tl.float64)
    acc_wv = tl.zeros([RBLOCK], tl.float64)
    for start in range(0, nb, RBLOCK):
        i = start + offs
        live = i < nb
        mj = tl.load(ptr + i * 3, mask=live, other=float("inf"))
        sj = tl.load(ptr + i * 3 + 1, mask=live, other=0.0)
        svj = tl.load(ptr + i * 3 + 2, mask=live, other=0.0)
        f = tl.exp(tl.where(mj < float("inf"), m - mj, float("-inf")))  # 0 for tiles without a slope
        acc_w += tl.where(sj != 0.0, sj * f, 0.0)
        acc_wv += tl.where(svj != 0.0, svj * f, 0.0)
    return tl.sum(acc_w, axis=0), tl.sum(acc_wv, axis=0)


@triton.jit(do_not_specialize=["n", "nb", "chunks"])
def _split_backward_kernel(
    y_ptr,
    x_ptr,
    tau_ptr,
    t_ptr,
    v_ptr,
    part_ptr,
    gx_ptr,
    gk_ptr,
    n,
    nb,
    chunks,
    a_hi,
    a_lo,
    LINK: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    """Split route of the backward, second pass: c from the tiles' sums, then a tile's grad_x."""
    row, j = _tile_of_program(nb)
    tau = tl.load(tau_ptr + row).to(tl.float64)
    t = tl.load(t_ptr + row).to(tl.float64)
    a = (tl.cast(a_hi, tl.float64) + tl.cast(a_lo, tl.float64)).to(DT)
    sw, swv = _split_scaled_totals(part_ptr + row * nb * 3, nb, RBLOCK)
    c, nan_row, ruled = _backward_coefficient(sw.to(DT), swv.to(DT), tau)
    for ch in range(0, chunks):
        idx = _chunk(j, ch, chunks, BLOCK)
        vc, h, w = _backward_tile(
            y_ptr + row * n, x_ptr + row * n, v_ptr + row * n, idx, n, a, tau, 1.0 / t, 0.0, LINK, DT
        )
        _backward_write(gx_ptr + row * n, idx, n, h, vc, (1.0 / t).to(DT), c, nan_row, ruled)
    gk = tl.where(nan_row, float("nan"), tl.where(ruled, 0.0, c.to(tl.float64)))
    tl.store(gk_ptr + row, gk, mask=j == 0)


def interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_forward_kernel, triton.runtime.JITFunction)


def _check_device(x: Tensor) -> None:
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"the Triton kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter "
            f"(set TRITON_INTERPRET=1 before the first Triton call); got a tensor on {x.device}"
        )


def _exponent(link: int, p: float) -> tuple[float, float]:
    """a = 1/(p - 1) of the power link as two float32 parts (kernel scalars are float32)."""
    a = 1.0 / (p - 1.0) if link == POWER else 1.0
    a_hi = struct.unpack("f", struct.pack("f", a))[0]
    return a_hi, a - a_hi


def _warps(block: int) -> int:
    return 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def _onchip_max(dtype: torch.dtype) -> int:
    return ONCHIP_MAX // 2 if dtype == torch.float64 else ONCHIP_MAX


def forward(x: Tensor, k: Tensor, t: Tensor, link: int, p: float) -> tuple[Tensor, Tensor]:
    """The mask y (B, n) in the dtype of x and the thresholds tau (B,) in float64.

    x is float16, bfloat16, float32 or float64; k and t are (B,) per-row tensors.
    """
    _check_device(x)
    B, n = x.shape
    x = x.contiguous()
    k = k.to(device=x.device, dtype=torch.float64).contiguous()
    t = t.to(device=x.device, dtype=torch.float64).contiguous()
    y = torch.empty_like(x)
    tau = torch.empty(B, dtype=torch.float64, device=x.device)
    if B == 0 or n == 0:
        return y, tau.fill_(math.inf)
    wide = x.dtype == torch.float64
    onchip = n <= _onchip_max(x.dtype)
    block = max(16, triton.next_power_of_2(n)) if onchip else CHUNK
    a_hi, a_lo = _exponent(link, p)
    low = tl.float64 if wide else tl.float32
    with _on_device(x):
        phase = _split_forward(x, k, t, y, tau, link, a_hi, a_lo, low) if not onchip else tau
        _forward_kernel[(B,)](
            x,
            k,
            t,
            y,
            tau,
            phase,
            n,
            a_hi,
            a_lo,
            LINK=link,
            LOW=low,
            NARROW=not wide,
            ITER_LOW=ITER_LOW,
            ITER_F64=ITER_F64,
            BLOCK=block,
            ONCHIP=onchip,
            FINISH=not onchip,
            num_warps=_warps(block),
            enable_fp_fusion=False,
        )
    return y, tau


def _split_forward(
    x: Tensor, k: Tensor, t: Tensor, y: Tensor, tau: Tensor, link: int, a_hi: float, a_lo: float, low
) -> Tensor:
    """The split route on rows too long for the chip: SPLIT_STEPS steps, each by every tile.

    Writes y and tau of the rows it solves and returns every row's phase; the rows not done
    after SPLIT_STEPS steps are left to :func:`_forward_kernel` (``FINISH``), which solves
    them from the start, one program per row.
    """
    B, n = x.shape
    nb, chunks = _tiles(n)
    scan = torch.empty(B, nb, 5, dtype=torch.float64, device=x.device)
    rows = torch.empty(B, 6, dtype=torch.float64, device=x.device)
    state = torch.empty(2, B, 7, dtype=torch.float64, device=x.device)
    # zeros: a row done reads its tiles' sums at every step without using them
    parts = torch.zeros(2, B, nb, 5 * SPLIT_POINTS + 1, dtype=torch.float64, device=x.device)
    grid = (B * nb,)
    opts = dict(BLOCK=SPLIT_BLOCK, num_warps=_warps(SPLIT_BLOCK), enable_fp_fusion=False)
    _split_scan_kernel[grid](x, scan, n, nb, chunks, LOW=low, **opts)
    for step in range(SPLIT_STEPS):
        _split_step_kernel[grid](
            x,
            k,
            t,
            scan,
            rows,
            state,
            parts,
            n,
            nb,
            chunks,
            B,
            (step + 1) % 2,
            step % 2,
            a_hi,
            a_lo,
            LINK=link,
            LOW=low,
            RBLOCK=_rblock(nb),
            NPOINT=SPLIT_POINTS,
            FIRST=step == 0,
            **opts,
        )
    last = (SPLIT_STEPS - 1) % 2
    _split_write_kernel[grid](
        x, k, t, rows, state, y, tau, n, nb, chunks, B, last, a_hi, a_lo,
        LINK=link, NARROW=x.dtype != torch.float64, **opts,
    )  # fmt: skip
    return state[last, :, 0].contiguous()


def _tiles(n: int) -> tuple[int, int]:
    """(tiles per row, chunks of SPLIT_BLOCK per tile): at most SPLIT_TILES tiles a row."""
    chunks = triton.cdiv(triton.cdiv(n, SPLIT_BLOCK), SPLIT_TILES)
    return triton.cdiv(n, chunks * SPLIT_BLOCK), chunks


def _rblock(nb: int) -> int:
    return max(16, min(256, triton.next_power_of_2(nb)))


def backward(
    y: Tensor, tau: Tensor, t: Tensor, grad_y: Tensor, link: int, p: float, x: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """grad_x = h/t (v - c) (B, n) in the dtype of y and grad_k = c (B,) in float64.

    x, the forward's input rows, is required for the dense links (2, 3) and unread by the
    sparse ones.
    """
    _check_device(y)
    B, n = y.shape
    if link >= LOGISTIC and x is None:
        raise ValueError(f"the backward of link {link} needs the forward's input x")
    y = y.contiguous()
    xs = x.contiguous() if link >= LOGISTIC else y
    v = grad_y.to(y.dtype).contiguous()
    tau = tau.to(torch.float64).contiguous()
    t = t.to(device=y.device, dtype=torch.float64).contiguous()
    grad_x = torch.empty_like(y)
    grad_k = torch.empty(B, dtype=torch.float64, device=y.device)
    if B == 0 or n == 0:
        return grad_x, grad_k.zero_()
    onchip = n <= min(CHUNK, _onchip_max(y.dtype))
    block = max(16, triton.next_power_of_2(n)) if onchip else CHUNK
    a_hi, a_lo = _exponent(link, p)
    if n > _onchip_max(y.dtype):
        nb, chunks = _tiles(n)
        parts = torch.empty(B, nb, 3, dtype=torch.float64, device=y.device)
        opts = dict(
            LINK=link, DT=tl.float64, BLOCK=SPLIT_BLOCK, num_warps=_warps(SPLIT_BLOCK), enable_fp_fusion=False
        )
        with _on_device(y):
            _split_backward_sums_kernel[(B * nb,)](y, xs, tau, t, v, parts, n, nb, chunks, a_hi, a_lo, **opts)
            _split_backward_kernel[(B * nb,)](
                y, xs, tau, t, v, parts, grad_x, grad_k, n, nb, chunks, a_hi, a_lo, RBLOCK=_rblock(nb), **opts
            )
        return grad_x, grad_k
    with _on_device(y):
        _backward_kernel[(B,)](
            y,
            xs,
            tau,
            t,
            v,
            grad_x,
            grad_k,
            n,
            a_hi,
            a_lo,
            LINK=link,
            DT=tl.float64,
            BLOCK=block,
            ONCHIP=onchip,
            num_warps=_warps(block),
            enable_fp_fusion=False,
        )
    return grad_x, grad_k


class _on_device:
    """Makes x's CUDA device current for the launch (nothing for CPU tensors)."""

    def __init__(self, x: Tensor) -> None:
        self.guard = torch.cuda.device(x.device) if x.device.type == "cuda" else None

    def __enter__(self) -> None:
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.guard is not None:
            self.guard.__exit__(*exc)
