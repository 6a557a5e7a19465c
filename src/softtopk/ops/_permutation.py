"""Relaxed permutation matrices and the top-k masks they give (baselines).

NeuralSort (Grover et al. 2019), SoftSort (Prillo and Akinola 2020) and differentiable
sorting networks (odd-even transposition and bitonic; Petersen et al. 2021, 2022) relax
the permutation matrix that sorts a row. Their top k rows are soft one-hots of the k
largest entries; summing them gives a top-k mask whose rows sum to k. They are kept as
the baselines of the cascade-ranking literature (LCRON, ARF and DFTopK compare against
them) and their cost is what it is:

==============  ==================================  ==================================
method          top-k mask (this module)            full relaxed permutation (k = n)
==============  ==================================  ==================================
neuralsort      O(n log n + n k) time and memory     O(n^2)
softsort        O(n log k + n k)                     O(n^2)
odd_even        O(n^2) time and memory (n layers)    O(n^3) time, O(n^2) memory
bitonic         O(n log^2 n) time and memory         O(n^2 log^2 n) time
==============  ==================================  ==================================

Conventions: row r (0-based) of a relaxed permutation is a soft one-hot of the
(r+1)-th largest entry (descending, as ``torch.topk``); diffsort and NeuralSort's
reference code return ascending orders, SoftSort's descending.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_choice, check_positive, may_sync
from .._rows import apply_rules, classify, empty_result, regular_rows, rowwise

PERMUTATION_METHODS = ("neuralsort", "softsort", "odd_even", "bitonic")
NETWORKS = ("odd_even", "bitonic")
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")


# ------------------------------------------------------------------ NeuralSort, SoftSort


def _present(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Entries above -inf (B, n), their count (B, 1), and x with -inf replaced by 0."""
    present = x > -math.inf
    return present, present.sum(-1, keepdim=True), torch.where(present, x, 0.0)


def _abs_row_sums(xs: Tensor, present: Tensor) -> Tensor:
    """A_j = sum_l |x_j - x_l| over the present entries, by a sort and prefix sums, float64.

    For x sorted ascending, A at position i is x_i i - S_<i + (S - S_<=i) - x_i (m - 1 - i)
    with S the prefix sums and m the count: O(n log n) instead of the n x n matrix.
    """
    x64 = xs.to(torch.float64)
    key = torch.where(present, x64, math.inf)  # absent entries sort last
    s, order = torch.sort(key, dim=-1)
    s = torch.where(torch.isfinite(s), s, 0.0)
    m = present.sum(-1, keepdim=True).to(torch.float64)
    i = torch.arange(xs.shape[-1], device=xs.device, dtype=torch.float64)
    incl = torch.cumsum(s, -1)
    excl = incl - s
    total = incl[..., -1:]
    a_sorted = s * i - excl + (total - incl) - s * (m - 1.0 - i)
    return torch.zeros_like(a_sorted).scatter(-1, order, a_sorted)


