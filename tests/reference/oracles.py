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


# ----------------------------------------------------------------- isotonic / permutahedron


def isotonic_l2(y: np.ndarray, w: np.ndarray | None = None, increasing: bool = True) -> np.ndarray:
    """Weighted L2 isotonic regression of one row: scipy.optimize.isotonic_regression."""
    return isotonic_regression(np.asarray(y, np.float64), weights=w, increasing=increasing).x


def isotonic_kl(y: np.ndarray, w: np.ndarray | None = None, increasing: bool = True) -> np.ndarray:
    """KL isotonic regression of one row, argmin over monotone v of sum w (e^(y-v) - (y-v) - 1).

    Solved with scipy's weighted L2 isotonic regression through an exact equivalence: the
    block value log(sum_B w e^y / sum_B w) is -log of the weighted mean of r = e^(-y) with
    weights w e^y, and v increasing <=> r decreasing; so the partitions coincide. A shift
    m = max(y) keeps the exponentials in range.
    """
    y = np.asarray(y, np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, np.float64)
    m = y.max()
    with np.errstate(over="ignore", under="ignore"):
        r = np.exp(-(y - m))
        alpha = w * np.exp(y - m)
    if np.all(np.isfinite(r)) and np.all(alpha > 0):
        pooled = isotonic_regression(r, weights=alpha, increasing=not increasing).x
        return m - np.log(pooled)
    # A range of y beyond ~700 under- or overflows the change of variables (scipy needs
    # weights > 0): textbook PAV in the log domain instead.
    return _isotonic_kl_log_pav(y, np.log(w), increasing)


def _isotonic_kl_log_pav(y: np.ndarray, lw: np.ndarray, increasing: bool) -> np.ndarray:
    """Stack PAV for the KL loss with block values LSE_B(y + lw) - LSE_B(lw), pure Python."""
    if increasing:
        return _isotonic_kl_log_pav(y[::-1], lw[::-1], False)[::-1]
    blocks: list[list[float]] = []  # [LSE(y + lw), LSE(lw), value, size]
    for yi, li in zip(y.tolist(), lw.tolist(), strict=True):
        a, c, size = yi + li, li, 1
        val = a - c
        while blocks and blocks[-1][2] < val:  # decreasing fit: pool violators
            pa, pc, _, psize = blocks.pop()
            a, c, size = np.logaddexp(a, pa), np.logaddexp(c, pc), size + psize
            val = a - c
        blocks.append([a, c, val, size])
    return np.concatenate([np.full(b[3], b[2]) for b in blocks])


def permutahedron_projection(z: np.ndarray, w: np.ndarray, reg: str = "l2") -> np.ndarray:
    """Blondel et al. (2020), Prop. 3: projection of z onto P(w) by sort + isotonic regression."""
    z = np.asarray(z, np.float64)
    order = np.argsort(-z, kind="stable")
    s = z[order]
    ws = np.sort(np.asarray(w, np.float64))[::-1]
    out = np.empty_like(z)
    if reg == "l2":
        v = isotonic_l2(s - ws, increasing=False)
        out[order] = s - v
    else:
        v = isotonic_kl(s - np.log(ws), ws, increasing=False)
        out[order] = np.exp(s - v)
    return out


def soft_rank(x: np.ndarray, eps: float, reg: str = "l2", descending: bool = False) -> np.ndarray:
    """Blondel et al. (2020) soft rank: P(+-x/eps, (n, ..., 1)); rank 1 = smallest by default."""
    x = np.asarray(x, np.float64)
    n = x.size
    z = -x / eps if descending else x / eps
    return permutahedron_projection(z, np.arange(n, 0, -1, dtype=np.float64), reg)


def soft_sort(x: np.ndarray, eps: float, reg: str = "l2", descending: bool = False) -> np.ndarray:
    """Blondel et al. (2020) soft sort: rho/eps - v, v the decreasing isotonic fit of rho/eps - s.

    L2: plain isotonic regression; KL: block values LSE_B(rho/eps) - LSE_B(s). Ascending
    sorts negate the input and the output (torchsort's convention).
    """
    x = np.asarray(x, np.float64)
    n = x.size
    s = np.sort(x if descending else -x)[::-1]
    w = np.arange(n, 0, -1, dtype=np.float64) / eps
    if reg == "l2":
        v = isotonic_l2(w - s, increasing=False)
    else:
        # v_B = LSE_B(w) - LSE_B(s): the KL fit of y = w - s with weights e^s.
        shift = s.max()
        v = isotonic_kl(w - s, np.exp(s - shift), increasing=False)
    out = w - v
    return out if descending else -out


