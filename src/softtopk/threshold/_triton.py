"""The threshold family in Triton: one program per row, no host synchronisation.

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
4. the same iteration in float64 from there, recentred on c, the value of the row's
   dtype nearest that rough threshold, so that x - c is exact near tau and
   z = (x - c)/t - s keeps its digits however large |x|/t is. It takes one to three
   steps: for p = 2 a Newton step is the closed form of the linear piece it starts on,
   (sum_S x - t (k - U)) / |S| over the active entries S and the U saturated ones, so
   it ends exactly (for p < 2 a root on the value of an entry, where G is flat, is
   taken exactly);
5. write y = G((x - tau)/t) (sparse links: zero within rounding of the threshold) and
   tau.

No step reads a value on the host: k, t and every decision stay on the device.

Rows of at most :data:`ONCHIP_MAX` entries are held in registers for the whole solve;
longer rows are read from memory in chunks of :data:`CHUNK` at every step (still one
program per row).

Backward of a row: with h = G'(G^{-1}(y)) (the slope from the mask value),
grad_x = h/t (v - c), c = <h, v>/sum h, grad_k = c, in float64 whatever the row's dtype
(in float32 the products h v of a nearly hard row fall into the subnormal range, where
c = <h, v>/sum h loses its digits).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

CLIP, POWER, LOGISTIC, LAPLACE = 0, 1, 2, 3

#: Rows with at most this many entries are held on chip (registers) for the whole solve;
#: float64 rows at most half as many.
ONCHIP_MAX = 32768
#: Chunk of a longer row read per step, and of the backward's passes.
CHUNK = 4096
#: Steps of the float32 phase and of the float64 phase at most (each stops early once
#: converged; a rejected Newton step halves the bracket).
ITER_LOW = 64
ITER_F64 = 100


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
def _terms(xc, center, scale, s, a, LINK: tl.constexpr, DT: tl.constexpr):
    """G and G' at z = (x - center) scale - s on a tile (non-finite entries contribute 0)."""
    xv = xc.to(DT)
    valid = (xv > float("-inf")) & (xv < float("inf"))
    z = tl.where(valid, (xv - center) * scale - s, float("-inf"))
    return _link(z, LINK, a)


@triton.jit
def _row_sums(
    xrow,
    n,
    xt,
    center,
    scale,
    s,
    a,
    LINK: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    ONCHIP: tl.constexpr,
):
    """sum G(z) and sum G'(z) over the row, z = (x - center) scale - s, accumulated in DT."""
    if ONCHIP:
        g, gp = _terms(xt, center, scale, s, a, LINK, DT)
        f = tl.sum(g, axis=0)
        d = tl.sum(gp, axis=0)
    else:
        offs = tl.arange(0, BLOCK)
        acc_g = tl.zeros([BLOCK], DT)
        acc_d = tl.zeros([BLOCK], DT)
        for start in range(0, n, BLOCK):
            idx = start + offs
            xc = tl.load(xrow + idx, mask=idx < n, other=float("-inf"))
            g, gp = _terms(xc, center, scale, s, a, LINK, DT)
            acc_g += g
            acc_d += gp
        f = tl.sum(acc_g, axis=0)
        d = tl.sum(acc_d, axis=0)
    return f, d


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
):
    """Safeguarded Newton for sum G((x - center) scale - s) = kk in s on [lo, hi], from s.

    f(lo) >= 0 >= f(hi). At most ITER steps; stops when the bracket or the step is below
    the precision EPS (with FSTOP also when |f| is), or at once when ``active`` is false.
    FSTOP suits a rough solve, and the dense links, whose slope h = G'(G^{-1}(y)) is a
    continuous function of y: for the sparse ones an entry y = 1e-15 left by a rough tau
    instead of 0 would carry the whole gradient of a hard row.
    """
    s = tl.where((s > lo) & (s < hi), s, 0.5 * (lo + hi))
    dx_old = hi - lo
    done = active == 0
    it = 0
    while (it < ITER) & (done == 0):
        f, d = _row_sums(xrow, n, xt, center, scale, s, a, LINK, DT, BLOCK, ONCHIP)
        f = f - kk
        above = f > 0.0
        lo = tl.where(above, s, lo)
        hi = tl.where(above, hi, s)
        stop = (f == 0.0) | (hi - lo <= 2.0 * EPS * (tl.abs(lo) + tl.abs(hi)))
        if FSTOP:
            # f within the rounding of the sum: where the row is nearly hard (sum G' tiny)
            # the iterates would otherwise wander in the noise
            stop = stop | (tl.abs(f) <= 4.0 * EPS * (kk + 1.0))
        has_d = d > 0.0
        delta = tl.where(has_d, f / tl.where(has_d, d, 1.0), float("inf"))
        cand = s + delta
        tol = 4.0 * EPS * (tl.abs(s) + 1.0)
        # a Newton step below the precision ends the iteration (s + delta may round to s)
        tiny = tl.abs(delta) <= tol
        ok = tiny | ((cand > lo) & (cand < hi) & (2.0 * tl.abs(delta) < tl.abs(dx_old)))
        new = tl.where(ok, cand, 0.5 * (lo + hi))
        delta = new - s
        small = tl.abs(delta) <= tol
        s = tl.where(stop, s, new)
        done = stop | small
        dx_old = delta
        it += 1
    return s


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