def neuralsort_rows(x: Tensor, K: int, temperature: float) -> Tensor:
    r"""The first K rows of NeuralSort's relaxed permutation of rows x (B, n): (B, K, n).

    .. math::

        P_{r,:} = \operatorname{softmax}\Big(\frac{(n + 1 - 2r)\,x - A\mathbf 1}{\tau}\Big),
        \qquad A_{jl} = |x_j - x_l|,\ r = 1, \dots, n

    (Grover et al. 2019, row r a soft one-hot of the r-th largest). The row sums A 1 come
    from a sort and prefix sums; the logits are formed in float64 because they are
    O(n max abs(x) / tau) while the differences that matter are O(max abs(x) / tau). -inf entries are
    absent (n counts the others); rows r beyond that count are zero.
    """
    present, count, xs = _present(x)
    # The logits are linear in x: they are formed on x / s (s the power of two at most max |x|,
    # an exact scaling) and shifted by their row maximum before the division by t / s, so
    # that n |x| near the dtype's limit does not overflow to -inf - (-inf) = NaN.
    x64 = xs.to(torch.float64)
    big = torch.where(torch.isfinite(x64), x64.abs(), 0.0).amax(-1, keepdim=True)
    # A power of two near the largest finite |x|, only scaling down (s >= 1): t / s never
    # overflows for tiny or subnormal rows. (floor(log2), not frexp: inductor's C++ code
    # cannot convert frexp's int32 exponent in vectorised loops.)
    # log2 of the largest float64 rounds to 1024: the exponent is capped at 1023.
    exponent = torch.floor(torch.log2(torch.where(big > 1, big, 1.0))).clamp(max=1023.0)
    s = torch.where(big > 1, torch.exp2(exponent), 1.0).detach()
    # Gradients take the scaling in one step: x / s carries d/dx = 1 / t and the division
    # by t / s passes its cotangent on unscaled (the logits are linear in x / s, so first and
    # higher derivatives and forward-mode tangents are those of the plain formula); split
    # into d/dx = 1 / s and 1 / (t / s), the intermediate overflows once max abs(x) / t does.
    scaled = x64 / s
    x64 = scaled.detach() + torch.where(torch.isfinite(x64), x64 - x64.detach(), 0.0) / temperature
    a = _abs_row_sums(x64, present)
    r = torch.arange(1, K + 1, device=x.device, dtype=torch.float64).unsqueeze(-1)  # (K, 1)
    coef = count.to(torch.float64).unsqueeze(-1) + 1.0 - 2.0 * r  # (B, K, 1)
    raw = coef * x64.unsqueeze(-2) - a.unsqueeze(-2)
    top = torch.where(present.unsqueeze(-2), raw, -math.inf).detach().amax(-1, keepdim=True)
    tt = (temperature / s).unsqueeze(-1).clamp(min=torch.finfo(torch.float64).tiny)
    value = (raw.detach() - torch.where(torch.isfinite(top), top, 0.0)) / tt
    logits = torch.where(present.unsqueeze(-2), value + (raw - raw.detach()), -math.inf)
    rows_present = (r.squeeze(-1) <= count).unsqueeze(-1)  # (B, K, 1)
    logits = torch.where(rows_present, logits, 0.0)
    p = torch.softmax(logits, dim=-1)
    return torch.where(rows_present & present.unsqueeze(-2), p, 0.0).to(x.dtype)


def softsort_rows(x: Tensor, K: int, temperature: float, power: float = 1.0) -> Tensor:
    r"""The first K rows of SoftSort's relaxed permutation of rows x (B, n): (B, K, n).

    .. math::

        P_{r,:} = \operatorname{softmax}\Big(-\frac{|x_{(r)} - x|^{p}}{\tau}\Big)

    (Prillo and Akinola 2020) with x_(r) the r-th largest value, found by ``torch.topk``
    (differentiable, as the paper's sort). -inf entries are absent; rows beyond their
    count are zero.
    """
    present, count, xs = _present(x)
    K_eff = min(K, x.shape[-1])
    top = torch.topk(torch.where(present, x, -math.inf), K_eff, dim=-1).values
    rows_present = torch.arange(K_eff, device=x.device).unsqueeze(0) < count  # (B, K)
    top = torch.where(rows_present, top, 0.0)
    diff = (top.unsqueeze(-1) - xs.unsqueeze(-2)).abs()
    logits = -(diff.pow(power) if power != 1.0 else diff) / temperature
    logits = torch.where(present.unsqueeze(-2), logits, -math.inf)
    logits = torch.where(rows_present.unsqueeze(-1), logits, 0.0)
    p = torch.softmax(logits, dim=-1)
    p = torch.where(rows_present.unsqueeze(-1) & present.unsqueeze(-2), p, 0.0)
    if K_eff < K:
        p = torch.nn.functional.pad(p, (0, 0, 0, K - K_eff))
    return p


# ------------------------------------------------------------------------ sorting networks


class Network:
    """A comparator network on n wires, as index tensors.

    ``layers`` holds per layer the wires (lo, hi) of its comparators: after the layer
    wire lo holds the soft minimum and wire hi the soft maximum of the pair. ``order``
    lists the wires in ascending order of their final values. Values never move between
    comparators (a comparator writes back to its own two wires), so the network needs no
    permutation between layers.
    """

    def __init__(self, pairs: list[list[tuple[int, int]]], order: list[int], n: int, device: torch.device):
        self.n = n
        self.layers = [
            (
                torch.tensor([a for a, _ in layer], dtype=torch.long, device=device),
                torch.tensor([b for _, b in layer], dtype=torch.long, device=device),
            )
            for layer in pairs
            if layer
        ]
        self.order = torch.tensor(order, dtype=torch.long, device=device)

    @property
    def comparators(self) -> int:
        return sum(lo.numel() for lo, _ in self.layers)