def permutahedron_projection_qp(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Brute force for tiny n: the Euclidean projection onto P(w) as a generic QP (SLSQP).

    P(w) = {mu : sum mu = sum w, sum_{i in S} mu_i <= sum of the |S| largest w for every
    subset S} (Rado's theorem); 2^n constraints, so n <= 7.
    """
    from itertools import combinations

    from scipy.optimize import minimize

    z = np.asarray(z, np.float64)
    n = z.size
    ws = np.sort(np.asarray(w, np.float64))[::-1]
    cons = [{"type": "eq", "fun": lambda mu: mu.sum() - ws.sum(), "jac": lambda mu: np.ones(n)}]
    for size in range(1, n):
        bound = ws[:size].sum()
        for subset in combinations(range(n), size):
            idx = np.array(subset)
            grad = np.zeros(n)
            grad[idx] = -1.0
            cons.append(
                {
                    "type": "ineq",
                    "fun": lambda mu, i=idx, b=bound: b - mu[i].sum(),
                    "jac": lambda mu, g=grad: g,
                }
            )
    start = np.full(n, ws.mean())
    res = minimize(
        lambda mu: 0.5 * ((mu - z) ** 2).sum(),
        start,
        jac=lambda mu: mu - z,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    return res.x


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


# ----------------------------------------------------------------------- issue 4 oracles


def dftopk_sorted(x: np.ndarray, k: int, t: float) -> np.ndarray:
    """DFTopK (Zhu et al. 2025) by its sort-based definition: theta = (s_k + s_{k+1}) / 2."""
    x = np.asarray(x, dtype=np.float64)
    s = np.sort(x)[::-1]
    theta = 0.5 * (s[k - 1] + s[k])
    return expit((x - theta) / t)


def dftopk_jacobian(x: np.ndarray, k: int, t: float) -> np.ndarray:
    """The paper's closed form: dp_i/dx_j = p_i (1 - p_i)/t (delta_ij - [j in {(k), (k+1)}]/2)."""
    x = np.asarray(x, dtype=np.float64)
    p = dftopk_sorted(x, k, t)
    order = np.argsort(-x, kind="stable")
    boundary = np.zeros_like(x)
    boundary[order[k - 1]] = 0.5
    boundary[order[k]] = 0.5
    s = p * (1.0 - p) / t
    return s[:, None] * (np.eye(x.size) - boundary[None, :])


def sinkhorn_sorted_soft(
    x: np.ndarray, k: int, eps: float, tol: float = 1e-13, max_iter: int = 200_000
) -> np.ndarray:
    """SOFT's sorted top-k (``TopK_custom1``): anchors (k, ..., 0), weights (1/n, ..., (n-k)/n).

    Cost (x_i - a_j)^2 normalised by its max, log-domain Sinkhorn to convergence; returns
    the (k, n) indicators n * Gamma[:, :k]^T. -inf entries are dropped first (padding).
    """
    x = np.asarray(x, dtype=np.float64)
    keep = x > -np.inf
    xf = x[keep]
    n = xf.size
    anchors = np.arange(k, -1, -1, dtype=np.float64)
    cost = (xf[:, None] - anchors[None, :]) ** 2
    cost = cost / cost.max()
    log_mu = np.full(n, -math.log(n))
    nu = np.array([1.0 / n] * min(k, n) + [0.0] * (k - min(k, n)) + [max(n - k, 0) / n])
    with np.errstate(divide="ignore"):
        log_nu = np.log(nu)
    f = np.zeros(n)
    g = np.zeros(k + 1)
    for _ in range(max_iter):
        f = eps * (log_mu - logsumexp((g[None, :] - cost) / eps, axis=1))
        g = eps * (log_nu - logsumexp((f[:, None] - cost) / eps, axis=0))
        rows = np.exp((f[:, None] + g[None, :] - cost) / eps).sum(1)
        if np.abs(n * rows - 1.0).max() < tol:
            break
    plan = np.exp((f[:, None] + g[None, :] - cost) / eps)
    out = np.zeros((k, x.size))
    out[:, keep] = n * plan[:, :k].T
    return out


def neuralsort_matrix(x: np.ndarray, tau: float) -> np.ndarray:
    """NeuralSort (Grover et al. 2019) by its formula with the n x n matrix A_jl = |x_j - x_l|.

    Row r (1-based) is softmax(((n + 1 - 2r) x - A 1) / tau): a soft one-hot of the r-th largest.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    a = np.abs(x[:, None] - x[None, :]).sum(1)
    r = np.arange(1, n + 1)[:, None]
    logits = ((n + 1 - 2 * r) * x[None, :] - a[None, :]) / tau
    return np.exp(logits - logsumexp(logits, axis=1, keepdims=True))


def softsort_matrix(x: np.ndarray, tau: float, power: float = 1.0) -> np.ndarray:
    """SoftSort (Prillo and Akinola 2020): row r = softmax(-|x_(r) - x|^power / tau), descending."""
    x = np.asarray(x, dtype=np.float64)
    s = np.sort(x)[::-1]
    logits = -(np.abs(s[:, None] - x[None, :]) ** power) / tau
    return np.exp(logits - logsumexp(logits, axis=1, keepdims=True))


def _comparator(v: np.ndarray, t: float, distribution: str) -> np.ndarray:
    u = v / t
    if distribution == "logistic":
        return expit(u)
    if distribution == "cauchy":
        return np.arctan(u) / math.pi + 0.5
    if distribution == "reciprocal":
        return 0.5 * (u / (2.0 + np.abs(u)) + 1.0)
    raise ValueError(distribution)


def sorting_network_matrix(x: np.ndarray, kind: str, t: float, distribution: str = "logistic") -> np.ndarray:
    """Relaxed permutation of a sorting network by explicit n x n matrix products.

    Wires hold values; a comparator (lo, hi) writes min' = alpha a + (1 - alpha) b to lo and
    max' to hi with alpha = s((b - a)/t), and the permutation matrix is multiplied by the
    layer's 2 x 2 blocks. Odd-even: n layers of pairs (i, i+1), i = layer mod 2. Bitonic:
    N = 2^ceil(log2 n) slots whose first N - n hold -inf; comparisons with -inf are exact
    (the -inf value moves to the minimum slot). Returns P (n, n) with row r the soft
    one-hot of the r-th largest (descending).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if kind == "odd_even":
        N, pad = n, 0
        layers = [[(i, i + 1) for i in range(layer % 2, n - 1, 2)] for layer in range(n)]
    else:
        m = max(1, math.ceil(math.log2(n)))
        N = 1 << m
        pad = N - n
        layers = []
        for block in range(m):
            for layer in range(block + 1):
                s = 1 << (block - layer)
                pairs = []
                for start in range(0, N, 2 * s):
                    for j in range(s):
                        a, b = start + j, start + j + s
                        pairs.append((a, b) if (a >> (block + 1)) % 2 == 0 else (b, a))
                layers.append(pairs)
    vals = np.concatenate([np.full(pad, -np.inf), x])
    P = np.zeros((N, n))  # P[slot, input]: how much of input i sits in slot
    P[pad:, :] = np.eye(n)
    for layer in layers:
        for lo, hi in layer:
            a, b = vals[lo], vals[hi]
            if np.isinf(a) or np.isinf(b):
                if a > b:  # the -inf goes to lo
                    vals[lo], vals[hi] = b, a
                    P[[lo, hi]] = P[[hi, lo]]
                continue
            alpha = _comparator(np.array(b - a), t, distribution)
            vals[lo], vals[hi] = alpha * a + (1 - alpha) * b, (1 - alpha) * a + alpha * b
            plo, phi = P[lo].copy(), P[hi].copy()
            P[lo], P[hi] = alpha * plo + (1 - alpha) * phi, (1 - alpha) * plo + alpha * phi
    return P[pad:][::-1]


def relaxed_subset_reference(x: np.ndarray, g: np.ndarray, k: int, t: float) -> np.ndarray:
    """Xie and Ermon (2019) ``continuous_topk`` on the keys x + g (tiny = float32 tiny)."""
    tiny = np.finfo(np.float32).tiny
    w = np.asarray(x, dtype=np.float64) + np.asarray(g, dtype=np.float64)
    onehot = np.zeros_like(w)
    khot = np.zeros_like(w)
    for _ in range(k):
        w = w + np.log(np.maximum(1.0 - onehot, tiny))
        z = w / t
        onehot = np.exp(z - logsumexp(z))
        khot = khot + onehot
    return khot


def plackett_luce_inclusion(logits: np.ndarray, k: int) -> np.ndarray:
    """P(i in the first k draws without replacement, P(draw j) proportional to exp(logits_j))."""
    from itertools import permutations

    w = np.exp(np.asarray(logits, dtype=np.float64))
    n = w.size
    out = np.zeros(n)
    for seq in permutations(range(n), k):
        p, left = 1.0, w.sum()
        for j in seq:
            p *= w[j] / left
            left -= w[j]
        out[list(seq)] += p
    return out


def perturbed_topk_reference(x: np.ndarray, z: np.ndarray, k: int, t: float) -> np.ndarray:
    """Mean over samples of the hard top-k masks of x + t z_m (z: (M, n)), by sorting."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for zm in np.asarray(z, dtype=np.float64):
        order = np.argsort(-(x + t * zm), kind="stable")
        out[order[:k]] += 1.0
    return out / len(z)
