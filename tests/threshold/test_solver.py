"""The threshold family against independent oracles (DESIGN 2.1, issue 2).

* sparse p = 2: the paper's sort + isotonic regression route (scipy), to 1e-10 in
  float64 and 1e-5 in float32, on thousands of random rows with ties and -inf padding;
* sparse p = 4/3, entropic, lapsum: float64 bisection;
* entropic: converged two-anchor Sinkhorn (SOFT) with its cost normalisation;
* lapsum: LapSum's sort-based closed form;
* the golden values of the reference implementation's README.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softtopk
from tests.conftest import random_rows
from tests.reference import oracles


def _batch(rng, rows, n, *, integer_k=False, pad=True):
    x = random_rows(rng, rows, n, pad=pad)
    k = rng.uniform(0.0, n, size=rows)
    if integer_k:
        k = np.floor(k)
    k[rng.random(rows) < 0.05] = 0.0
    k[rng.random(rows) < 0.05] = float(n)
    return x, k


def _oracle_rows(fn, x, k, **kw):
    return np.stack([fn(x[i], float(k[i]), **kw) for i in range(x.shape[0])])


SIZES = [(400, 2), (400, 5), (400, 8), (400, 16), (400, 17), (300, 64), (200, 300), (60, 1000), (24, 5000)]


@pytest.mark.parametrize("solver", ["auto", "newton", "sort"])
@pytest.mark.parametrize("rows,n", SIZES)
def test_sparse_p2_equals_isotonic_route_float64(rng, solver, rows, n):
    for t in (1e-3, 0.1, 1.0, 30.0):
        x, k = _batch(rng, rows, n)
        y = softtopk.topk_mask(torch.from_numpy(x), torch.from_numpy(k), temperature=t, solver=solver)
        ref = _oracle_rows(oracles.isotonic_sparse_mask, x, k, l=t)
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("rows,n", SIZES)
def test_sparse_p2_float32_within_1e5(rng, rows, n):
    for t in (1e-2, 0.1, 1.0):
        x, k = _batch(rng, rows, n)
        x32 = x.astype(np.float32)
        y = softtopk.topk_mask(torch.from_numpy(x32), torch.from_numpy(k).float(), temperature=t)
        assert y.dtype == torch.float32
        # The oracle sees exactly the float32 inputs and budgets, solved in float64.
        ref = _oracle_rows(oracles.isotonic_sparse_mask, x32.astype(np.float64), k.astype(np.float32), l=t)
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [8, 16, 17, 64, 1000])
def test_router_rows_with_small_budgets_equal_isotonic_route(rng, dtype, n):
    """Short rows and small k (the MoE shapes) take their own selection and, for p = 2,
    read tau off the sorted candidates: against the isotonic route on rows with ties,
    padding, whole and fractional budgets and hard rows (gaps wider than t)."""
    for t in (1e-3, 0.1, 1.0):
        x = random_rows(rng, 300, n)
        k = rng.integers(1, 5, size=300).astype(np.float64)
        k[::3] += rng.uniform(0.0, 1.0, size=k[::3].shape)
        xt, kt = torch.from_numpy(x).to(dtype), torch.from_numpy(k).to(dtype)
        y = softtopk.topk_mask(xt, kt, temperature=t)
        ref = _oracle_rows(oracles.isotonic_sparse_mask, xt.double().numpy(), kt.double().numpy(), l=t)
        np.testing.assert_allclose(y.double().numpy(), ref, atol=1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("n", [8, 16, 17, 64])
def test_router_rows_p43_equal_float64_bisection(rng, n):
    for t in (1e-3, 0.1, 1.0):
        x = random_rows(rng, 200, n)
        k = rng.integers(1, 5, size=200) + np.where(rng.random(200) < 0.3, rng.uniform(size=200), 0.0)
        y = softtopk.topk_mask(torch.from_numpy(x), torch.from_numpy(k), p=4.0 / 3.0, temperature=t)
        ref = _oracle_rows(oracles.bisection_mask, x, k, t=t, link="sparse", p=4.0 / 3.0)
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("p", [2.0 - 1e-13, 2.0 - 1e-9, 1.5 + 1e-14, 1.25])
@pytest.mark.parametrize("n", [8, 64])
def test_power_link_at_whole_and_near_whole_exponents_equals_float64_bisection(rng, p, n):
    """a = 1/(p - 1) near a whole number: 1 (p within 1e-12 of 2, where the link is
    z^a ~ z), 2 and 4 (z^(a-1) taken by products). The mask and its gradient."""
    x = random_rows(rng, 100, n)
    k = rng.integers(1, 4, size=100) + 0.5 * rng.random(100)
    for t in (0.05, 1.0):
        y = softtopk.topk_mask(torch.from_numpy(x), torch.from_numpy(k), p=p, temperature=t)
        ref = _oracle_rows(oracles.bisection_mask, x, k, t=t, link="sparse", p=p)
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-10, rtol=0)
    xt = torch.from_numpy(x[:4]).requires_grad_()
    kt = torch.from_numpy(k[:4])
    assert torch.autograd.gradcheck(lambda v: softtopk.topk_mask(v, kt, p=p, temperature=1.0), (xt,))


@pytest.mark.parametrize(
    "method,p,link",
    [
        ("sparse", 4.0 / 3.0, "sparse"),
        ("sparse", 1.5, "sparse"),
        ("entropic", 2.0, "logistic"),
        ("lapsum", 2.0, "laplace"),
    ],
)
@pytest.mark.parametrize("rows,n", [(200, 3), (200, 20), (60, 500), (8, 4000)])
@pytest.mark.slow
def test_links_equal_float64_bisection(rng, method, p, link, rows, n):
    for t in (0.05, 0.5, 5.0):
        x, k = _batch(rng, rows, n)
        y = softtopk.topk_mask(torch.from_numpy(x), torch.from_numpy(k), method=method, p=p, temperature=t)
        ref = _oracle_rows(oracles.bisection_mask, x, k, t=t, link=link, p=p)
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-10, rtol=0)


def test_bisection_oracle_agrees_with_isotonic_oracle(rng):
    """The two oracles are independent; they must agree where both apply (p = 2)."""
    x, k = _batch(rng, 100, 30)
    a = _oracle_rows(oracles.isotonic_sparse_mask, x, k, l=0.3)
    b = _oracle_rows(oracles.bisection_mask, x, k, t=0.3, link="sparse", p=2.0)
    np.testing.assert_allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("n,k", [(6, 3), (20, 5), (50, 10), (200, 7)])
@pytest.mark.parametrize("eps", [0.05, 0.2, 1.0])
def test_entropic_equals_converged_sinkhorn_soft(rng, n, k, eps):
    """SOFT selects the k smallest with eps on a max-normalised cost; our mask on -x with
    temperature eps * C_max / 2 is the same operator (C_max computed on SOFT's input)."""
    for _ in range(3):
        scores = rng.normal(size=n)
        soft = oracles.sinkhorn_soft(scores, k, eps)
        t = eps * oracles.soft_cost_max(scores) / 2.0
        ours = softtopk.topk_mask(torch.from_numpy(-scores), k, method="entropic", temperature=t)
        np.testing.assert_allclose(ours.numpy(), soft, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", ["auto", "sort"])
@pytest.mark.parametrize("n", [2, 10, 100, 2000])
def test_lapsum_equals_closed_form(rng, solver, n):
    for alpha in (0.05, 0.5, 3.0):
        x = rng.normal(size=(5, n))
        k = rng.uniform(0.5, n - 0.5, size=5)
        y = softtopk.topk_mask(
            torch.from_numpy(x), torch.from_numpy(k), method="lapsum", temperature=alpha, solver=solver
        )
        ref = _oracle_rows(oracles.lapsum_closed_form, x, k, alpha=alpha)
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-6, rtol=0)


def test_golden_values_of_the_reference_readme():
    """google-research sparse_soft_topk README: x = (-5, -2, 3, 1), k = 2, l = 1e-2."""
    x = torch.tensor([-5.0, -2.0, 3.0, 1.0])
    mask43 = softtopk.topk_mask(x, 2, temperature=1e-2, p=4.0 / 3.0)
    np.testing.assert_allclose(mask43.numpy(), [0.0, 0.0, 0.99999714, 0.99999714], atol=3e-6)
    mask2 = softtopk.topk_mask(x, 2, temperature=1e-2)
    np.testing.assert_allclose(mask2.numpy(), [0.0, 0.0, 0.99999905, 0.99999905], atol=1e-6)
    mag = softtopk.topk_mag(x, 2, temperature=1e-2)
    np.testing.assert_allclose(mag.numpy(), [-4.9999804, 0.0, 2.999993, 0.0], atol=2e-5)
    ties = softtopk.topk_mask(torch.tensor([0.0, 0.0, -5.0, 5.0]), 2, temperature=1e-2)
    np.testing.assert_allclose(ties.numpy(), [0.5, 0.5, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("method", ["sparse", "entropic", "lapsum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_is_k_to_relative_1e5(rng, method, dtype):
    for n in (10, 1000, 65536):
        x = torch.from_numpy(rng.normal(size=(4, n))).to(dtype)
        for k in (1.0, 7.5, n / 3):
            y = softtopk.topk_mask(x, k, method=method, temperature=0.1)
            torch.testing.assert_close(
                y.sum(-1, dtype=torch.float64), torch.full((4,), k, dtype=torch.float64), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
def test_exactly_k_nonzeros_when_the_gap_exceeds_the_temperature(rng, p):
    for n, k in [(10, 3), (1000, 10), (65536, 256)]:
        x = torch.from_numpy(rng.normal(size=(8, n))).float()
        top = x.topk(k + 1, dim=-1).values
        gap = (top[:, k - 1] - top[:, k]).min().item()
        t = 0.9 * gap
        y = softtopk.topk_mask(x, k, temperature=t, p=p)
        assert ((y > 0).sum(-1) == k).all()
        hard = torch.zeros_like(x).scatter_(-1, x.topk(k, dim=-1).indices, 1.0)
        assert torch.equal((y > 0).float(), hard)


def test_published_sinkhorn_soft_converges_to_the_entropic_mask(rng):
    """soft_sinkhorn_mask runs SOFT's iterations and implicit backward; converged, it is
    the entropic mask at temperature epsilon * C_max / 2, values and gradients."""
    x = torch.from_numpy(rng.normal(size=(4, 30))).requires_grad_()
    k = 6.0
    y = softtopk.soft_sinkhorn_mask(x, k, temperature=0.3, max_iter=5000)
    c_max = torch.maximum((x.detach() ** 2).amax(-1), ((x.detach() - 1) ** 2).amax(-1))
    ye = torch.stack(
        [
            softtopk.topk_mask(x[i], k, method="entropic", temperature=0.3 * c_max[i].item() / 2)
            for i in range(4)
        ]
    )
    torch.testing.assert_close(y, ye, atol=1e-10, rtol=0)
    v = torch.from_numpy(rng.normal(size=(4, 30)))
    (g1,) = torch.autograd.grad(y, x, v)
    (g2,) = torch.autograd.grad(ye, x, v)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=0)
    # And the numpy oracle of the published algorithm agrees (k smallest of -x).
    for i in range(4):
        ref = oracles.sinkhorn_soft(-x[i].detach().numpy(), k, 0.3)
        # Same construction up to the anchors' roles: the oracle normalises the cost of -x.
        t = 0.3 * oracles.soft_cost_max(-x[i].detach().numpy()) / 2
        ours = softtopk.topk_mask(x[i].detach(), k, method="entropic", temperature=t)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_published_sinkhorn_soft_reference_demo():
    """The reference demo: scores (5, 2, 3, 4, 1, 6), k = 3, eps = 0.05, 100 iterations,
    gives (.16, .84, .64, .36, .94, .06) for the k smallest; we select the largest."""
    y = softtopk.soft_sinkhorn_mask(
        torch.tensor([5.0, 2.0, 3.0, 4.0, 1.0, 6.0]), 3, temperature=0.05, max_iter=100
    )
    np.testing.assert_allclose(y.numpy(), 1.0 - np.array([0.16, 0.84, 0.64, 0.36, 0.94, 0.06]), atol=6e-3)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(
    "method,p,link",
    [
        ("sparse", 2.0, "sparse"),
        ("sparse", 4.0 / 3.0, "sparse"),
        ("entropic", 2.0, "logistic"),
        ("lapsum", 2.0, "laplace"),
    ],
)
def test_values_hidden_from_the_sample_are_still_found(rng, monkeypatch, backend, method, p, link):
    """The kernels bracket tau from a strided sample; a cluster of values just below the
    top, at positions the sample never reads, defeats the bracket. The row must still be
    solved exactly (the kernel checks its bracket and solves again)."""
    from softtopk.threshold import _cpu

    monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
    n, k, t = 20_000, 50, 0.05
    stride = n // _cpu.SAMPLE
    x = rng.normal(size=(6, n))
    top = np.sort(x[3])[-k]
    hidden = np.array([i for i in range(n) if i % stride][:3000])
    x[3, hidden] = top - 0.5 * t + 1e-3 * t * rng.random(hidden.size)
    x[4, hidden[:400]] = top + 5.0  # more than k entries far above the sampled top
    y = softtopk.topk_mask(torch.from_numpy(x), k, method=method, temperature=t, p=p)
    for i in range(6):
        ref = oracles.bisection_mask(x[i], k, t, link, p)
        np.testing.assert_allclose(y[i].numpy(), ref, atol=1e-9)


def test_lapsum_sort_route_at_a_tiny_temperature():
    x = torch.tensor([[0.6, -2.6, 0.48, 2.1]], dtype=torch.float64)
    y = softtopk.topk_mask(x, 2, method="lapsum", temperature=1e-5, solver="sort")
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("k", [1e-7, 3e-7, 1e-3])
def test_a_tiny_budget_is_not_snapped_away(k):
    y = softtopk.topk_mask(torch.tensor([[1.0, 0.0, -1.0]]), k)
    torch.testing.assert_close(y.sum(), torch.tensor(k), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("method,p", [("sparse", 4.0 / 3.0), ("sparse", 2.0), ("entropic", 2.0)])
@pytest.mark.parametrize("big", [1e24, 1e300])
def test_rows_spanning_many_orders_of_magnitude(monkeypatch, backend, method, p, big):
    # One huge entry makes the bracket ~1e30 t wide: 100 bisection steps did not reach
    # Newton's range on the reference route (the p = 4/3 mask summed to 1.45, not 2).
    monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
    x = torch.tensor([[0.0, big, 1e-9]], dtype=torch.float64)
    y = softtopk.topk_mask(x, 2, method=method, p=p, temperature=1e-6)
    torch.testing.assert_close(y.sum(-1), torch.full((1,), 2.0, dtype=torch.float64))
    ref = softtopk.topk_mask(x[:, [0, 2]], 1, method=method, p=p, temperature=1e-6)
    torch.testing.assert_close(y[:, [0, 2]], ref)
    assert y[0, 1] == 1


@pytest.mark.parametrize("route", ["torch", "cpu"])
@pytest.mark.parametrize("method", ["sparse", "entropic"])
def test_threshold_to_one_ulp_at_large_x_over_t(route, method, monkeypatch):
    """At x / t = 3e13, tau is resolved to about one ulp of 3e7: y within one quantum of exact.

    The CPU kernel stopped 7 ulps away (y = 0.268 for 0.25, the row summing to 0.536 for k = 0.5).
    """
    monkeypatch.setenv("SOFTTOPK_BACKEND", route)
    x = torch.tensor([[3e7, 3e7], [3e7, 3e7 - 1e-6]], dtype=torch.float64)
    y = softtopk.topk_mask(x, 0.5, temperature=1e-6, method=method)
    quantum = math.ulp(3e7) / 1e-6  # the spacing of (x - tau) / t
    assert (y[0] - 0.25).abs().max() <= 1.5 * quantum, y
    assert (y.sum(-1) - 0.5).abs().max() <= 3 * quantum, y


@pytest.mark.parametrize("method,p", [("sparse", 2.0), ("sparse", 4.0 / 3.0), ("entropic", 2.0)])
def test_cpu_route_in_parallel_chunks_equals_the_torch_route(method, p, monkeypatch):
    """A batch above the serial size on two threads: rows split in chunks, each with its scratch."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 1024, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, 1024, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for route in ("cpu", "torch"):
            monkeypatch.setenv("SOFTTOPK_BACKEND", route)
            y = softtopk.topk_mask(x, 10, method=method, p=p, temperature=0.3)
            results.append((y.detach(), torch.autograd.grad((y * w).sum(), x)[0]))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-8, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(
    row=st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, math.inf, -math.inf, math.nan]) | st.floats(-3, 3),
        min_size=1,
        max_size=16,
    )
)
def test_short_rows_are_sorted_as_a_stable_sort_of_their_finite_entries(row):
    """The short-row path ranks the finite entries (ties in index order) without branches:
    the same order as a stable descending sort, NaN and infinities left out."""
    from softtopk.threshold import _cpu

    x = np.asarray(row, dtype=np.float64)
    sv = np.full(x.size, np.nan)
    si = np.full(x.size, -1, dtype=np.int64)
    m = _cpu._rank_sort(x, sv, si)
    finite = np.flatnonzero(np.isfinite(x))
    order = finite[np.argsort(-x[finite], kind="stable")]
    assert m == finite.size
    np.testing.assert_array_equal(si[:m], order)
    np.testing.assert_array_equal(sv[:m], x[order])


_SCAN_VALUE = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 5e-324, -5e-324, 1e-40, 3.4e38, -3.4e38, 1.7e308, -1.7e308]
    + [math.inf, -math.inf, math.nan]
) | st.floats(-3, 3)


@settings(max_examples=80, deadline=None)
@given(
    row=st.integers(0, 200).flatmap(lambda n: st.lists(_SCAN_VALUE, min_size=n, max_size=n)),
    dtype=st.sampled_from([np.float32, np.float64]),
    lower=_SCAN_VALUE,
    upper=st.sampled_from([math.inf, 3.0, 1.0, 0.0, -0.0, 1e-40]) | st.floats(-3, 3),
    zero=st.booleans(),
)
def test_row_scans_equal_numpy(row, dtype, lower, upper, zero):
    """The scans that compare floats as integer keys (the finite maximum, the values'
    range) and the block-wise collection of candidates equal NumPy's, with signed zeros,
    subnormals, the largest floats, infinities and NaN, across the blocks' boundaries."""
    from softtopk.threshold import _cpu

    with np.errstate(over="ignore"):
        x = np.asarray(row, dtype=np.float64).astype(dtype)
    finite = x[np.isfinite(x)].astype(np.float64)
    top = _cpu._finite_max(x)
    assert top == (finite.max() if finite.size else -math.inf)
    lo, hi = _cpu._value_range(finite, finite.size)
    assert (lo, hi) == ((finite.min(), finite.max()) if finite.size else (math.inf, -math.inf))
    y = np.full_like(x, 7.0)
    sv = np.full(x.size, np.nan)
    si = np.full(x.size, -1, dtype=np.int64)
    c = _cpu._collect(x, y, lower, upper, sv, si, zero)
    xd = x.astype(np.float64)  # (the kernel compares in float64)
    want = np.flatnonzero((xd > lower) & (xd < upper))
    np.testing.assert_array_equal(si[:c], want)
    np.testing.assert_array_equal(sv[:c], xd[want])
    np.testing.assert_array_equal(y, np.zeros_like(x) if zero else np.full_like(x, 7.0))


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 48),
    k_frac=st.floats(0.0, 1.0),
    gap=st.floats(1.5, 50.0),
    plus_inf=st.booleans(),
    top_ties=st.integers(1, 4),
    rest_ties=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_hard_rows_threshold_in_the_middle_of_the_flat_piece(
    n, k_frac, gap, plus_inf, top_ties, rest_ties, seed
):
    """A hard row of the clip link (x_(k) - x_(k+1) > t) has every tau in [x_(k+1), x_(k) - t]
    as a root; the kernel returns the middle, away from the ends where an entry would sit a
    rounding error off 0 or 1 (a +inf entry takes one unit of k first), ties at x_(k) and at
    x_(k+1) included, and the row's gradient is zero."""
    from softtopk.threshold import _cpu

    rng = np.random.default_rng(seed)
    k = 1 + int(k_frac * (n - 2)) if n > 2 else 1
    t = 0.01 + 0.5 * rng.random()
    top = np.sort(rng.uniform(0.0, 1.0, size=k)) + gap * t  # the k largest, above the rest by gap * t
    top[: min(top_ties, k)] = top[0]  # ties at x_(k)
    rest = -np.sort(rng.uniform(0.0, 1.0, size=n - k))
    rest[: min(rest_ties, n - k)] = rest[:1]  # ties at x_(k+1)
    x = rng.permutation(np.concatenate([top, rest]))
    if plus_inf:
        x[int(rng.integers(n))] = math.inf  # replaces one entry: k budgets the rest
    finite = np.sort(x[np.isfinite(x)])[::-1]
    kk = k - int(plus_inf)
    if kk <= 0 or kk >= finite.size or finite[kk - 1] - finite[kk] <= t:
        return
    y = np.empty((1, n))
    tau = np.empty(1)
    _cpu.forward_serial(x[None], np.array([float(k)]), np.array([t]), _cpu.CLIP, 2.0, y, tau)
    middle = 0.5 * (finite[kk] + finite[kk - 1] - t)
    assert abs(tau[0] - middle) <= 1e-12 * (1.0 + abs(middle))
    np.testing.assert_array_equal(np.sort(y[0])[::-1], np.r_[np.ones(k), np.zeros(n - k)])
    grad_x = np.empty((1, n))
    grad_k = np.empty(1)
    v = rng.standard_normal((1, n))
    _cpu.backward_serial(y, y, tau, np.array([t]), v, _cpu.CLIP, 2.0, grad_x, grad_k)
    np.testing.assert_array_equal(grad_x, np.zeros((1, n)))


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(3, 16),
    k=st.integers(1, 3),
    rel=st.sampled_from([-1e-9, -1e-14, -2e-16, 0.0, 2e-16, 1e-14, 1e-9, 0.5]),
    t=st.sampled_from([0.1, 1.0, 1e-6]),
    scale=st.sampled_from([1.0, 1e6]),
    seed=st.integers(0, 2**16),
    p=st.sampled_from([2.0, 4.0 / 3.0]),
)
def test_short_rows_near_the_hard_gap_equal_the_row_path(n, k, rel, t, scale, seed, p):
    """Short rows (at most SHORT entries) of the sparse links whose gap x_(k) - x_(k+1) is t
    up to a few ulps give the mask of the same finite entries solved by the longer rows'
    path (the row padded with -inf past SHORT), whether or not the short path reads the
    row as hard, and the same threshold where it is unique (p = 2: the middle of a hard
    row's flat piece on both paths; p < 2: rows with a fractional entry)."""
    from softtopk.threshold import _cpu

    rng = np.random.default_rng(seed)
    if k >= n:
        return
    rest = -rng.uniform(0.0, 3.0, size=n - k) * t
    top = rest.max() + t * (1.0 + rel) + rng.uniform(0.0, 3.0, size=k) * t
    top[np.argmin(top)] = rest.max() + t * (1.0 + rel)
    x = rng.permutation(np.concatenate([top, rest])) + scale
    padded = np.r_[x, np.full(_cpu.SHORT + 1 - n, -math.inf)]
    ys, taus = [], []
    for row in (x, padded):
        y = np.empty((1, row.size))
        tau = np.empty(1)
        code = _cpu.CLIP if p == 2.0 else _cpu.POWER
        _cpu.forward_serial(row[None], np.array([float(k)]), np.array([t]), code, p, y, tau)
        ys.append(y[0, :n])
        taus.append(tau[0])
    np.testing.assert_allclose(ys[0], ys[1], rtol=0, atol=1e-12)
    assert abs(ys[0].sum() - k) <= 1e-9 * k
    if p == 2.0 or ((ys[1] > 1e-6) & (ys[1] < 1 - 1e-6)).any():
        assert abs(taus[0] - taus[1]) <= 1e-9 * (t + scale)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 16),
    extra=st.integers(0, 40),
    t_rel=st.sampled_from([1e-4, 1e-2, 0.3, 1.0, 30.0, 1e3]),
    scale=st.sampled_from([1e-3, 1.0, 1e6]),
    whole_k=st.booleans(),
    ties=st.booleans(),
    specials=st.integers(0, 5),
    dtype=st.sampled_from([np.float32, np.float64]),
    code=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
def test_short_dense_rows_in_lanes_equal_the_row_path(
    n, extra, t_rel, scale, whole_k, ties, specials, dtype, code, seed
):
    """Batches of short rows of the dense links (LANES rows at a time, one per vector lane,
    with the rows past the last full block and the lanes that are not plain on the row
    path) give the mask, threshold and gradients of each row solved alone, which takes
    the row path: y to 1e-12 (1e-6 in float32), tau to 1e-12 of the row's scale, the
    gradients to 1e-12 (1e-6) of max |v| / t, the same rules' rows.
    The batches hold NaN, +-inf and huge entries, k = 0, k = n, k beyond n and NaN k."""
    from softtopk.threshold import _cpu

    rng = np.random.default_rng(seed)
    rows = _cpu.LANES + extra
    x = rng.standard_normal((rows, n)) * scale
    if ties:
        x = np.round(2.0 * x / scale) / 2.0 * scale
    big = 1e305 if dtype == np.float64 else 3e38
    for _ in range(specials):
        x[rng.integers(rows), rng.integers(n)] = rng.choice([math.inf, -math.inf, math.nan, big, -big, 1e30])
    k = rng.uniform(0.0, n, size=rows)
    k = np.floor(k) if whole_k else k
    k[rng.integers(rows, size=3)] = [0.0, float(n), n + 0.5]
    if specials:
        k[rng.integers(rows)] = math.nan
    t = np.full(rows, t_rel * scale)
    x = x.astype(dtype)
    v = rng.standard_normal((rows, n)).astype(dtype)
    if specials:
        # an infinite cotangent: its entry's slope decides whether the row's c is finite
        v[rng.integers(rows), rng.integers(n)] = math.inf
    y = np.empty_like(x)
    tau = np.empty(rows)
    _cpu.forward_serial(x, k, t, code, 2.0, y, tau)
    grad_x = np.empty_like(x)
    grad_k = np.empty(rows)
    _cpu.backward_serial(y, x, tau, t, v, code, 2.0, grad_x, grad_k)
    atol = 1e-6 if dtype == np.float32 else 1e-12
    for b in range(rows):
        one = slice(b, b + 1)
        yb = np.empty_like(x[one])
        taub = np.empty(1)
        _cpu.forward_serial(x[one], k[one], t[one], code, 2.0, yb, taub)
        np.testing.assert_allclose(y[b], yb[0], rtol=0, atol=atol)
        if math.isfinite(taub[0]):
            size = max(t[b], float(np.abs(x[b].astype(np.float64)).max()))
            assert abs(tau[b] - taub[0]) <= 1e-12 * size, (b, tau[b], taub[0])
        else:
            assert tau[b] == taub[0] or (math.isnan(tau[b]) and math.isnan(taub[0]))
        # the backward of the same row alone (from the batch's y and tau, so that it
        # compares the two backward paths only)
        gxb = np.empty_like(x[one])
        gkb = np.empty(1)
        _cpu.backward_serial(y[one], x[one], tau[one], t[one], v[one], code, 2.0, gxb, gkb)
        finite_v = np.abs(v[b][np.isfinite(v[b])])
        g_size = (float(finite_v.max()) if finite_v.size else 1.0) / t[b]
        np.testing.assert_allclose(grad_x[b], gxb[0], rtol=0, atol=atol * g_size, equal_nan=True)
        np.testing.assert_allclose(grad_k[b], gkb[0], rtol=0, atol=atol * g_size * t[b], equal_nan=True)


@pytest.mark.parametrize("code", [2, 3])
def test_short_dense_backward_in_lanes_gives_no_slope_where_y_underflowed(code):
    """A float32 entry at z = -200 has y = 0 but a float64 slope e^-200 from z: the row path
    gives it no slope, so an infinite cotangent there leaves the row's gradient finite;
    the lanes (the same row 32 times) must agree."""
    from softtopk.threshold import _cpu

    rows = _cpu.LANES
    x = np.tile(np.array([0.0, -0.5, -1.0, -200.0], dtype=np.float32), (rows, 1))
    k = np.full(rows, 1.5)
    t = np.ones(rows)
    v = np.tile(np.array([1.0, -2.0, 0.5, math.inf], dtype=np.float32), (rows, 1))
    y = np.empty_like(x)
    tau = np.empty(rows)
    _cpu.forward_serial(x, k, t, code, 2.0, y, tau)
    assert (y[:, 3] == 0).all()
    grad_x = np.empty_like(x)
    grad_k = np.empty(rows)
    _cpu.backward_serial(y, x, tau, t, v, code, 2.0, grad_x, grad_k)
    one_x = np.empty_like(x[:1])
    one_k = np.empty(1)
    _cpu.backward_serial(y[:1], x[:1], tau[:1], t[:1], v[:1], code, 2.0, one_x, one_k)
    assert np.isfinite(one_x).all() and np.isfinite(one_k).all()
    np.testing.assert_allclose(grad_x, np.tile(one_x, (rows, 1)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad_k, np.full(rows, one_k[0]), rtol=0, atol=1e-6)


def test_kernel_rows_whose_spread_overflows_end():
    """x_(1) - x_(n) overflows float64 (the closed form's breakpoints reach -inf): the walk
    over them ends (it used to loop forever) with the hard mask. (``topk_mask`` refuses
    such rows before the kernel; the kernel must not hang on them either.)"""
    from softtopk.threshold import _cpu

    x = np.array([[1e308, 9e307, -1e308]])
    y = np.empty_like(x)
    tau = np.empty(1)
    _cpu.forward_serial(x, np.array([2.0]), np.array([1.0]), _cpu.CLIP, 2.0, y, tau)
    np.testing.assert_array_equal(y, [[1.0, 1.0, 0.0]])


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([5, 64, 65, 700, 3000]),
    spread=st.floats(1e-2, 1e4),
    k_frac=st.floats(0.0, 1.0),
    method=st.sampled_from(["entropic", "lapsum"]),
    seed=st.integers(0, 2**16),
)
def test_dense_links_on_rows_spanning_many_temperatures_equal_the_torch_route(
    n, spread, k_frac, method, seed
):
    """The dense links' Newton reads e^((x - tau)/t) off an anchor within a few dozen t of
    tau and moves the anchor with tau: rows spread over up to 1e4 t (bisection steps far
    from the anchor) give the tensor-op route's mask, which takes one exponential per entry."""
    g = torch.Generator().manual_seed(seed)
    x = spread * torch.randn(3, n, generator=g, dtype=torch.float64)
    k = k_frac * n
    results = []
    for route in ("cpu", "torch"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SOFTTOPK_BACKEND", route)
            results.append(softtopk.topk_mask(x, k, method=method, temperature=1.0))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-9)
    torch.testing.assert_close(
        results[0].sum(-1), torch.full((3,), k, dtype=torch.float64), rtol=0, atol=1e-9
    )


@settings(max_examples=30, deadline=None)
@given(
    extra=st.integers(0, 130),
    places=st.lists(st.integers(0, 10**6), min_size=1, max_size=12),
    t=st.sampled_from([1e-3, 0.3, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_power_link_backward_on_long_rows_equals_the_torch_route(extra, places, t, seed):
    """Rows beyond BLOCK_SCAN find their support (0 < y < 1) in blocks: large entries
    anywhere, on both sides of the last full block; the gradient against the tensor route."""
    from softtopk.threshold import _cpu

    n = _cpu.BLOCK_SCAN + _cpu.COLLECT_BLOCK + extra
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n) * 1e-3
    full = n - n % _cpu.COLLECT_BLOCK
    spots = sorted({q % n for q in places} | {full - 1, min(full, n - 1)})
    x[spots] = rng.uniform(1.0, 2.0, size=len(spots))
    xt = torch.from_numpy(x)[None]
    v = torch.from_numpy(rng.normal(size=(1, n)))
    grads = []
    for route in ("cpu", "torch"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SOFTTOPK_BACKEND", route)
            xr = xt.clone().requires_grad_()
            y = softtopk.topk_mask(xr, len(spots) - 0.5, p=4.0 / 3.0, temperature=t)
            grads.append(torch.autograd.grad(y, xr, v)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([6000, 20000]),
    k=st.floats(1e-3, 8.0),
    t=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
    lift=st.floats(0.0, 60.0),
    n_top=st.integers(0, 4),
    infinities=st.booleans(),
    method=st.sampled_from(["entropic", "lapsum"]),
    seed=st.integers(0, 2**16),
)
def test_dense_links_with_a_budget_below_one_sampled_entry_equal_the_torch_route(
    n, k, t, lift, n_top, infinities, method, seed
):
    """k far below n / DENSE_SAMPLE: the strided sample holds no entry above tau on
    average, and the few top entries (lifted by up to 60 t, off the sample's stride) are
    not in it. The band's upper end is then also bounded from the row's largest entry."""
    from softtopk.threshold import _cpu

    assert n > _cpu.TINY  # the rows take the band path
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, generator=g, dtype=torch.float64)
    where = torch.randint(0, n, (2, n_top), generator=g) | 1  # odd: off an even stride
    x.scatter_add_(1, where, torch.full((2, n_top), lift * t, dtype=torch.float64))
    if infinities:
        x[:, 2] = -math.inf
        x[1, 4] = math.inf
    results = []
    for route in ("cpu", "torch"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SOFTTOPK_BACKEND", route)
            results.append(softtopk.topk_mask(x, k, method=method, temperature=t))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-9)
    torch.testing.assert_close(
        results[0].sum(-1), torch.full((2,), k, dtype=torch.float64), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("method", ["entropic", "lapsum"])
@pytest.mark.parametrize("n_pos", [1, 3])
@pytest.mark.parametrize("k", [20.0, 100.0, 1500.5])
def test_dense_links_on_long_rows_with_infinite_entries(method, n_pos, k):
    """Rows long enough for the band path, with +inf entries (each gets 1, the rest share
    k - n_pos) and -inf entries (0). The band's count of entries above it once included
    the +inf entries that the budget had already taken out: the mask summed to k - n_pos."""
    from softtopk.threshold import _cpu

    n = _cpu.TINY + 2000  # the band path
    g = torch.Generator().manual_seed(int(k) + n_pos)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    x[:, 7 : 7 + n_pos] = math.inf
    x[:, 100:103] = -math.inf
    results = []
    for route in ("cpu", "torch"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SOFTTOPK_BACKEND", route)
            results.append(softtopk.topk_mask(x, k, method=method, temperature=0.1))
    assert torch.equal(results[0][:, 7 : 7 + n_pos], torch.ones(3, n_pos, dtype=torch.float64))
    assert torch.equal(results[0][:, 100:103], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-9)
    torch.testing.assert_close(
        results[0].sum(-1), torch.full((3,), k, dtype=torch.float64), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("method", ["entropic", "lapsum", "soft"])
@pytest.mark.parametrize("k", [5e-324, 1e-310, 1e-300])
def test_dense_links_with_a_budget_below_the_rounding_of_n(method, k):
    """k / n underflows to 0, so the first bracket is infinite: Newton starts on it without
    the anchored exponentials (found by the long property profile: a ZeroDivisionError)."""
    for x in (torch.zeros(1, 2), torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.float64)):
        y = softtopk.topk_mask(x, k, method=method, temperature=0.1)
        assert torch.isfinite(y).all() and (y >= 0).all()
        assert float(y.sum()) <= 1e-6


@pytest.mark.parametrize("method", ["entropic", "lapsum", "soft"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_dense_links_at_a_temperature_near_the_float64_limit(method, backend, monkeypatch):
    """t near 1e308: x / t is below 1e-300, so every entry gets k / n. tau lies about
    3.5 t beyond the entries there, past the float64 limit, unless the row is rescaled
    (the CPU kernels returned the zero mask for t >= 1e308, and before that raised
    ZeroDivisionError in numba on lapsum: the first bracket is infinite)."""
    monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (1e303, 1e307, 1e308, 1.7e308):
        y = softtopk.topk_mask(x, 3, method=method, temperature=t)
        torch.testing.assert_close(y, torch.full_like(y, 0.03), rtol=1e-12, atol=0.0)
