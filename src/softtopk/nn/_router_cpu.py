"""The router on CPU: its gates in one fused pass per token, and its bookkeeping in another.

This module is imported on first use (numba is loaded then, not at ``import softtopk``).

:func:`gates_forward` computes, a block of tokens at a time, their scores (the softmax of their
logits; sigmoid scores, and softmax ones over rows where torch's softmax is fast, are
given), the selection's scores u (the logits for softmax, the scores for sigmoid, plus
the expert bias), the threshold mask of u (the row solver of
:mod:`softtopk.threshold._cpu`) and the gates scores * mask; :func:`gates_backward` is
the matching vector-Jacobian product, the mask's implicit backward and the score's
Jacobian in one pass.

:func:`stats`: for every token t it computes the number of experts with a non-zero gate and, from
softmax scores, logsumexp_e(logits[t, e]); for every expert e the sum over tokens of the
normalised scores and the number of tokens with a non-zero gate, accumulated in float64.
These give the z-loss, the load-balancing loss, ``active`` and ``load`` of
:func:`softtopk.nn.functional.topk_route`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import _backend

_cpu = _backend.kernels("threshold._cpu")
_exp = _cpu._exp
CLIP, POWER, SHORT = _cpu.CLIP, _cpu.POWER, _cpu.SHORT
#: Scores of :func:`gates_forward`.
SOFTMAX, SIGMOID = 0, 1

_jit = numba.njit(cache=True, nogil=True)
#: Leaf loops that LLVM vectorises (see :mod:`softtopk.threshold._cpu`).
_simd = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"}, error_model="numpy")
_vec = numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")


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


#: Entries per block of rows of :func:`_gate_rows` and :func:`_gate_grad_rows` (at most 64
#: rows, at least one): a block's scores are computed in one pass, then its masks, then
#: its gates, so that the passes' calls are per block, not per row, and its scratch stays
#: in cache.
BLOCK = 4096


@_jit
def _block_rows(E):  # pragma: no cover - compiled
    return max(1, min(64, BLOCK // E))


@_simd
def _softmax_block(logits, b0, b1, probs, e):  # pragma: no cover - compiled
    """probs[b0:b1] = softmax(logits[b0:b1]) along each row.

    In float64, rounded once (within an ulp of torch.softmax). A row holding NaN or +inf,
    or only -inf, is NaN everywhere, as torch's (the NaN of exp(NaN), inf - inf or
    -inf + inf reaches the row's sum).
    """
    E = logits.shape[1]
    for b in range(b0, b1):
        top = -math.inf
        for i in range(E):
            v = np.float64(logits[b, i])
            top = v if v > top else top
        s = 0.0
        for i in range(E):
            w = _exp(np.float64(logits[b, i]) - top)
            e[i] = w
            s += w
        for i in range(E):
            probs[b, i] = e[i] / s


@_vec
def _add_bias(src, bias, b0, b1, u):  # pragma: no cover - compiled
    """u[: b1 - b0] = src[b0:b1] + bias, in the dtype of src (as torch adds them)."""
    for b in range(b0, b1):
        for i in range(src.shape[1]):
            u[b - b0, i] = src[b, i] + bias[i]


@_vec
def _multiply(probs, mask, b0, b1, gates):  # pragma: no cover - compiled
    """gates[b0:b1] = probs[b0:b1] * mask[b0:b1], in their dtype."""
    for b in range(b0, b1):
        for i in range(probs.shape[1]):
            gates[b, i] = probs[b, i] * mask[b, i]


@_jit
def _gate_rows(
    logits, bias, score, given, k, t, code, p, gates, probs, mask, tau, start, stop
):  # pragma: no cover
    """Rows start..stop-1 of :func:`gates_forward`, with their own scratch, a block of rows at a time."""
    T, E = logits.shape
    a = 1.0 / (p - 1.0) if code == POWER else 1.0
    sv = np.empty(E, dtype=np.float64)
    si = np.empty(E, dtype=np.int64)
    P = np.empty(_cpu.SERIES, dtype=np.float64)
    Q = np.empty(_cpu.SERIES, dtype=np.float64)
    top = np.empty(_cpu.FEW, dtype=np.float64)
    sparse = code == CLIP or code == POWER
    ev = np.empty(0 if sparse else E + 1, dtype=np.float64)
    e = np.empty(E, dtype=np.float64)
    biased = bias.shape[0] > 0
    rows = _block_rows(E)
    u = np.empty((rows if biased else 0, E), dtype=logits.dtype)
    short = sparse and E <= SHORT
    src = probs if score == SIGMOID else logits  # what the selection reads, before the bias
    for b0 in range(start, stop, rows):
        b1 = min(stop, b0 + rows)
        if not given:
            _softmax_block(logits, b0, b1, probs, e)
        if biased:
            _add_bias(src, bias, b0, b1, u)
        for b in range(b0, b1):
            x = u[b - b0] if biased else src[b]
            if short:
                tau[b] = _cpu._short_sparse_row(x, k[b], t[b], code, a, mask[b], sv, si)
            elif sparse:
                tau[b] = _cpu._sparse_row(x, k[b], t[b], code, a, mask[b], sv, si)
            else:
                tau[b] = _cpu._dense_row(x, k[b], t[b], code, mask[b], sv, si, P, Q, top, ev)
        _multiply(probs, mask, b0, b1, gates)


@numba.njit(cache=True, parallel=True)
def gates_forward(
    logits, bias, score, given, k, t, code, p, gates, probs, mask, tau, chunks
):  # pragma: no cover
    """Writes gates and mask (T, E) and tau (T,) of the router's logits (T, E), and probs unless given.

    probs = softmax(logits) (``score`` SOFTMAX), written here unless ``given``; with
    SIGMOID probs must be given. The mask is the threshold mask (link ``code``, exponent
    p) of u = (logits for SOFTMAX, probs for SIGMOID) + bias, with budgets k and
    temperatures t (T,); gates = probs * mask. ``bias`` is (E,) or empty.
    """
    T = logits.shape[0]
    chunks = max(1, min(T, chunks))
    per = (T + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        _gate_rows(
            logits,
            bias,
            score,
            given,
            k,
            t,
            code,
            p,
            gates,
            probs,
            mask,
            tau,
            ch * per,
            min(T, (ch + 1) * per),
        )


@_jit
def gates_forward_serial(
    logits, bias, score, given, k, t, code, p, gates, probs, mask, tau
):  # pragma: no cover
    """:func:`gates_forward` on the calling thread."""
    _gate_rows(logits, bias, score, given, k, t, code, p, gates, probs, mask, tau, 0, logits.shape[0])


@_vec
def _mask_cotangent(probs, vg, vm, b0, b1, w):  # pragma: no cover - compiled
    """w[: b1 - b0] = v_gates probs + v_mask (vm empty: no v_mask), in float64."""
    with_vm = vm.shape[0] > 0
    for b in range(b0, b1):
        for i in range(probs.shape[1]):
            w[b - b0, i] = np.float64(vg[b, i]) * probs[b, i] + (vm[b, i] if with_vm else 0.0)


@_simd
def _score_grad(probs, mask, vg, vp, du, sigmoid, b0, b1, grad_logits):  # pragma: no cover - compiled
    """grad_logits[b0:b1] from d/du and a = v_probs + v_gates mask (vp empty: no v_probs).

    Softmax: probs (a - <probs, a>) + d/du; sigmoid (u = probs + bias): (a + d/du) probs (1 - probs).
    """
    E = probs.shape[1]
    with_vp = vp.shape[0] > 0
    for b in range(b0, b1):
        j = b - b0
        if sigmoid:
            for i in range(E):
                q = np.float64(probs[b, i])
                a = np.float64(vg[b, i]) * mask[b, i] + (vp[b, i] if with_vp else 0.0)
                grad_logits[b, i] = (a + du[j, i]) * (q * (1.0 - q))
        else:
            s = 0.0
            for i in range(E):
                a = np.float64(vg[b, i]) * mask[b, i] + (vp[b, i] if with_vp else 0.0)
                s += probs[b, i] * a
            for i in range(E):
                a = np.float64(vg[b, i]) * mask[b, i] + (vp[b, i] if with_vp else 0.0)
                grad_logits[b, i] = probs[b, i] * (a - s) + du[j, i]


@_jit
def _gate_grad_rows(
    logits, bias, probs, mask, tau, t, vg, vp, vm, score, code, p, grad_logits, grad_k, start, stop
):  # pragma: no cover - compiled
    """Rows start..stop-1 of :func:`gates_backward`, a block of rows at a time."""
    T, E = probs.shape
    a = 1.0 / (p - 1.0) if code == POWER else 1.0
    si = np.empty(E, dtype=np.int64)
    dense = not (code == CLIP or code == POWER)
    hs = _cpu._slope_scratch(E, code)
    rows = _block_rows(E)
    short = E <= SHORT  # (as the threshold kernel's backward)
    w = np.empty((rows, E), dtype=np.float64)
    du = np.empty((rows, E), dtype=np.float64)
    # a dense link's backward reads the mask's input u (see _cpu._dense_backward_row),
    # recomputed as the forward made it
    u = np.empty((rows if dense else 0, E), dtype=logits.dtype)
    src = probs if score == SIGMOID else logits
    biased = bias.shape[0] > 0
    for b0 in range(start, stop, rows):
        b1 = min(stop, b0 + rows)
        # the mask sees w = v_mask + v_gates probs; its backward gives d/du and grad_k
        _mask_cotangent(probs, vg, vm, b0, b1, w)
        m, tb, tt, gk = mask[b0:b1], tau[b0:b1], t[b0:b1], grad_k[b0:b1]
        if dense:
            if biased:
                _add_bias(src, bias, b0, b1, u)
            else:
                u[: b1 - b0] = src[b0:b1]
        if short and code == POWER:
            _cpu._short_power_backward(m, tb, tt, w, a, p, du, gk, 0, b1 - b0)
        elif short:
            _cpu._short_backward(m, u, tb, tt, w, code, du, gk, 0, b1 - b0)  # (u unread by the clip link)
        elif dense:
            for b in range(b0, b1):
                j = b - b0
                grad_k[b] = _cpu._backward_row(mask[b], u[j], tau[b], t[b], w[j], code, a, p, du[j], si, hs)
        else:
            for b in range(b0, b1):
                j = b - b0
                m_b = mask[b]  # (a sparse link reads the mask only)
                grad_k[b] = _cpu._backward_row(m_b, m_b, tau[b], t[b], w[j], code, a, p, du[j], si, hs)
        _score_grad(probs, mask, vg, vp, du, score == SIGMOID, b0, b1, grad_logits)


@numba.njit(cache=True, parallel=True)
def gates_backward(
    logits, bias, probs, mask, tau, t, vg, vp, vm, score, code, p, grad_logits, grad_k, chunks
):  # pragma: no cover
    """The vector-Jacobian product of :func:`gates_forward` for v_gates, v_probs, v_mask.

    With w = v_mask + v_gates probs, the mask's backward gives d/du = h/t (w - c) and
    grad_k = c = <h, w>/sum h (h = G'(z): a sparse link's from the mask, a dense link's
    from z = (u - tau)/t, u recomputed from the logits and bias); with a = v_probs + v_gates mask,
    grad_logits = probs (a - <probs, a>) + d/du (softmax) or (a + d/du) probs (1 - probs)
    (sigmoid). vp and vm may be empty (no gradient).
    """
    T = probs.shape[0]
    chunks = max(1, min(T, chunks))
    per = (T + chunks - 1) // chunks
    for ch in numba.prange(chunks):
        _gate_grad_rows(
            logits,
            bias,
            probs,
            mask,
            tau,
            t,
            vg,
            vp,
            vm,
            score,
            code,
            p,
            grad_logits,
            grad_k,
            ch * per,
            min(T, (ch + 1) * per),
        )


@_jit
def gates_backward_serial(
    logits, bias, probs, mask, tau, t, vg, vp, vm, score, code, p, grad_logits, grad_k
):  # pragma: no cover
    """:func:`gates_backward` on the calling thread."""
    _gate_grad_rows(
        logits, bias, probs, mask, tau, t, vg, vp, vm, score, code, p, grad_logits, grad_k, 0, probs.shape[0]
    )
