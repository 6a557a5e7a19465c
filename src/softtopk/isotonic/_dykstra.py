"""Dykstra's alternating projections for L2 isotonic regression, in tensor ops.

The chain constraints v_1 >= v_2 >= ... >= v_n split into two sets whose projections
are independent per pair: C_odd = {v_0 >= v_1, v_2 >= v_3, ...} and C_even =
{v_1 >= v_2, v_3 >= v_4, ...} (0-based). Projecting onto either set (in the weighted
norm) replaces each violating pair by its weighted mean. Dykstra's iteration

    y = P_odd(x + p),   p <- x + p - y,   x = P_even(y + q),   q <- y + q - x

converges to the projection onto the intersection (Sander et al. 2023, section 5), but
slowly: about 2 B^2 iterations for a pooled block of B entries. So the iterate is never
returned on faith. Every ``check_every`` iterations the partition suggested by the
iterate (adjacent entries closer than ``tol`` times the row's scale, and if that fails,
than ``tol`` times their own magnitude) is *certified*:

1. the exact optimal value of every block of that partition is computed (its weighted
   mean);
2. the partition is optimal iff those values are non-increasing and, inside every block,
   every prefix has a weighted mean at most the block's mean (no block could be split
   into a better feasible pair).

A certified row gets the exact block means (so Dykstra equals PAV to rounding once it
reports convergence) and a partition split at exact ties (a prefix whose mean equals the
block mean), as PAV's strict pooling would give. Rows not certified within ``max_iter``
iterations return the last iterate and are reported as not converged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._pav import block_values, segment_sum


def _pair_project(z: Tensor, wz: Tensor) -> Tensor:
    """Projects consecutive pairs (z_0, z_1), (z_2, z_3), ... of the last dim onto z_a >= z_b."""
    m = z.shape[-1] // 2 * 2
    if m == 0:
        return z
    pairs = z[..., :m].unflatten(-1, (m // 2, 2))
    weights = wz[..., :m].unflatten(-1, (m // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    wa, wb = weights[..., 0], weights[..., 1]
    mean = (wa * a + wb * b) / (wa + wb)
    violated = a < b
    projected = torch.stack([torch.where(violated, mean, a), torch.where(violated, mean, b)], -1)
    return torch.cat([projected.flatten(-2), z[..., m:]], -1)


def _project_odd(z: Tensor, w: Tensor) -> Tensor:
    return _pair_project(z, w)


def _project_even(z: Tensor, w: Tensor) -> Tensor:
    if z.shape[-1] < 3:
        return z
    return torch.cat([z[..., :1], _pair_project(z[..., 1:], w[..., 1:])], -1)


def certify(y: Tensor, w: Tensor, start: Tensor, rel: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checks a candidate partition and returns its exact solution.

    Args:
        y: (B, n) targets.
        w: (B, n) positive weights.
        start: (B, n) bool, True where a block starts (start[:, 0] is True).
        rel: relative slack for rounding in the comparisons (times the largest abs(y) of
            the blocks compared).

    Returns:
        (ok (B,), v (B, n), bid (B, n), aux (B, n)): whether the partition is optimal,
        and the block means, block ids and block weights of the partition refined at exact
        ties.
    """
    bid = start.cumsum(-1) - 1
    v, _ = block_values(y, w, bid, "l2")
    # The slack of a comparison scales with the largest entry of the blocks involved (the
    # rounding of their means), not with the row's: a row holding 1e15 and 0.1 must still
    # order its small entries.
    mag = y.abs().clamp(min=torch.finfo(y.dtype).tiny)
    block_mag = torch.zeros_like(mag).scatter_reduce(-1, bid, mag, "amax", include_self=False)
    slack = rel * block_mag.gather(-1, bid)
    ordered = (v[:, :-1] >= v[:, 1:] - slack[:, :-1].maximum(slack[:, 1:])).all(-1)
    # Prefix sums inside each block: global cumulative sums minus their value at the block
    # start, of the entries centred on their block's mean (the sums of raw entries would
    # carry the rounding of a huge block into the small ones after it).
    f64 = torch.float64
    cw = torch.cumsum(w.to(f64), -1)
    cwc = torch.cumsum((w * (y - v)).to(f64), -1)
    first = torch.arange(y.shape[-1], device=y.device).expand_as(bid)
    first = torch.zeros_like(bid).scatter_reduce_(-1, bid, first, "amin", include_self=False).gather(-1, bid)
    before_w = torch.where(first > 0, cw.gather(-1, (first - 1).clamp(min=0)), 0.0)
    before_wc = torch.where(first > 0, cwc.gather(-1, (first - 1).clamp(min=0)), 0.0)
    gap = ((cwc - before_wc) / (cw - before_w)).to(y.dtype)  # prefix mean - block mean
    # The last entry of a block has prefix mean == block mean; only internal cuts matter.
    last = torch.ones_like(start)
    last[:, :-1] = start[:, 1:]
    inside_ok = ((gap <= slack) | last).all(-1)
    ok = ordered & inside_ok
    # Refine at exact ties: a cut after position i whose prefix has the block's mean, to
    # the rounding of that mean (a few ulps of the block's largest entry, not the order
    # check's slack: a cut inside that slack would change the block values, and the top-k
    # route divides them by t).
    tie = 4.0 * torch.finfo(y.dtype).eps * block_mag.gather(-1, bid)
    tie_cut = ~last & (gap.abs() <= tie)
    refined = start.clone()
    refined[:, 1:] |= tie_cut[:, :-1]
    bid = refined.cumsum(-1) - 1
    v, aux = block_values(y, w, bid, "l2")
    return ok, v, bid, aux


