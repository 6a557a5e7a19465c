"""The router's bookkeeping on CPU: one numba pass over the (T, E) scores.

This module is imported on first use (numba is loaded then, not at ``import softtopk``).
For every token t it computes the number of experts with a non-zero gate and, from
softmax scores, logsumexp_e(logits[t, e]); for every expert e the sum over tokens of the
normalised scores and the number of tokens with a non-zero gate, accumulated in float64.
These give the z-loss, the load-balancing loss, ``active`` and ``load`` of
:func:`softtopk.nn.functional.topk_route`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _lse_from_softmax(logits, scores, t):  # pragma: no cover - compiled
    """logsumexp of row t of the logits, given scores = softmax(logits): l_max - log p_max.

    p_max >= 1/E, so this is one log per token, as accurate as the scores.
    """
    top = -math.inf
    at = 0
    nan = False
    for e in range(logits.shape[1]):
        v = logits[t, e]
        if v != v:
            nan = True
        elif v > top:
            top = v
            at = e
    if nan:
        return math.nan
    if top == math.inf or top == -math.inf:
        return top  # as torch.logsumexp: +inf with an infinite logit, -inf when all are -inf
    return top - math.log(scores[t, at])


@_jit
def _rows(logits, scores, gates, softmax, lse, active, score_sum, counts, start, stop):  # pragma: no cover
    """Rows start:stop; lse is filled here when ``softmax`` (otherwise the caller filled it)."""
    E = logits.shape[1]
    for t in range(start, stop):
        if softmax:
            lse[t] = _lse_from_softmax(logits, scores, t)
        n = 0
        for e in range(E):
            score_sum[e] += scores[t, e]
            if gates[t, e] > 0.0:
                counts[e] += 1.0
                n += 1
        active[t] = n


@numba.njit(cache=True, parallel=True)
def stats(logits, scores, gates, softmax, lse, active, score_sum, counts, chunks):  # pragma: no cover
    """Fills active (T,) and the per-expert score_sum and counts (E,), zeroed by the caller.

    With ``softmax`` (the scores are softmax(logits)) it fills lse (T,) too, read off the
    scores; otherwise the caller has filled lse.
    """
    T, E = logits.shape
    chunks = max(1, min(T, chunks))
    per = (T + chunks - 1) // chunks
    part_sum = np.zeros((chunks, E), dtype=np.float64)
    part_count = np.zeros((chunks, E), dtype=np.float64)
    for ch in numba.prange(chunks):
        lo = ch * per
        hi = min(T, lo + per)
        _rows(logits, scores, gates, softmax, lse, active, part_sum[ch], part_count[ch], lo, hi)
    for ch in range(chunks):
        for e in range(E):
            score_sum[e] += part_sum[ch, e]
            counts[e] += part_count[ch, e]


@_jit
def stats_serial(logits, scores, gates, softmax, lse, active, score_sum, counts):  # pragma: no cover
    """:func:`stats` on the calling thread (small batches)."""
    _rows(logits, scores, gates, softmax, lse, active, score_sum, counts, 0, logits.shape[0])