def odd_even_pairs(n: int) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Odd-even transposition network: n layers, pairs (i, i+1) with i = layer mod 2, ..."""
    layers = [[(i, i + 1) for i in range(layer % 2, n - 1, 2)] for layer in range(n)]
    return layers, list(range(n))


def bitonic_pairs(n: int) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Bitonic sorting network for any n (Batcher 1968), as Petersen et al. lay it out.

    The network on N = 2^ceil(log2 n) wires puts its comparator (a, a + s) in block b,
    layer l (s = 2^(b-l)) and sends the minimum to wire a + s instead of a when
    floor(a / 2^(b+1)) is odd. For n < N the first N - n wires hold virtual -inf values:
    a comparator between a virtual and a real value is decided with certainty, so it is
    a relabelling of wires, not arithmetic, and is resolved here once for all inputs.
    (diffsort instead makes such comparators the identity, which does not sort for some
    n, e.g. n = 22 or 38; for powers of two both are the same network.)
    """
    m = max(1, math.ceil(math.log2(n))) if n > 1 else 0
    N = 1 << m
    virtual = N - n
    where = list(range(-virtual, n))  # storage index held by each of the N slots (< 0: virtual)
    layers: list[list[tuple[int, int]]] = []
    for block in range(m):
        for layer in range(block + 1):
            stride = 1 << (block - layer)
            pairs = []
            for start in range(0, N, 2 * stride):
                for j in range(stride):
                    a, b = start + j, start + j + stride
                    lo_slot, hi_slot = (a, b) if (a >> (block + 1)) % 2 == 0 else (b, a)
                    lo, hi = where[lo_slot], where[hi_slot]
                    if lo >= 0 and hi >= 0:
                        pairs.append((lo, hi))
                    elif hi < 0 <= lo:  # the virtual -inf is the minimum: it moves to lo_slot
                        where[lo_slot], where[hi_slot] = hi, lo
            layers.append(pairs)
    return layers, [w for w in where if w >= 0]


_NETWORKS: dict[tuple[str, int, str], Network] = {}


def network(kind: str, n: int, device: torch.device) -> Network:
    """The network ``kind`` in {"odd_even", "bitonic"} on n wires (built once per device)."""
    key = (kind, n, str(device))
    if key not in _NETWORKS:
        if len(_NETWORKS) >= 64:
            _NETWORKS.clear()
        pairs, order = odd_even_pairs(n) if kind == "odd_even" else bitonic_pairs(n)
        _NETWORKS[key] = Network(pairs, order, n, device)
    return _NETWORKS[key]


def swap_probability(
    diff: Tensor, temperature: float, distribution: str, art_lambda: float, scale: float = 1.0
) -> Tensor:
    """alpha = s(diff / t): how likely the pair is already in order (diff = hi - lo).

    ``diff`` may be given times ``scale`` (the networks run on rows halved, so that
    differences of entries near the dtype's limits stay finite); alpha is that of the
    true difference, diff / scale.
    """
    u = diff / (temperature * scale)
    if distribution == "logistic":
        return torch.sigmoid(u)
    if distribution == "logistic_phi":
        return torch.sigmoid(u / ((diff.abs() + 1e-10 * scale).pow(art_lambda) / scale**art_lambda))
    if distribution == "gaussian":
        return 0.5 + 0.5 * torch.erf(u / math.sqrt(2.0))
    if distribution == "reciprocal":
        return 0.5 * (u / (2.0 + u.abs()) + 1.0)
    if distribution == "cauchy":
        return torch.atan(u) / math.pi + 0.5
    if distribution == "optimal":
        tail = (u > 0.25).to(u.dtype) - (u < -0.25).to(u.dtype)
        return u.clamp(-0.25, 0.25) + 0.5 + tail * (0.25 - 1.0 / 16.0 / (u.abs() + 1e-10))
    raise ValueError(f"unknown distribution {distribution!r}")


