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

* ``pav_numba`` (:mod:`softtopk.isotonic._pav_cpu`, loaded on first use): the sequential
  stack PAV, compiled by numba (float64 accumulators, rows in parallel); O(n) per row.
  Used for CPU tensors.
* :func:`pav_torch`: rounds of tensor ops that pool every violating pair of adjacent
  blocks at once (pooling violators in any order reaches the same solution). Each round
  is O(n) work on the whole batch and runs on any device without a copy to the host;
  the number of rounds is usually small (the longest chain of pools that cascade) but
  is n in the worst case (e.g. an increasing row followed by one very small entry).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Relative tolerance (times the largest abs(y) in the two blocks compared) below which a
#: difference of block values is rounding, not a violation.
TIE_EPS = 8.0 * 2.220446049250313e-16

# ------------------------------------------------------------- tensor-op blocks (any device)


def segment_sum(values: Tensor, bid: Tensor) -> Tensor:
    """Per-block sums of (B, n) ``values`` indexed by block ids; (B, n), unused slots 0."""
    return torch.zeros_like(values).scatter_add(-1, bid, values)


def segment_logsumexp(values: Tensor, bid: Tensor) -> Tensor:
    """Per-block log-sum-exp (max-shifted); (B, n), unused slots -inf."""
    # The shift is a constant for autograd: the gradient of a log-sum-exp does not depend on it.
    peak = torch.full_like(values, -math.inf).scatter_reduce(
        -1, bid, values.detach(), "amax", include_self=True
    )
    peak_at = peak.gather(-1, bid)
    peak_at = torch.where(torch.isfinite(peak_at), peak_at, 0.0)
    total = torch.zeros_like(values).scatter_add(-1, bid, torch.exp(values - peak_at))
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
    tie_b = tie.to(f64)  # per block: the rounding margin of its value
    viol[:, 1:] = valid[:, 1:] & (val[:, :-1] < val[:, 1:] - tie_b[:, :-1].maximum(tie_b[:, 1:]))
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
    # Per entry, the rounding margin of its value: a block's margin is the largest of its
    # entries', and a pair of blocks violates the order only beyond the larger of the two
    # (a row-wide margin would hide violations among small entries next to huge ones).
    tie = 8.0 * torch.finfo(y.dtype).eps * y.detach().abs()
    rounds = 0
    while True:
        bid = start.cumsum(-1) - 1
        v, aux = block_values(y, w, bid, loss)
        rounds += 1
        if n < 2:
            break
        tie_b = torch.zeros_like(tie).scatter_reduce(-1, bid, tie, "amax", include_self=False)
        tie_v = tie_b.gather(-1, bid)
        violation = start[:, 1:] & (v[:, :-1] < v[:, 1:] - tie_v[:, :-1].maximum(tie_v[:, 1:]))
        if rounds >= limit or not bool(violation.any()):
            break
        start &= ~_jump_merges(bid, v, prefix, pos, steps, loss, y, tie_b)
    return v, bid, aux, rounds