@triton.jit(do_not_specialize=["n"])
def _forward_kernel(
    x_ptr,
    k_ptr,
    t_ptr,
    y_ptr,
    tau_ptr,
    n,
    a_hi,
    a_lo,
    LINK: tl.constexpr,
    LOW: tl.constexpr,
    NARROW: tl.constexpr,
    ITER_LOW: tl.constexpr,
    ITER_F64: tl.constexpr,
    BLOCK: tl.constexpr,
    ONCHIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * n
    yrow = y_ptr + row * n
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
    nf = n.to(tl.float64)
    posf = n_pos.to(tl.float64)
    finf = n_fin.to(tl.float64)
    k_ok = (k >= 0.0) & (k <= nf)
    rule = tl.where(
        (n_nan > 0) | (k_ok == 0),
        1,
        tl.where(k <= 0.0, 2, tl.where(posf >= k, 3, tl.where(finf + posf <= k, 4, 0))),
    )
    regular = rule == 0
    kk = k - posf  # the budget of the finite entries; each +inf entry takes 1
    m = tl.where(regular, vmax.to(tl.float64), 0.0)
    inv_t = 1.0 / t
    umin = tl.where(regular, (vmin.to(tl.float64) - m) * inv_t, 0.0)
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
    )
    if LINK == 1:
        # A root on a breakpoint x_b (an entry leaving the support), where G = z^a is flat:
        # Newton creeps up to it and stops where y_b = z^a no longer moves the float64 sum,
        # leaving a y_b of 1e-30 that would carry the whole gradient of a hard row. Take
        # x_b itself when it solves the equation at least as well.
        xb = _next_above(xrow, n, xt, c, inv_t, s, BLOCK, ONCHIP)
        s_b = (xb - c) * inv_t
        f_s, _ = _row_sums(xrow, n, xt, c, inv_t, s, a, LINK, tl.float64, BLOCK, ONCHIP)
        f_b, _ = _row_sums(xrow, n, xt, c, inv_t, s_b, a, LINK, tl.float64, BLOCK, ONCHIP)
        take = regular & (xb < float("inf")) & (tl.abs(f_b - kk) <= tl.abs(f_s - kk))
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
    tau = tl.where(rule == 4, float("-inf"), tl.where((rule == 2) | (rule == 3), float("inf"), tau))
    tau = tl.where(rule == 1, float("nan"), tau)
    tl.store(tau_ptr + row, tau)