def _proposal(x: Tensor, p: Tensor, q: Tensor, gap: Tensor) -> Tensor:
    """Block starts suggested by the iterate x and the dual residuals p (odd pairs), q (even).

    ``gap`` (B, n) is each entry's closeness tolerance; a pair takes the larger of its two.

    A pair (i, i+1) is proposed as pooled when the iterate holds it (nearly) equal *and*
    its constraint is active, i.e. the last projection onto it moved the pair (its dual
    residual is non-zero). Closeness alone would pool nearly tied entries that are in
    order (e.g. two saturated entries of a top-k row 1e-7 apart), a partition the
    certificate rightly rejects forever.
    """
    B, n = x.shape
    start = torch.ones(B, n, dtype=torch.bool, device=x.device)
    if n < 2:
        return start
    close = (x[:, :-1] - x[:, 1:]).abs() <= gap[:, :-1].maximum(gap[:, 1:])
    i = torch.arange(n - 1, device=x.device)
    dual = torch.where(i % 2 == 0, p[:, :-1], q[:, :-1]) != 0
    start[:, 1:] = ~(close & dual)
    return start


def dykstra(
    y: Tensor, w: Tensor | None, max_iter: int, tol: float, check_every: int = 8
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decreasing L2 isotonic regression of rows (B, n) by Dykstra's projections.

    Args:
        y: (B, n) targets.
        w: (B, n) positive weights or None.
        max_iter: the most Dykstra iterations (one odd and one even projection each).
        tol: adjacent entries of the iterate closer than ``tol * max|y|`` are proposed as
            pooled (and, where that proposal fails, those closer than ``tol`` times the
            larger of their targets' magnitudes); a proposal is accepted only after the
            certificate.
        check_every: iterations between certificates.

    Returns:
        (v, bid, aux, converged (B,) bool, iterations (B,) int64: the iteration at which the
        row was certified, or max_iter); v and aux in float64.
    """
    B, n = y.shape
    # In float64 whatever the input: the certificate's slack is a few float64 ulps, so a
    # float32 row whose violations are of float32 size is not certified as ordered.
    y = y.to(torch.float64)
    wt = torch.ones_like(y) if w is None else w.to(torch.float64)
    # Two proposals are certified: closeness at the row's scale (the iterate's rounding),
    # and at each entry's own magnitude, for rows that hold entries of very different
    # sizes (a row holding 1e15 and 0.1 must still resolve its small entries).
    row_scale = y.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(y.dtype).tiny)
    gaps = (tol * row_scale.expand_as(y), tol * y.abs())
    rel = 64.0 * torch.finfo(y.dtype).eps * max(1.0, math.log2(max(n, 2)))
    x = y.clone()
    p = torch.zeros_like(y)
    q = torch.zeros_like(y)
    converged = torch.zeros(B, dtype=torch.bool, device=y.device)
    iterations = torch.full((B,), max_iter, dtype=torch.int64, device=y.device)
    v_out = y.clone()
    bid_out = torch.zeros(B, n, dtype=torch.int64, device=y.device)
    aux_out = torch.zeros_like(y)
    it = 0
    while True:
        if it % check_every == 0 or it == max_iter:
            ok, v, bid, aux = certify(y, wt, _proposal(x, p, q, gaps[0]), rel)
            if not bool(ok.all()):
                ok2, v2, bid2, aux2 = certify(y, wt, _proposal(x, p, q, gaps[1]), rel)
                use = (ok2 & ~ok).unsqueeze(-1)
                v, bid, aux = (
                    torch.where(use, v2, v),
                    torch.where(use, bid2, bid),
                    torch.where(use, aux2, aux),
                )
                ok = ok | ok2
            new = ok & ~converged
            col = new.unsqueeze(-1)
            v_out = torch.where(col, v, v_out)
            bid_out = torch.where(col, bid, bid_out)
            aux_out = torch.where(col, aux, aux_out)
            iterations = torch.where(new, it, iterations)
            converged = converged | ok
            if it == max_iter or bool(converged.all()):
                break
        z = x + p
        yy = _project_odd(z, wt)
        p = z - yy
        z = yy + q
        x = _project_even(z, wt)
        q = z - x
        it += 1
    rest = (~converged).unsqueeze(-1)
    if bool(rest.any()):
        # Not certified: the last iterate, with the partition its values suggest.
        bid = _proposal(x, p, q, gaps[0]).cumsum(-1) - 1
        aux = segment_sum(wt, bid).gather(-1, bid)
        v_out = torch.where(rest, x, v_out)
        bid_out = torch.where(rest, bid, bid_out)
        aux_out = torch.where(rest, aux, aux_out)
    return v_out, bid_out, aux_out, converged, iterations
