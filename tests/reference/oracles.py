"""Slow, independent oracles in NumPy/SciPy float64. Nothing here imports softtopk.

Each oracle follows a paper's own route (sort + isotonic regression, Sinkhorn, LapSum's
sort-based closed form) or a brute-force bisection, one row at a time.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import isotonic_regression
from scipy.special import expit, logsumexp


def isotonic_sparse_mask(x: np.ndarray, k: float, l: float) -> np.ndarray:
    """Sander et al. (2023), p = 2, by the paper's route: sort + antitonic regression.

    y_sorted = (s - v*)/l with v* the decreasing isotonic regression of s - l w and
    w = (1, ..., 1, frac(k), 0, ...), the vertex of the permutahedron P(w) (the capped
    simplex {y in [0,1]^n, sum y = k}). -inf entries are removed first (they get 0).
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    keep = x > -np.inf
    xf = x[keep]
    m = xf.size
    if k <= 0:
        return out
    if m <= k:
        out[keep] = 1.0
        return out
    order = np.argsort(-xf, kind="stable")
    s = xf[order]
    w = np.clip(k - np.arange(m), 0.0, 1.0)
    v = isotonic_regression(s - l * w, increasing=False).x
    y = np.empty(m)
    y[order] = (s - v) / l
    out[keep] = y
    return out


def isotonic_magnitude(x: np.ndarray, k: int, l: float, debias: bool = True) -> np.ndarray:
    """Sander et al. (2023) top-k in magnitude, p = 2, by sort + weighted isotonic regression.

    v* = weighted decreasing isotonic regression of s/(1 + l w) with weights 1 + l w,
    s = sorted |x|; the smoothed gradient is (s - v*)/l and the reference's debiased
    output is (1 + l)(s - v*)/l, both multiplied by sign(x).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    s_all = np.abs(x)
    order = np.argsort(-s_all, kind="stable")
    s = s_all[order]
    w = (np.arange(n) < k).astype(np.float64)
    omega = 1.0 + l * w
    v = isotonic_regression(s / omega, weights=omega, increasing=False).x
    z = (s - v) / l
    if debias:
        z = (1.0 + l) * z
    y = np.empty(n)
    y[order] = z
    return np.sign(x) * y


def link_value(name: str, z: np.ndarray, p: float = 2.0) -> np.ndarray:
    if name == "sparse":
        return np.clip(np.maximum(z, 0.0), 0.0, 1.0) ** (1.0 / (p - 1.0))
    if name == "logistic":
        return expit(z)
    if name == "laplace":
        return np.where(z <= 0, 0.5 * np.exp(np.minimum(z, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(z, 0.0)))
    raise ValueError(name)


def bisection_mask(
    x: np.ndarray, k: float, t: float, link: str, p: float = 2.0, iters: int = 200
) -> np.ndarray:
    """Brute force: y = G((x - tau)/t) with tau found by plain bisection on sum(y) = k."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    keep = x > -np.inf
    xf = x[keep]
    if k <= 0:
        return out
    if xf.size <= k:
        out[keep] = 1.0
        return out
    lo, hi = xf.min() - 100.0 * t - 1.0, xf.max() + 100.0 * t * (1.0 + math.log(xf.size)) + 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if link_value(link, (xf - mid) / t, p).sum() > k:
            lo = mid
        else:
            hi = mid
    out[keep] = link_value(link, (xf - 0.5 * (lo + hi)) / t, p)
    return out


def sinkhorn_soft(
    scores: np.ndarray, k: float, eps: float, tol: float = 1e-13, max_iter: int = 100_000
) -> np.ndarray:
    """SOFT top-k (Xie et al. 2020) as published: two anchors, cost normalised by its max.

    Selects the k *smallest* scores, as the reference code does: sources mu = 1/n, anchors
    (0, 1) with weights (k/n, (n-k)/n), cost C_ij = (x_i - a_j)^2 / max C, log-domain
    Sinkhorn to convergence; returns n * Gamma[:, 0].
    """
    x = np.asarray(scores, dtype=np.float64)
    n = x.size
    anchors = np.array([0.0, 1.0])
    cost = (x[:, None] - anchors[None, :]) ** 2
    cost = cost / cost.max()
    log_mu = np.full(n, -math.log(n))
    log_nu = np.log(np.array([k / n, (n - k) / n]))
    f = np.zeros(n)
    g = np.zeros(2)
    for _ in range(max_iter):
        f = eps * (log_mu - logsumexp((g[None, :] - cost) / eps, axis=1))
        g_new = eps * (log_nu - logsumexp((f[:, None] - cost) / eps, axis=0))
        plan = np.exp((f[:, None] + g_new[None, :] - cost) / eps)
        done = np.abs(n * plan.sum(1) - 1.0).max() < tol and np.abs(g_new - g).max() < tol * eps
        g = g_new
        if done:
            break
    plan = np.exp((f[:, None] + g[None, :] - cost) / eps)
    return n * plan[:, 0]