def _run_network(
    x: Tensor, net: Network, temperature: float, distribution: str, art_lambda: float
) -> list[Tensor]:
    """Soft comparators on rows x (B, n); returns each layer's alpha (B, pairs).

    Infinite entries take part with certainty: each wire carries a class (-1 for -inf,
    +1 for +inf, 0 finite) and a comparator between different classes is hard, so no
    infinity reaches the arithmetic (finite stand-ins of 0 are carried instead).
    """
    finite = torch.isfinite(x)
    v = torch.where(finite, x, 0.0)
    # The comparators see differences only: the rows are centred on the midpoint of their
    # finite range (max/2 + min/2, no overflow), so a row clustered far from zero keeps its
    # differences exact (a constant row is exactly tied, whatever its magnitude), and halved,
    # so that every difference of two wires is finite (at most half the row's span).
    top = torch.where(finite, x, -math.inf).amax(-1, keepdim=True)
    bottom = torch.where(finite, x, math.inf).amin(-1, keepdim=True)
    mid = torch.where(top >= bottom, 0.5 * top + 0.5 * bottom, 0.0).detach()
    v = torch.where(finite, 0.5 * (v - mid), 0.0)
    track = not may_sync(finite) or not bool(finite.all())
    cls = torch.where(finite, 0, torch.where(x > 0, 1, -1)).to(torch.int8) if track else None
    alphas = []
    for lo, hi in net.layers:
        a, b = v[:, lo], v[:, hi]
        alpha = swap_probability(b - a, temperature, distribution, art_lambda, scale=0.5)
        # Where (b - a) / t is beyond 1e4 the comparator is hard and its derivative underflows
        # to 0 in every dtype: alpha is a constant there, so that the backward does not form
        # 0 * (a - b) / t products that overflow (inf * 0 = NaN).
        alpha = torch.where((b - a).abs() < 5e3 * temperature, alpha, alpha.detach())
        if cls is not None:
            ca, cb = cls[:, lo], cls[:, hi]
            alpha = torch.where(ca == cb, alpha, (ca < cb).to(alpha.dtype))
            cls = cls.index_copy(-1, lo, torch.minimum(ca, cb)).index_copy(-1, hi, torch.maximum(ca, cb))
        # min' = alpha a + (1 - alpha) b and max' = (1 - alpha) a + alpha b, written with
        # a - b once, so that d/d alpha never forms alpha-scaled huge values that cancel.
        gap = alpha * (a - b)
        new_lo = b + gap
        new_hi = a - gap
        v = v.index_copy(-1, lo, new_lo).index_copy(-1, hi, new_hi)
        alphas.append(alpha)
    return alphas


def _pull_back(e: Tensor, net: Network, alphas: list[Tensor]) -> Tensor:
    """Applies the transposed layers, last to first, to e (B, n) or (B, n, K)."""
    for (lo, hi), alpha in zip(reversed(net.layers), reversed(alphas), strict=True):
        if e.dim() == 3:
            alpha = alpha.unsqueeze(-1)
        el, eh = e.index_select(1, lo), e.index_select(1, hi)
        e = e.index_copy(1, lo, alpha * el + (1.0 - alpha) * eh).index_copy(
            1, hi, (1.0 - alpha) * el + alpha * eh
        )
    return e


def network_mask_rows(
    x: Tensor, k: Tensor, kind: str, temperature: float, distribution: str, art_lambda: float
) -> Tensor:
    r"""Top-k mask of a differentiable sorting network on rows x (B, n), k (B,).

    .. math::

        m = P^\top w,\qquad P = \prod_{\ell} P_\ell,\qquad
        w_p = \operatorname{clip}(k - (n - 1 - p), 0, 1),

    with P_l the doubly stochastic layer matrices of relaxed comparators
    (min' = alpha a + (1 - alpha) b, max' = (1 - alpha) a + alpha b, alpha = s((b - a)/t))
    and w the weights of the final positions p (ascending). Only the vector P^T w is
    propagated through the layers, never P.
    """
    net = network(kind, x.shape[-1], x.device)
    alphas = _run_network(x, net, temperature, distribution, art_lambda)
    n = x.shape[-1]
    rank = (n - 1 - torch.arange(n, device=x.device, dtype=x.dtype)).unsqueeze(0)
    w = (k.unsqueeze(-1) - rank).clamp(0.0, 1.0)
    e = torch.zeros_like(x).index_copy(-1, net.order, w)
    if not net.layers:
        # One wire, no comparator: the mask does not depend on x, but stays in its graph.
        e = e + 0.0 * torch.where(torch.isfinite(x), x, 0.0)
    return _pull_back(e, net, alphas)


