"""PAV and the fused soft_rank / soft_sort passes on CPU, compiled by numba.

Imported on first use (:func:`softtopk._backend.kernels`), so that ``import softtopk``
does not load numba. See :mod:`softtopk.isotonic._pav` for the solver's contract.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from .._backend import numba_threads
from ._pav import TIE_EPS


@numba.njit(cache=True, nogil=True)
def _logaddexp(a, b):  # pragma: no cover
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a))


@numba.njit(cache=True, nogil=True)
def _pav_stack(y, wt, weighted, kl):  # pragma: no cover
    """Stack PAV of one float64 row (decreasing fit, strict pooling).

    Returns (nb, s1, s2, s_val, s_start): the number of blocks and one stack entry per
    block, s_start (first position; s_start[nb] = n), s_val (value) and the block
    statistics s1, s2: (sum w y, sum w) for L2, (LSE(y + lw), LSE(lw)) for KL (wt
    holds w for L2, log w for KL).
    """
    n = y.shape[0]
    s1 = np.empty(n, dtype=np.float64)
    s2 = np.empty(n, dtype=np.float64)
    s_val = np.empty(n, dtype=np.float64)
    s_start = np.empty(n + 1, dtype=np.int64)
    s_abs = np.empty(n, dtype=np.float64)
    # Differences at rounding level (a pooled mean of tied values vs the next tie) are
    # not violations: tied entries are not pooled because of rounding. The rounding of a
    # block's value scales with its largest entry, so the margin of a pair of blocks is
    # TIE_EPS times the larger abs(y) in the two (a row-wide margin would hide real
    # violations among small entries of a row that also holds huge ones).
    top = -1
    for i in range(n):
        yi = y[i]
        if kl:
            c = wt[i] if weighted else 0.0
            a = yi + c
        else:
            c = wt[i] if weighted else 1.0
            a = c * yi
        val = yi
        start = i
        big = abs(yi)
        while top >= 0 and s_val[top] < val - TIE_EPS * max(big, s_abs[top]):
            if kl:
                a = _logaddexp(a, s1[top])
                c = _logaddexp(c, s2[top])
            else:
                a += s1[top]
                c += s2[top]
            start = s_start[top]
            big = max(big, s_abs[top])
            top -= 1
            val = a - c if kl else a / c
        top += 1
        s1[top] = a
        s2[top] = c
        s_val[top] = val
        s_start[top] = start
        s_abs[top] = big
    s_start[top + 1] = n
    return top + 1, s1, s2, s_val, s_start


@numba.njit(cache=True, parallel=True)
def _pav_rows(y, wt, weighted, kl, v, bid, aux):  # pragma: no cover
    B, n = y.shape
    for b in numba.prange(B):
        yy = np.empty(n, dtype=np.float64)
        ww = np.empty(n if weighted else 1, dtype=np.float64)
        for i in range(n):
            yy[i] = y[b, i]
            if weighted:
                ww[i] = wt[b, i]
        nb, s1, s2, s_val, s_start = _pav_stack(yy, ww, weighted, kl)
        for j in range(nb):
            for i in range(s_start[j], s_start[j + 1]):
                v[b, i] = s_val[j]
                bid[b, i] = j
                aux[b, i] = s1[j] if kl else s2[j]


@numba.njit(cache=True, nogil=True)
def _radix_argsort(bits, masks, digit_bits, descending, key, key2, perm, perm2, count):  # pragma: no cover
    """Stable LSD radix argsort of one row of floats, given as their bit patterns.

    ``bits`` is the row viewed as uint32 or uint64; ``masks`` = (sign bit, all bits)
    of that width as uint64. Each float is mapped to an unsigned key with the same
    order (negative: flip every bit; otherwise: set the sign bit), reversed for
    ``descending``; then ceil(width / digit_bits) stable counting passes, skipping a
    pass where every key has the same digit. O(n + 2^digit_bits) per pass. Ties keep
    their input order. Writes the sorting permutation into ``perm`` (int32).
    """
    n = bits.shape[0]
    sign = masks[0]
    full = masks[1]
    for i in range(n):
        u = np.uint64(bits[i])
        if u & sign:
            u = ~u & full
        else:
            u = u | sign
        if descending:
            u = full - u
        key[i] = u
        perm[i] = i
    radix = 1 << digit_bits
    dmask = np.uint64(radix - 1)
    width = 64 if full == np.uint64(0xFFFFFFFFFFFFFFFF) else 32
    shift = 0
    while shift < width:
        sh = np.uint64(shift)
        count[:] = 0
        for i in range(n):
            count[np.intp((key[i] >> sh) & dmask)] += 1
        if count[np.intp((key[0] >> sh) & dmask)] != n:  # otherwise the pass is the identity
            total = 0
            for d in range(radix):
                c = count[d]
                count[d] = total
                total += c
            for i in range(n):
                d = np.intp((key[i] >> sh) & dmask)
                j = count[d]
                count[d] = j + 1
                key2[j] = key[i]
                perm2[j] = perm[i]
            key, key2 = key2, key
            perm, perm2 = perm2, perm
        shift += digit_bits
    return perm


@numba.njit(cache=True, nogil=True)
def _sorted_row(x, bits, masks, descending, perm_out):  # pragma: no cover
    """Sort one row (radix on the bit patterns): writes perm_out, returns x[perm] (float64)."""
    n = x.shape[0]
    digit_bits = 8 if n < 4096 else 11
    key = np.empty(n, dtype=np.uint64)
    key2 = np.empty(n, dtype=np.uint64)
    perm = np.empty(n, dtype=np.int32)
    perm2 = np.empty(n, dtype=np.int32)
    count = np.empty(1 << digit_bits, dtype=np.int64)
    p = _radix_argsort(bits, masks, digit_bits, descending, key, key2, perm, perm2, count)
    s = np.empty(n, dtype=np.float64)
    for i in range(n):
        perm_out[i] = p[i]
        s[i] = np.float64(x[p[i]])
    return s


@numba.njit(cache=True, parallel=True)
def _rank_forward(x, bits, masks, c, kl, log_rho, out, perm, bid, coef):  # pragma: no cover
    """soft_rank of rows x (B, n) in one pass per row: sort, PAV, write in input order.

    The row is sorted so that z = c * x decreases (perm: the sorting permutation).
    out[perm[j]] = z_j - v_j (L2) or exp(z_j - v_j) (KL), with v the decreasing
    isotonic regression of z - rho (L2) or of z - log rho with log-weights log rho
    (KL; ``log_rho`` = log(n, ..., 1), shared by the rows); coef_j = 1/|B| (L2) or
    softmax_B(z)_j = exp(z_j - v_B) / sum_B rho (KL) for the backward.
    """
    B, n = x.shape
    for b in numba.prange(B):
        z = _sorted_row(x[b], bits[b], masks, c > 0, perm[b])
        y = np.empty(n, dtype=np.float64)
        for i in range(n):
            z[i] *= c
            y[i] = z[i] - (log_rho[i] if kl else np.float64(n - i))
        nb, s1, s2, s_val, s_start = _pav_stack(y, log_rho, kl, kl)
        for j in range(nb):
            start = s_start[j]
            size = s_start[j + 1] - start
            # sum of rho = n - i over the block's positions i = start, ..., start + size - 1
            rho_sum = size * (n - start) - 0.5 * size * (size - 1)
            for i in range(start, start + size):
                bid[b, i] = j
                if kl:
                    e = math.exp(z[i] - s_val[j])
                    out[b, perm[b, i]] = e
                    # a block of one: softmax is exactly 1 (keeps saturated gradients at 0)
                    coef[b, i] = e / rho_sum if size > 1 else 1.0
                else:
                    out[b, perm[b, i]] = z[i] - s_val[j]
                    coef[b, i] = 1.0 / size


@numba.njit(cache=True, parallel=True)
def _sort_forward(x, bits, masks, descending, inv_t, kl, out, perm, bid, coef):  # pragma: no cover
    """soft_sort of rows x (B, n) in one pass per row: out_j = sign (w_j - v_j), w = rho / t.

    s = sign * x sorted decreasingly (sign = +1 for ``descending``, -1 otherwise);
    v is the decreasing isotonic regression of w - s (L2; coef_j = 1/|B|) or its KL
    version with log-weights s (coef_j = softmax_B(s)_j).
    """
    B, n = x.shape
    sign = 1.0 if descending else -1.0
    for b in numba.prange(B):
        lw = _sorted_row(x[b], bits[b], masks, descending, perm[b])
        y = np.empty(n, dtype=np.float64)
        for i in range(n):
            lw[i] *= sign
            y[i] = np.float64(n - i) * inv_t - lw[i]
        nb, s1, s2, s_val, s_start = _pav_stack(y, lw, kl, kl)
        for j in range(nb):
            size = s_start[j + 1] - s_start[j]
            for i in range(s_start[j], s_start[j + 1]):
                bid[b, i] = j
                out[b, i] = sign * (np.float64(n - i) * inv_t - s_val[j]) + 0.0
                coef[b, i] = math.exp(lw[i] - s2[j]) if kl else 1.0 / size


@numba.njit(cache=True, parallel=True)
def _spread_backward(
    g, factor, has_factor, perm, read_sorted, bid, coef, alpha, beta, out
):  # pragma: no cover
    """out[perm[j]] = alpha u_j + beta coef_j sum_{i in B(j)} u_i over sorted positions j.

    u_j = (g * factor)[perm[j]] (g in input order), or g[j] with ``read_sorted`` (g
    already in sorted order). Blocks are the runs of equal ``bid``.
    """
    B, n = g.shape
    for b in numba.prange(B):
        start = 0
        while start < n:
            end = start + 1
            while end < n and bid[b, end] == bid[b, start]:
                end += 1
            total = 0.0
            for j in range(start, end):
                r = j if read_sorted else perm[b, j]
                u = np.float64(g[b, r])
                if has_factor:
                    u *= np.float64(factor[b, r])
                total += u
            for j in range(start, end):
                r = j if read_sorted else perm[b, j]
                u = np.float64(g[b, r])
                if has_factor:
                    u *= np.float64(factor[b, r])
                out[b, perm[b, j]] = alpha * u + beta * coef[b, j] * total
            start = end


def pav_numba(y: Tensor, w: Tensor | None, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """Stack PAV on CPU rows (B, n) of float32/float64, compiled by numba.

    Args:
        y: (B, n) targets.
        w: (B, n) weights (L2) or log-weights (KL), or None for unit weights.
        loss: ``"l2"`` or ``"kl"``.

    Returns:
        (v, bid, aux) as described in the module docstring; v and aux in y's dtype.
    """
    yn = y.detach().contiguous().numpy()
    weighted = w is not None
    wn = w.detach().to(y.dtype).contiguous().numpy() if weighted else np.ones((1, 1), dtype=yn.dtype)
    v = np.empty_like(yn)
    aux = np.empty_like(yn)
    bid = np.empty(yn.shape, dtype=np.int64)
    if yn.size:
        with numba_threads():
            _pav_rows(yn, wn, weighted, loss == "kl", v, bid, aux)
    return torch.from_numpy(v), torch.from_numpy(bid), torch.from_numpy(aux)