def soft_cost_max(scores: np.ndarray) -> float:
    """max_ij (x_i - a_j)^2 over the anchors (0, 1): SOFT's cost normaliser."""
    x = np.asarray(scores, dtype=np.float64)
    return float(max((x**2).max(), ((x - 1.0) ** 2).max()))


def lapsum_closed_form(x: np.ndarray, k: float, alpha: float) -> np.ndarray:
    """LapSum (Struski et al. 2025) by its sort-based closed form, evaluated directly.

    F is the Laplace CDF and LapSum(b) = sum_i F((b - x_i)/alpha) rises from 0 to n. The
    top-k mask is p_i = F((x_i - b)/alpha) with LapSum(b) = n - k. After sorting, LapSum is
    evaluated at every breakpoint by explicit sums; on the piece that contains the root it
    is affine in e^{b/alpha} and e^{-b/alpha}, so b solves a quadratic.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    u = np.sort(x) / alpha
    target = n - k

    def lapsum(beta: float) -> float:
        return float(link_value("laplace", beta - u).sum())

    values = np.array([lapsum(b) for b in u])
    j = int(np.searchsorted(values, target, side="right")) - 1  # u_j <= beta < u_{j+1}
    # Entries i <= j have u_i <= beta: F(beta - u_i) = 1 - e^{u_i - beta}/2.
    # Entries i > j have u_i > beta:   F(beta - u_i) = e^{beta - u_i}/2.
    left = u[: j + 1]
    right = u[j + 1 :]
    ref = u[j] if j >= 0 else u[0]
    a = 0.5 * np.exp(left - ref).sum()  # coefficient of e^{ref - beta}
    c = 0.5 * np.exp(ref - right).sum()  # coefficient of e^{beta - ref}
    const = float(left.size) - target
    # const - a / w + c w = 0 with w = e^{beta - ref}  =>  c w^2 + const w - a = 0.
    if c > 0:
        w = (-const + math.sqrt(const * const + 4.0 * a * c)) / (2.0 * c)
    else:
        w = a / const
    beta = ref + math.log(w)
    return link_value("laplace", (x / alpha) - beta)


def pav_magnitude(x: np.ndarray, k: int, l: float, p: float, debias: bool = True) -> np.ndarray:
    """Sander et al. (2023) top-k in magnitude for any p in (1, 2], by the paper's route.

    v* = argmin over decreasing v of sum_i |s_i - v_i|^q / (q l^(q-1)) + w_i v_i^2 / 2 with
    s = sorted |x|, w = (1^k, 0^(n-k)), q = p/(p-1), by pool-adjacent-violators; each
    block's value solves sum_B sign(v - s_i)|v - s_i|^(q-1) + l^(q-1) v sum_B w_i = 0
    by bisection. Output: y = ((s - v)/l)^(q-1) (plain) or y + (s - v) (debiased), with
    the sign of x.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    r = 1.0 / (p - 1.0)  # q - 1
    s_all = np.abs(x)
    order = np.argsort(-s_all, kind="stable")
    s = s_all[order]
    w = (np.arange(n) < k).astype(np.float64)

    def block_value(lo: int, hi: int) -> float:
        seg, wsum = s[lo:hi], w[lo:hi].sum()
        a, b = 0.0, max(seg.max(), 0.0)
        for _ in range(80):  # the bracket shrinks below float64 resolution
            v = 0.5 * (a + b)
            g = (np.sign(v - seg) * np.abs(v - seg) ** r).sum() + l**r * v * wsum
            a, b = (v, b) if g < 0 else (a, v)
        return 0.5 * (a + b)

    blocks: list[list[float]] = []  # [start, end, value]
    for i in range(n):
        blocks.append([i, i + 1, block_value(i, i + 1)])
        while len(blocks) > 1 and blocks[-2][2] <= blocks[-1][2]:
            end = blocks.pop()[1]
            blocks[-1][1] = end
            blocks[-1][2] = block_value(int(blocks[-1][0]), end)
    v = np.empty(n)
    for start, end, value in blocks:
        v[int(start) : int(end)] = value
    gap = s - v
    y = np.sign(gap) * (np.abs(gap) / l) ** r
    if debias:
        y = y + gap
    out = np.empty(n)
    out[order] = y
    return np.sign(x) * out