def network_rows(
    x: Tensor, K: int, kind: str, temperature: float, distribution: str, art_lambda: float
) -> Tensor:
    """The first K rows (descending) of a sorting network's relaxed permutation: (B, K, n)."""
    B, n = x.shape
    net = network(kind, n, x.device)
    alphas = _run_network(x, net, temperature, distribution, art_lambda)
    K_eff = min(K, n)
    e = x.new_zeros(B, n, K_eff)
    wires = net.order.flip(0)[:K_eff]  # wire holding the r-th largest, r < K
    e[:, wires, torch.arange(K_eff, device=x.device)] = 1.0
    rows = _pull_back(e, net, alphas).transpose(-1, -2)
    present = x > -math.inf
    rows_present = torch.arange(K_eff, device=x.device).unsqueeze(0) < present.sum(-1, keepdim=True)
    rows = torch.where(rows_present.unsqueeze(-1), rows, 0.0)
    if K_eff < K:
        rows = torch.nn.functional.pad(rows, (0, 0, 0, K - K_eff))
    return rows


# --------------------------------------------------------------------- masks from rows


def permutation_rows(
    x: Tensor, K: int, method: str, temperature: float, *, power: float, distribution: str, art_lambda: float
) -> Tensor:
    """The first K rows of the relaxed permutation of rows x (B, n) by ``method``."""
    if method == "neuralsort":
        return neuralsort_rows(x, K, temperature)
    if method == "softsort":
        return softsort_rows(x, K, temperature, power)
    return network_rows(x, K, method, temperature, distribution, art_lambda)


def permutation_mask_rows(
    x: Tensor,
    k: Tensor,
    method: str,
    temperature: float,
    *,
    power: float,
    distribution: str,
    art_lambda: float,
) -> Tensor:
    """sum_r clip(k - r, 0, 1) P_r: the top-k mask of rows x (B, n) without +inf or NaN."""
    if method in NETWORKS:
        return network_mask_rows(x, k, method, temperature, distribution, art_lambda)
    n = x.shape[-1]
    K = max(1, min(n, math.ceil(float(k.amax().item())))) if may_sync(k) else n
    rows = permutation_rows(
        x, K, method, temperature, power=power, distribution=distribution, art_lambda=art_lambda
    )
    r = torch.arange(K, device=x.device, dtype=x.dtype)
    w = (k.unsqueeze(-1) - r).clamp(0.0, 1.0)
    return torch.einsum("bk,bkn->bn", w, rows)


def _method_options(
    method: str, power: object, distribution: object, art_lambda: object
) -> dict[str, object]:
    """Validates the options of a permutation method; each is rejected by the others."""
    if power is not None and method != "softsort":
        raise ValueError(
            f"power applies to method='softsort' only, got power={power!r} with method={method!r}"
        )
    for name, value in (("distribution", distribution), ("art_lambda", art_lambda)):
        if value is not None and method not in NETWORKS:
            raise ValueError(
                f"{name} applies to method='odd_even' or 'bitonic' only, "
                f"got {name}={value!r} with method={method!r}"
            )
    power = 1.0 if power is None else check_positive(power, "power")
    distribution = check_choice(
        "cauchy" if distribution is None else distribution, "distribution", DISTRIBUTIONS
    )
    art_lambda = 0.25 if art_lambda is None else check_positive(art_lambda, "art_lambda")
    return {"power": power, "distribution": distribution, "art_lambda": art_lambda}


