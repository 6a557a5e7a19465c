"""Pool Adjacent Violators: exact isotonic regression with its own block bookkeeping.

Every solver here fits a **decreasing** sequence v_1 >= ... >= v_n to rows (B, n)
(increasing fits reverse the row first) and returns, per position,

* ``v``: the solution;
* ``bid``: the index of the block (maximal run of pooled entries) the position belongs
  to, 0, 1, ... from the left; the backward uses this partition, never a comparison of
  solution values;
* ``aux``: a block statistic the backward needs: the block's weight sum (L2), or the
  block's log-sum-exp of y + log w (KL).

Two blocks are pooled only when they *strictly* violate the order (v_left < v_right).
Adjacent blocks whose values are exactly equal stay apart, so that tied but unpooled
entries (e.g. two saturated entries of a top-k mask with equal scores) keep their own,
correct, derivative instead of a spurious block average.

Losses (w are positive weights; the KL route takes lw = log w):

* ``"l2"``: sum_i w_i (v_i - y_i)^2 / 2; the value of a block is its weighted mean
  sum_B w y / sum_B w.
* ``"kl"``: sum_i w_i (exp(y_i - v_i) - (y_i - v_i) - 1); the value of a block is
  LSE_B(y + lw) - LSE_B(lw) (Blondel et al. 2020, computed with stable log-add-exp).

Two implementations:

* :func:`pav_numba`: the sequential stack PAV, compiled by numba (float64 accumulators,
  rows in parallel with ``prange``); O(n) per row. Used for CPU tensors.
* :func:`pav_torch`: rounds of tensor ops that pool every violating pair of adjacent
  blocks at once (pooling violators in any order reaches the same solution). Each round
  is O(n) work on the whole batch and runs on any device without a copy to the host;
  the number of rounds is usually small (the longest chain of pools that cascade) but
  is n in the worst case (e.g. an increasing row followed by one very small entry).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency; the torch rounds below keep things working without it.
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba does not install
    numba = None
    HAVE_NUMBA = False


#: Relative tolerance (times max|y| of the row) below which a difference of block values
#: is rounding, not a violation.
TIE_EPS = 8.0 * 2.220446049250313e-16

# ------------------------------------------------------------------ numba kernels (CPU)

if HAVE_NUMBA:

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
        # Differences at rounding level (a pooled mean of tied values vs the next tie) are
        # not violations: tied entries are not pooled because of rounding.
        tie = 0.0
        for i in range(n):
            tie = max(tie, abs(y[i]))
        tie *= TIE_EPS
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
            while top >= 0 and s_val[top] < val - tie:
                if kl:
                    a = _logaddexp(a, s1[top])
                    c = _logaddexp(c, s2[top])
                else:
                    a += s1[top]
                    c += s2[top]
                start = s_start[top]
                top -= 1
                val = a - c if kl else a / c
            top += 1
            s1[top] = a
            s2[top] = c
            s_val[top] = val
            s_start[top] = start
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
    def _radix_argsort(
        bits, masks, digit_bits, descending, key, key2, perm, perm2, count
    ):  # pragma: no cover
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


@contextlib.contextmanager
def numba_threads() -> Iterator[None]:
    """Run numba's parallel loops on as many threads as torch uses, and leave torch's count alone.

    numba would otherwise use every core whatever ``torch.set_num_threads`` said, which
    oversubscribes a machine shared with other work and makes timings against torch unfair.
    With numba's OpenMP threading layer (the usual one next to torch) a parallel launch also
    resets the OpenMP thread count that torch reads; it is put back afterwards.
    """
    torch_threads = torch.get_num_threads()
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def pav_numba(y: Tensor, w: Tensor | None, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """Stack PAV on CPU rows (B, n) of float32/float64, compiled by numba.

    Args:
        y: (B, n) targets.
        w: (B, n) weights (L2) or log-weights (KL), or None for unit weights.
        loss: ``"l2"`` or ``"kl"``.

    Returns:
        (v, bid, aux) as described in the module docstring; v and aux in y's dtype.
    """
    if not HAVE_NUMBA:  # pragma: no cover
        raise RuntimeError("numba is not installed; use pav_torch")
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


# ------------------------------------------------------------- tensor-op blocks (any device)


def segment_sum(values: Tensor, bid: Tensor) -> Tensor:
    """Per-block sums of (B, n) ``values`` indexed by block ids; (B, n), unused slots 0."""
    return torch.zeros_like(values).scatter_add_(-1, bid, values)


def segment_logsumexp(values: Tensor, bid: Tensor) -> Tensor:
    """Per-block log-sum-exp (max-shifted); (B, n), unused slots -inf."""
    peak = torch.full_like(values, -math.inf).scatter_reduce_(-1, bid, values, "amax", include_self=True)
    peak_at = peak.gather(-1, bid)
    peak_at = torch.where(torch.isfinite(peak_at), peak_at, 0.0)
    total = torch.zeros_like(values).scatter_add_(-1, bid, torch.exp(values - peak_at))
    finite_peak = torch.where(torch.isfinite(peak), peak, 0.0)
    return finite_peak + torch.log(total)


def block_values(y: Tensor, w: Tensor | None, bid: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """The optimal value of each block of a fixed partition, and the backward's statistic.

    Returns (v, aux) per position: for L2 the weighted block mean and the block weight;
    for KL the value LSE_B(y + lw) - LSE_B(lw) and LSE_B(y + lw).
    """
    if loss == "l2":
        ones = torch.ones_like(y) if w is None else w
        num = segment_sum(ones * y, bid)
        den = segment_sum(ones, bid)
        den_at = den.gather(-1, bid)
        return num.gather(-1, bid) / den_at, den_at
    lw = torch.zeros_like(y) if w is None else w
    a = segment_logsumexp(y + lw, bid).gather(-1, bid)
    c = segment_logsumexp(lw, bid).gather(-1, bid)
    return a - c, a


def _prefix(y: Tensor, w: Tensor | None, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """Inclusive prefix statistics over positions, float64.

    L2: (sum w y, sum w, sum |w y|); KL: (cumulative LSE of y + lw, of lw, unused).
    """
    f64 = torch.float64
    if loss == "l2":
        ones = torch.ones_like(y) if w is None else w
        wy = (ones * y).to(f64)
        return torch.cumsum(wy, -1), torch.cumsum(ones.to(f64), -1), torch.cumsum(wy.abs(), -1)
    lw = torch.zeros_like(y) if w is None else w
    a = torch.logcumsumexp((y + lw).to(f64), -1)
    return a, torch.logcumsumexp(lw.to(f64), -1), a


def _range_value(
    prefix: tuple[Tensor, Tensor, Tensor], a: Tensor, e: Tensor, loss: str
) -> tuple[Tensor, Tensor]:
    """Value of the pooled positions [a, e] from prefix statistics, and a bound on its error.

    Differences of prefix statistics cancel when the range holds little of the prefix's
    mass; the bound says how far to trust the value (infinite when nothing is left).
    """
    p1, p2, p3 = prefix
    # Worst-case accumulated rounding of an n-term prefix statistic, relative to its size.
    eps = 4.0 * 2.220446049250313e-16 * p1.shape[-1]
    hi1, hi2 = p1.gather(-1, e), p2.gather(-1, e)
    prev = (a - 1).clamp(min=0)
    lo1, lo2 = p1.gather(-1, prev), p2.gather(-1, prev)
    first = a == 0
    if loss == "l2":
        num = torch.where(first, hi1, hi1 - lo1)
        den = torch.where(first, hi2, hi2 - lo2)
        err = eps * (p3.gather(-1, e) + hi2 * (num / den).abs()) / den
        return num / den, err

    def lse_diff(hi: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
        frac = 0.0 - torch.expm1(torch.clamp(lo - hi, max=0.0))  # share of the range in the prefix (no -0.0)
        value = torch.where(first, hi, hi + torch.log(frac))
        rel = eps * (1.0 + hi.abs()) / frac  # relative error of frac
        err = torch.where(rel < 1e-3, 2.0 * rel, torch.inf)  # NaN-safe: NaN fails the test
        return value, torch.where(first, eps * (1.0 + hi.abs()), err)

    v1, e1 = lse_diff(hi1, lo1)
    v2, e2 = lse_diff(hi2, lo2)
    return v1 - v2, e1 + e2


#: Alternating right/left extensions per round in the tensor-op PAV.
ALTERNATIONS = 4


def _jump_merges(
    bid: Tensor,
    v: Tensor,
    prefix: tuple[Tensor, Tensor, Tensor],
    pos: Tensor,
    steps: int,
    loss: str,
    y: Tensor,
    tie: Tensor,
) -> Tensor:
    """Block starts to remove in one round: every violating pair with its absorbable runs.

    For each violating boundary k (v_{k-1} < v_k, blocks indexed by k), the pair
    {k-1, k} is pooled, and extended
    * right through the ordered run up to the block before the next violating pair, as
      long as the pooled value stays below the next block's value, and
    * left through the ordered run after the previous pair's right extension, as long as
      the pooled value stays above the previous block's value.
    Both extents are binary searches on float64 prefix statistics (the conditions are
    monotone along an ordered run), with a margin so that only clear violations pool.
    Every pool is a pool of violators in some order, so the PAV solution is unchanged.
    """
    B, n = bid.shape
    f64 = torch.float64
    k = pos
    nblocks = bid[:, -1:] + 1
    valid = k < nblocks
    first = torch.full_like(bid, n - 1).scatter_reduce_(-1, bid, pos, "amin", include_self=False)
    last = torch.zeros_like(bid).scatter_reduce_(-1, bid, pos, "amax", include_self=False)
    val = torch.zeros_like(v).scatter_(-1, bid, v).to(f64)
    viol = torch.zeros_like(valid)
    viol[:, 1:] = valid[:, 1:] & (val[:, :-1] < val[:, 1:] - tie)
    margin = 1e-9 * y.abs().amax(-1, keepdim=True).to(f64) + 1e-300
    # Previous / next violating boundary of each block index.
    prev_v = torch.where(viol, k, -1)
    prev_v = torch.cat([torch.full_like(prev_v[:, :1], -1), prev_v[:, :-1].cummax(-1).values], -1)
    big = n + 1
    next_v = torch.where(viol, k, big).flip(-1).cummin(-1).values.flip(-1)
    next_v = torch.cat([next_v[:, 1:], torch.full_like(next_v[:, :1], big)], -1)
    top = nblocks - 1
    clamp = lambda t: t.clamp(0, n - 1)  # noqa: E731
    has_prev, has_next = prev_v >= 0, next_v <= n
    left = (k - 1).clamp(min=0)
    right = k.clone()
    for _ in range(ALTERNATIONS):
        # Right: largest r in [right, R] with blocks right+1..r absorbed by [first(left), ...],
        # R = the block before the next pair's (left-extended) group.
        a = first.gather(-1, left)
        limit = torch.where(has_next, left.gather(-1, clamp(next_v)) - 1, top)
        lo, hi = right, limit.maximum(right)
        for _ in range(steps):
            mid = (lo + hi + 1) // 2
            pooled, err = _range_value(prefix, a, last.gather(-1, clamp(mid - 1)), loss)
            ok = (pooled + err < val.gather(-1, clamp(mid)) - margin) & (mid <= hi)
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok | (mid > hi), hi, mid - 1)
        right = lo
        # Left: smallest l in [L, left] with blocks l..left-1 absorbed by [..., last(right)],
        # L = the block after the previous pair's (right-extended) group.
        e = last.gather(-1, right)
        floor = torch.where(has_prev, right.gather(-1, clamp(prev_v)) + 1, 0).minimum(left)
        lo, hi = floor, left
        for _ in range(steps):
            mid = (lo + hi) // 2
            pooled, err = _range_value(prefix, first.gather(-1, clamp(mid + 1)), e, loss)
            ok = (pooled - err > val.gather(-1, clamp(mid)) + margin) | (mid >= hi)
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid + 1).minimum(hi)
        left = hi
    # Remove the starts of blocks left+1 .. right of every violating k (ranges may touch).
    diff = torch.zeros(B, n + 1, dtype=torch.int64, device=bid.device)
    one = viol.to(torch.int64)
    diff.scatter_add_(-1, torch.where(viol, left + 1, n), one)
    diff.scatter_add_(-1, torch.where(viol, right + 1, n), -one)
    remove_k = (diff[:, :n].cumsum(-1) > 0) & valid
    remove = torch.zeros_like(valid).scatter_(-1, torch.where(remove_k, first, 0), remove_k)
    remove[:, 0] = False
    return remove


def pav_torch(
    y: Tensor, w: Tensor | None, loss: str, max_rounds: int | None = None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """PAV by rounds of tensor ops, exact, on any device.

    Each round computes the exact block values of the current partition (segment sums)
    and finds every block that strictly violates the order with its left neighbour. Such a
    block pools its neighbour and, in the same round, keeps absorbing blocks further left
    as long as the merged value still exceeds theirs (a binary search over the run of
    ordered blocks to its left, on float64 prefix sums, with a safety margin so that
    rounding never decides a pool). Pooling violators in any order reaches the PAV
    solution, so the result is exact; the jumps make the number of rounds small (a long
    cascade of pools takes one round instead of one per pool). The loop stops when no
    violation is left (one boolean read per round).

    Returns:
        (v, bid, aux, rounds).
    """
    B, n = y.shape
    device = y.device
    start = torch.ones(B, n, dtype=torch.bool, device=device)
    limit = n + 1 if max_rounds is None else max_rounds
    prefix = _prefix(y, w, loss)
    pos = torch.arange(n, device=device).expand(B, n)
    steps = max(1, math.ceil(math.log2(n + 1)))
    tie = 8.0 * torch.finfo(y.dtype).eps * y.abs().amax(-1, keepdim=True)
    rounds = 0
    while True:
        bid = start.cumsum(-1) - 1
        v, aux = block_values(y, w, bid, loss)
        rounds += 1
        if n < 2:
            break
        violation = start[:, 1:] & (v[:, :-1] < v[:, 1:] - tie)
        if rounds >= limit or not bool(violation.any()):
            break
        start &= ~_jump_merges(bid, v, prefix, pos, steps, loss, y, tie)
    return v, bid, aux, rounds
