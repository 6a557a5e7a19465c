"""Hard top-k on CPU by threshold selection: numba kernels, rows in parallel.

This module is imported on first use (numba is loaded then, not at ``import softtopk``).
The kernels read the raw bits of the scores (float16 and bfloat16 as int16, float32 as
int32, float64 as int64), so the values they write are bit-identical to the input.
Every entry gets an integer key that orders it as ``torch.topk`` does: the float order,
-0.0 equal to 0.0, every NaN equal to every other NaN and above +inf (``largest=True``)
or below -inf (``largest=False``, where the key is negated: NaN is never preferred to a
number). Ties between equal keys go to the lowest index.

Selection of a row of n entries, k of them kept:

* k <= 2 on rows of at most ``PACKED_ROW`` entries (keys of at most 32 bits): one pass of
  a min and a max on integers packing the key and the index, without branches;
* k <= ``SMALL_K``: one pass that keeps the k best so far in order (insertion; an entry
  is compared with the current k-th best only);
* otherwise a lower bound of the k-th key from a strided sample (its r-th largest key,
  r chosen so that at least k entries lie above it with overwhelming probability), one
  pass collecting the entries at or above it in index order, the k-th key among those
  few by quickselect, and the kept entries in index order; a row whose sample misled
  (fewer than k candidates) is collected again in full. For float32 and float64 the
  collecting pass compares floats and computes the keys of the candidates only;
* sorted output: the kept entries sorted by key (descending) and index (ascending).
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Rows keeping at most this many entries use the one-pass insertion.
SMALL_K = 16
#: Rows at most this long keep k <= 2 entries by min and max on packed (key, index)
#: integers, for keys of at most 32 bits (float32, float16, bfloat16).
PACKED_ROW = 128
#: Rows at most this long skip the sample: every entry is a candidate.
SHORT = 4096
#: Size of the strided sample.
SAMPLE = 1024

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _key(bits, magmask, infbits, sign):  # pragma: no cover - compiled
    """The order key of one entry from its raw bits (sign = 1: largest, -1: smallest)."""
    b = np.int64(bits)
    mag = b & magmask
    neg = b >> 63  # 0 or -1: negate the magnitude of negative numbers without a branch
    key = (mag ^ neg) - neg
    key = infbits + 1 if mag > infbits else key
    return sign * key


@_jit
def _kth_largest(a, m, r, seed):  # pragma: no cover - compiled
    """The r-th largest (1-based) of a[:m], by three-way quickselect (a is reordered)."""
    lo = 0
    hi = m  # the answer lies in a[lo:hi] at rank r within it
    state = np.uint64(seed) * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    while True:
        if hi - lo <= 16:
            # insertion sort (descending) of the short range
            for i in range(lo + 1, hi):
                v = a[i]
                j = i - 1
                while j >= lo and a[j] < v:
                    a[j + 1] = a[j]
                    j -= 1
                a[j + 1] = v
            return a[lo + r - 1]
        state = state * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
        span = np.uint64(hi - lo)
        p0 = a[lo + np.int64((state >> np.uint64(33)) % span)]
        state = state * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
        p1 = a[lo + np.int64((state >> np.uint64(33)) % span)]
        state = state * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
        p2 = a[lo + np.int64((state >> np.uint64(33)) % span)]
        pivot = max(min(p0, p1), min(max(p0, p1), p2))
        # a[lo:gt] > pivot, a[gt:i] == pivot, a[lt+1:hi] < pivot (Dijkstra's three-way)
        gt = lo
        i = lo
        lt = hi - 1
        while i <= lt:
            v = a[i]
            if v > pivot:
                a[i] = a[gt]
                a[gt] = v
                gt += 1
                i += 1
            elif v < pivot:
                a[i] = a[lt]
                a[lt] = v
                lt -= 1
            else:
                i += 1
        n_gt = gt - lo
        n_eq = lt + 1 - gt
        if r <= n_gt:
            hi = gt
        elif r <= n_gt + n_eq:
            return pivot
        else:
            r -= n_gt + n_eq
            lo = lt + 1


@_jit
def _sort_kept(keys, idx, vals, k):  # pragma: no cover - compiled
    """Sorts k kept entries, given in index order, by key descending (stable: index ascending)."""
    if k <= 32:
        for i in range(1, k):
            kv = keys[i]
            iv = idx[i]
            vv = vals[i]
            j = i - 1
            while j >= 0 and keys[j] < kv:
                keys[j + 1] = keys[j]
                idx[j + 1] = idx[j]
                vals[j + 1] = vals[j]
                j -= 1
            keys[j + 1] = kv
            idx[j + 1] = iv
            vals[j + 1] = vv
        return
    order = np.argsort(-keys[:k], kind="mergesort")
    i2 = idx[:k].copy()
    v2 = vals[:k].copy()
    for j in range(k):
        idx[j] = i2[order[j]]
        vals[j] = v2[order[j]]


@_jit
def _small_k_rows(
    x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx, start, stop
):  # pragma: no cover # noqa: E501
    """k <= SMALL_K: one pass per row keeping the k best so far, in (key desc, index asc) order.

    ``x`` holds the values (float32/float64) and ``xb`` their bits; an entry's key is
    computed only when a float comparison with the current k-th best lets it through
    (``floats``; for 16-bit inputs, where x is xb, every key is computed).
    """
    n = xb.shape[1]
    keys = np.empty(k, dtype=np.int64)
    last = k - 1
    for b in range(start, stop):
        for i in range(k):
            key = _key(xb[b, i], magmask, infbits, sign)
            j = i - 1
            while j >= 0 and keys[j] < key:
                keys[j + 1] = keys[j]
                idx[b, j + 1] = idx[b, j]
                j -= 1
            keys[j + 1] = key
            idx[b, j + 1] = i
        worst = keys[last]
        wf = x[b, idx[b, last]]
        for i in range(k, n):
            if floats:
                v = x[b, i]
                # necessary for a better key (NaN passes; a NaN k-th best lets all through)
                if sign > 0:
                    if v <= wf:
                        continue
                elif v >= wf:
                    continue
            key = _key(xb[b, i], magmask, infbits, sign)
            if key > worst:  # an equal key has a higher index: not better
                j = last - 1
                while j >= 0 and keys[j] < key:
                    keys[j + 1] = keys[j]
                    idx[b, j + 1] = idx[b, j]
                    j -= 1
                keys[j + 1] = key
                idx[b, j + 1] = i
                worst = keys[last]
                wf = x[b, idx[b, last]]
        if not sorted_:  # index order
            for i in range(1, k):
                iv = idx[b, i]
                j = i - 1
                while j >= 0 and idx[b, j] > iv:
                    idx[b, j + 1] = idx[b, j]
                    j -= 1
                idx[b, j + 1] = iv
        for j in range(k):
            vals[b, j] = xb[b, idx[b, j]]


@_jit
def _packed_rows(xb, k, sorted_, magmask, infbits, sign, vals, idx, start, stop):  # pragma: no cover
    """k <= 2 on short rows with keys of at most 32 bits, by min and max, without branches.

    The key and the index of an entry travel packed in one integer, (key << 16) | (65535
    - index), whose order is (key descending, index ascending). On a short row whether an
    entry enters the k best is as likely as not, and a mispredicted branch costs more
    than the min and the max.
    """
    n = xb.shape[1]
    below = np.int64(-(1 << 62))
    for b in range(start, stop):
        first = below
        second = below
        for i in range(n):
            key = (_key(xb[b, i], magmask, infbits, sign) << 16) | (65535 - i)
            second = max(min(key, first), second)
            first = max(key, first)
        i0 = 65535 - (first & 65535)
        if k == 1:
            idx[b, 0] = i0
        else:
            i1 = 65535 - (second & 65535)
            if sorted_ or i0 < i1:
                idx[b, 0] = i0
                idx[b, 1] = i1
            else:
                idx[b, 0] = i1
                idx[b, 1] = i0
        for j in range(k):
            vals[b, j] = xb[b, idx[b, j]]


@_jit
def _collect_keys(xb, lower, magmask, infbits, sign, ck, ci):  # pragma: no cover - compiled
    """Entries with key >= lower, in index order, into ck/ci (their count)."""
    m = 0
    for i in range(xb.shape[0]):
        key = _key(xb[i], magmask, infbits, sign)
        if key >= lower:
            ck[m] = key
            ci[m] = i
            m += 1
    return m


@_jit
def _collect_above(x, xb, thr, magmask, infbits, ck, ci):  # pragma: no cover - compiled
    """Entries not below the float ``thr`` (NaN included), in index order (largest=True)."""
    m = 0
    for i in range(x.shape[0]):
        if not (x[i] < thr):
            ck[m] = _key(xb[i], magmask, infbits, 1)
            ci[m] = i
            m += 1
    return m


@_jit
def _collect_below(x, xb, thr, magmask, infbits, ck, ci):  # pragma: no cover - compiled
    """Entries not above the float ``thr`` (NaN excluded), in index order (largest=False)."""
    m = 0
    for i in range(x.shape[0]):
        if x[i] <= thr:
            ck[m] = _key(xb[i], magmask, infbits, -1)
            ci[m] = i
            m += 1
    return m


@_jit
def _large_k_row(x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx, ck, ci, seed):  # noqa: E501  # pragma: no cover
    """k > SMALL_K: sample bracket, candidate collection, quickselect among the candidates.

    ck and ci have room for every entry of the row.
    """
    n = xb.shape[0]
    floor_key = -(infbits + 2)  # below every key
    m = -1
    if n > SHORT:
        step = n // SAMPLE
        sample = np.empty(SAMPLE, dtype=np.int64)
        for j in range(SAMPLE):
            sample[j] = _key(xb[j * step], magmask, infbits, sign)
        expected = k * SAMPLE / n
        r = int(expected + 4.0 * math.sqrt(expected) + 4.0)
        if r < SAMPLE:
            lower = _kth_largest(sample.copy(), SAMPLE, r, seed)
            if not floats:
                m = _collect_keys(xb, lower, magmask, infbits, sign, ck, ci)
            else:
                pos = 0
                while sample[pos] != lower:
                    pos += 1
                thr = x[pos * step]  # an entry whose key is the bound
                if sign > 0:
                    m = _collect_above(x, xb, thr, magmask, infbits, ck, ci)
                else:
                    m = _collect_below(x, xb, thr, magmask, infbits, ck, ci)
    if m < k:  # no bound, or the sample misled (too few above it): every entry is a candidate
        m = _collect_keys(xb, floor_key, magmask, infbits, sign, ck, ci)
    work = ck[:m].copy()
    kth = _kth_largest(work, m, k, seed)
    n_gt = 0
    for j in range(m):
        if ck[j] > kth:
            n_gt += 1
    ties = k - n_gt  # entries equal to the k-th key that are kept: the first ones
    keys = np.empty(k, dtype=np.int64)
    out = 0
    for j in range(m):
        key = ck[j]
        if key > kth or (key == kth and ties > 0):
            if key == kth:
                ties -= 1
            keys[out] = key
            idx[out] = ci[j]
            vals[out] = xb[ci[j]]
            out += 1
    if sorted_:
        _sort_kept(keys, idx, vals, k)


@_jit
def _rows(x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx, start, stop):  # pragma: no cover
    if k == 0 or start >= stop:
        return
    n = xb.shape[1]
    if k <= 2 and magmask <= 0x7FFFFFFF and n <= PACKED_ROW:
        _packed_rows(xb, k, sorted_, magmask, infbits, sign, vals, idx, start, stop)
    elif k <= SMALL_K:
        _small_k_rows(x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx, start, stop)
    else:
        ck = np.empty(n, dtype=np.int64)
        ci = np.empty(n, dtype=np.int64)
        for b in range(start, stop):
            _large_k_row(
                x[b], xb[b], k, sorted_, floats, magmask, infbits, sign, vals[b], idx[b], ck, ci, b + 1
            )


@numba.njit(cache=True, parallel=True)
def topk(x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx, chunks):  # pragma: no cover
    """Top-k of every row of ``x`` (B, n) into ``vals`` (B, k, raw bits) and ``idx`` (B, k).

    ``xb`` holds the raw bits of x (x itself for 16-bit inputs, with ``floats`` False).
    The rows are split into ``chunks`` runs that threads take in parallel.
    """
    B = x.shape[0]
    chunks = max(1, min(B, chunks))
    per = (B + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        _rows(x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx, ch * per, min(B, (ch + 1) * per))


@_jit
def topk_serial(x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx):  # pragma: no cover - compiled
    """:func:`topk` on the calling thread (small batches)."""
    _rows(x, xb, k, sorted_, floats, magmask, infbits, sign, vals, idx, 0, x.shape[0])


@_jit
def _fill_mask(x, K, kv, idx, y, start, stop):  # pragma: no cover - compiled
    """y[b] = the mask of the K best of row b, sorted: clip(k_b - j, 0, 1) on the j-th."""
    n = x.shape[1]
    for b in range(start, stop):
        for i in range(n):
            y[b, i] = 0.0
        top = x[b, idx[b, 0]]
        if top != top:  # a row with a NaN has it first: the row is NaN
            for i in range(n):
                y[b, i] = math.nan
            continue
        for j in range(K):
            i = idx[b, j]
            w = min(max(kv[b] - j, 0.0), 1.0)
            y[b, i] = 0.0 if x[b, i] == -math.inf else w  # -inf is never selected


@numba.njit(cache=True, parallel=True)
def mask(x, xb, K, kv, magmask, infbits, y, chunks):  # pragma: no cover - compiled
    """The hard top-k mask of float32/float64 rows x (B, n) into y, K = ceil(max k) >= 1.

    Row b keeps weight clip(k_b - j, 0, 1) on its j-th largest entry (ties to the lowest
    index, NaN above +inf), never on -inf; a row holding a NaN is NaN.
    """
    B = x.shape[0]
    vals = np.empty((B, K), dtype=xb.dtype)
    idx = np.empty((B, K), dtype=np.int64)
    chunks = max(1, min(B, chunks))
    per = (B + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        lo = ch * per
        hi = min(B, (ch + 1) * per)
        _rows(x, xb, K, True, True, magmask, infbits, 1, vals, idx, lo, hi)
        _fill_mask(x, K, kv, idx, y, lo, hi)


@_jit
def mask_serial(x, xb, K, kv, magmask, infbits, y):  # pragma: no cover - compiled
    """:func:`mask` on the calling thread (small batches)."""
    B = x.shape[0]
    vals = np.empty((B, K), dtype=xb.dtype)
    idx = np.empty((B, K), dtype=np.int64)
    _rows(x, xb, K, True, True, magmask, infbits, 1, vals, idx, 0, B)
    _fill_mask(x, K, kv, idx, y, 0, B)