def permutation_topk_mask(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    *,
    method: str = "neuralsort",
    temperature: float = 0.1,
    power: float | None = None,
    distribution: str | None = None,
    art_lambda: float | None = None,
) -> Tensor:
    r"""Top-k mask from a relaxed permutation matrix: NeuralSort, SoftSort or a sorting network.

    .. math::

        y = \sum_{r=1}^{n} \operatorname{clip}(k - r + 1, 0, 1)\, P_{r,:}

    where row r of the relaxed permutation P is a soft one-hot of the r-th largest entry:

    * ``"neuralsort"`` (Grover et al. 2019): P_r = softmax(((n + 1 - 2r) x - A 1)/t),
      A_jl = abs(x_j - x_l); row-stochastic only, so entries of y can exceed 1.
    * ``"softsort"`` (Prillo and Akinola 2020): P_r = softmax(-abs(x_(r) - x)^power / t);
      row-stochastic only.
    * ``"odd_even"``, ``"bitonic"`` (Petersen et al. 2021, 2022): relaxed comparators
      min' = alpha a + (1 - alpha) b, max' = (1 - alpha) a + alpha b with
      alpha = s((b - a)/t), for the CDF s = ``distribution`` (``"cauchy"``, the default
      of diffsort, and ``"logistic"``, ``"logistic_phi"`` with ``art_lambda``,
      ``"gaussian"``, ``"reciprocal"``, ``"optimal"``); the temperature is diffsort's
      1 / steepness. P is doubly stochastic, so y lies in [0, 1].

    Every row of y sums to k. The hard limit t -> 0 is the torch.topk mask (slowly, as
    O(t), for the heavy-tailed ``"cauchy"``). These are baselines: NeuralSort costs
    O(n log n + n k), SoftSort O(n log k + n k), the odd-even network O(n^2) time and
    memory (n layers) and the bitonic network O(n log^2 n); the mask is propagated
    through the network as one vector, never as the n x n matrix P.

    Args:
        x: scores, any shape, floating dtype; -inf entries are padding.
        k: budget in [0, n] or per-row tensor (see :func:`softtopk.topk_mask`);
            differentiable (piecewise linear) in a floating k.
        dim: dimension to select along.
        method: ``"neuralsort"``, ``"softsort"``, ``"odd_even"`` or ``"bitonic"``.
        temperature: t > 0 (NeuralSort's and SoftSort's tau; 1 / steepness for networks).
        power: SoftSort's exponent of abs(x_(r) - x_j) (default 1).
        distribution: the comparator CDF of a network (default ``"cauchy"``).
        art_lambda: lambda of ``"logistic_phi"`` (default 0.25).

    Returns:
        The mask, same shape and dtype as x. Rows with k = 0, k >= n, NaN or enough
        +inf entries follow the row rules of :func:`softtopk.topk_mask`; other +inf
        entries get 1 and the rest of the budget goes to the finite entries.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([0.3, 2.0, -1.0, 1.2])
        >>> softtopk.permutation_topk_mask(x, 2, method="odd_even", temperature=1e-3, distribution="logistic")
        tensor([0., 1., 0., 1.])
        >>> softtopk.permutation_topk_mask(x, 2, method="neuralsort", temperature=0.5).round(decimals=3)
        tensor([0.1220, 0.9790, 0.0000, 0.8990])

    References:
        Grover, Wang, Zweig, Ermon. "Stochastic Optimization of Sorting Networks via
        Continuous Relaxations", ICLR 2019. Prillo, Akinola. "SoftSort: A Continuous
        Relaxation for the argsort Operator", ICML 2020. Petersen, Borgelt, Kuehne,
        Deussen. "Differentiable Sorting Networks for Scalable Sorting and Ranking
        Supervision", ICML 2021; "Monotonic Differentiable Sorting Networks", ICLR 2022.
    """
    rows = rowwise(x, k, dim)
    method = check_choice(method, "method", PERMUTATION_METHODS)
    t = check_positive(temperature, "temperature")
    options = _method_options(method, power, distribution, art_lambda)
    v, kvec, cd = rows.x, rows.k, rows.x.dtype
    if v.numel() == 0:
        return empty_result(x, k)
    rules = classify(v, kvec)
    vr = regular_rows(v, rules)
    k_reg = torch.where(rules.regular, kvec, 1.0)
    plus = vr == math.inf
    if not may_sync(plus) or bool(plus.any()):
        # +inf entries are certain: they get 1, the rest of the budget goes to the others.
        y = permutation_mask_rows(
            torch.where(plus, -math.inf, vr), k_reg - rules.n_pos.to(cd), method, t, **options
        )
        y = torch.where(plus, 1.0, y)
    else:
        y = permutation_mask_rows(vr, k_reg, method, t, **options)
    return rows.restore(apply_rules(v, kvec, y, rules))