@triton.jit(do_not_specialize=["n"])
def _backward_kernel(
    y_ptr,
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
    row = tl.program_id(0).to(tl.int64)
    yrow = y_ptr + row * n
    vrow = v_ptr + row * n
    gxrow = gx_ptr + row * n
    tau = tl.load(tau_ptr + row).to(tl.float64)
    t = tl.load(t_ptr + row).to(tl.float64)
    a = (tl.cast(a_hi, tl.float64) + tl.cast(a_lo, tl.float64)).to(DT)
    offs = tl.arange(0, BLOCK)
    if ONCHIP:
        mask = offs < n
        yt = tl.load(yrow + offs, mask=mask, other=0.0).to(DT)
        vt = tl.load(vrow + offs, mask=mask, other=0.0).to(DT)
        h = _slope(yt, LINK, a)
        sh = tl.sum(h, axis=0)
        shv = tl.sum(tl.where(h != 0.0, h * vt, 0.0), axis=0)
    else:
        acc_h = tl.zeros([BLOCK], DT)
        acc_hv = tl.zeros([BLOCK], DT)
        for start in range(0, n, BLOCK):
            idx = start + offs
            mask = idx < n
            yc = tl.load(yrow + idx, mask=mask, other=0.0).to(DT)
            vc = tl.load(vrow + idx, mask=mask, other=0.0).to(DT)
            hc = _slope(yc, LINK, a)
            acc_h += hc
            acc_hv += tl.where(hc != 0.0, hc * vc, 0.0)
        sh = tl.sum(acc_h, axis=0)
        shv = tl.sum(acc_hv, axis=0)
    c = tl.where(sh > 0.0, shv / tl.where(sh > 0.0, sh, 1.0), 0.0)
    nan_row = tau != tau
    ruled = (tau == float("inf")) | (tau == float("-inf"))
    scale = (1.0 / t).to(DT)
    if ONCHIP:
        gx = tl.where(h != 0.0, h * scale * (vt - c), 0.0)
        gx = tl.where(nan_row, float("nan"), tl.where(ruled, 0.0, gx))
        tl.store(gxrow + offs, gx.to(gxrow.dtype.element_ty), mask=offs < n)
    else:
        for start in range(0, n, BLOCK):
            idx = start + offs
            mask = idx < n
            yc = tl.load(yrow + idx, mask=mask, other=0.0).to(DT)
            vc = tl.load(vrow + idx, mask=mask, other=0.0).to(DT)
            hc = _slope(yc, LINK, a)
            gx = tl.where(hc != 0.0, hc * scale * (vc - c), 0.0)
            gx = tl.where(nan_row, float("nan"), tl.where(ruled, 0.0, gx))
            tl.store(gxrow + idx, gx.to(gxrow.dtype.element_ty), mask=mask)
    gk = tl.where(nan_row, float("nan"), tl.where(ruled, 0.0, c.to(tl.float64)))
    tl.store(gk_ptr + row, gk)


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
    with _on_device(x):
        _forward_kernel[(B,)](
            x,
            k,
            t,
            y,
            tau,
            n,
            a_hi,
            a_lo,
            LINK=link,
            LOW=tl.float64 if wide else tl.float32,
            NARROW=not wide,
            ITER_LOW=ITER_LOW,
            ITER_F64=ITER_F64,
            BLOCK=block,
            ONCHIP=onchip,
            num_warps=_warps(block),
        )
    return y, tau


def backward(y: Tensor, tau: Tensor, t: Tensor, grad_y: Tensor, link: int, p: float) -> tuple[Tensor, Tensor]:
    """grad_x = h/t (v - c) (B, n) in the dtype of y and grad_k = c (B,) in float64."""
    _check_device(y)
    B, n = y.shape
    y = y.contiguous()
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
    with _on_device(y):
        _backward_kernel[(B,)](
            y,
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
