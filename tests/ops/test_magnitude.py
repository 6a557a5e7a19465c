"""topk_mag (Sander et al. 2023, DESIGN 2.2) against the sort + weighted isotonic route."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softtopk
from tests.reference import oracles


def _rows(rng, rows, n, ties):
    x = rng.normal(size=(rows, n)) * rng.choice([0.1, 1.0, 10.0], size=(rows, 1))
    if ties:
        x = np.round(x * 4) / 4
    return x


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("rows,n", [(300, 3), (300, 12), (100, 100), (30, 1000), (6, 20000)])
def test_equals_weighted_isotonic_route_float64(rng, debias, rows, n):
    for l in (1e-3, 0.1, 1.0, 10.0):
        for ties in (False, True):
            x = _rows(rng, rows, n, ties)
            k = rng.integers(0, n + 1, size=rows)
            y = softtopk.topk_mag(torch.from_numpy(x), torch.from_numpy(k), temperature=l, debias=debias)
            ref = np.stack([oracles.isotonic_magnitude(x[i], int(k[i]), l, debias) for i in range(rows)])
            np.testing.assert_allclose(y.numpy(), ref, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("rows,n", [(300, 12), (30, 1000), (4, 70000)])
def test_float32_within_1e5_relative(rng, rows, n):
    for l in (0.01, 0.1, 1.0):
        x = _rows(rng, rows, n, False).astype(np.float32)
        k = rng.integers(1, n, size=rows)
        y = softtopk.topk_mag(torch.from_numpy(x), torch.from_numpy(k), temperature=l)
        ref = np.stack(
            [oracles.isotonic_magnitude(x[i].astype(np.float64), int(k[i]), l) for i in range(rows)]
        )
        scale = np.abs(x).max(1, keepdims=True)
        np.testing.assert_array_less(np.abs(y.numpy() - ref) / scale, 1e-5)


def test_hard_when_the_gap_is_wide():
    """|x|_(k) >= (1 + l) |x|_(k+1) gives exactly x * topkmask(|x|)."""
    x = torch.tensor([[4.0, -3.0, 1.0, -0.5, 2.5]])
    torch.testing.assert_close(
        softtopk.topk_mag(x, 2, temperature=0.1), torch.tensor([[4.0, -3.0, 0.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(
        softtopk.topk_mag(x, 2, temperature=0.1, debias=False),
        torch.tensor([[4.0, -3.0, 0.0, 0.0, 0.0]]) / 1.1,
    )


def test_firm_threshold_shape():
    """psi(s) = s above (1+l) tau, (1+l)(s - tau)/l in the band, 0 below tau."""
    x = torch.tensor([5.0, 3.0, 2.9, 2.8, 0.1], dtype=torch.float64)
    l = 0.5
    y = softtopk.topk_mag(x, 2, temperature=l)
    # Solve h(tau) = 0 by hand: band entries 3.0 (rank 2), 2.9, 2.8 (ranks 3, 4).
    tau = (3.0 + 2.9 + 2.8) / ((1 + l) + 1 + 1)
    expected = torch.tensor(
        [5.0, (1 + l) * (3.0 - tau) / l, (1 + l) * (2.9 - tau) / l, (1 + l) * (2.8 - tau) / l, 0.0]
    )
    torch.testing.assert_close(y, expected.double())


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("n", [8, 300, 3000])
def test_gradcheck(debias, n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: softtopk.topk_mag(a, max(1, n // 10), temperature=0.5, debias=debias),
        (x,),
        fast_mode=n > 100,
    )


def test_plain_output_is_the_gradient_of_the_smoothed_function(rng):
    """debias=False returns grad f_l with f_l = (f* + l/2 ||.||^2)*, f = 1/2 sum_{i<=k} |x|_[i]^2.

    f_l(x) = min_u f(u) + ||x - u||^2 / (2 l) (Moreau envelope); its gradient is
    (x - prox_{l f}(x)) / l. Check against a finite difference of the envelope value,
    computed as <y, x> - l/2 ||y||^2 ... via the identity f_l(x) = sup_y <x,y> - f*(y) - l/2||y||^2,
    here numerically by central differences of the scalar potential built from y.
    """
    x = torch.from_numpy(rng.normal(size=40))
    k, l = 7, 0.3

    def envelope(v: torch.Tensor) -> torch.Tensor:
        # Moreau envelope min_u 1/2 sum_top_k(|u|^2) + ||v - u||^2/(2l): separable once the
        # top-k set of u is fixed; the minimiser is the plain output's prox, so evaluate it.
        y = softtopk.topk_mag(v, k, temperature=l, debias=False)
        u = v - l * y
        top = torch.topk(u.abs(), k).values
        return 0.5 * (top**2).sum() + ((v - u) ** 2).sum() / (2 * l)

    y = softtopk.topk_mag(x, k, temperature=l, debias=False)
    h = 1e-6
    for i in range(0, 40, 5):
        e = torch.zeros(40, dtype=torch.float64)
        e[i] = h
        fd = (envelope(x + e) - envelope(x - e)) / (2 * h)
        assert abs(fd.item() - y[i].item()) < 1e-5


def test_edges():
    x = torch.tensor([[1.0, -2.0, 0.0, 3.0]], dtype=torch.float64)
    assert torch.equal(softtopk.topk_mag(x, 0), torch.zeros_like(x))
    torch.testing.assert_close(softtopk.topk_mag(x, 4), x)
    torch.testing.assert_close(softtopk.topk_mag(x, 4, debias=False, temperature=0.5), x / 1.5)
    inf = torch.tensor([[math.inf, -2.0, 0.5, -math.inf]], dtype=torch.float64)
    y = softtopk.topk_mag(inf, 3, temperature=0.1)
    assert y[0, 0] == math.inf and y[0, 3] == -math.inf and y[0, 1] == -2.0
    assert torch.isnan(softtopk.topk_mag(inf, 1)).all()
    nan = torch.tensor([[1.0, math.nan, 2.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    y = softtopk.topk_mag(nan, 1, temperature=0.01)
    assert torch.isnan(y[0]).all() and torch.equal(y[1], torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64))


def test_pav_oracle_agrees_with_the_isotonic_oracle_at_p2(rng):
    for _ in range(20):
        x = rng.normal(size=15)
        k = int(rng.integers(1, 15))
        for debias in (True, False):
            np.testing.assert_allclose(
                oracles.pav_magnitude(x, k, 0.3, 2.0, debias),
                oracles.isotonic_magnitude(x, k, 0.3, debias),
                atol=1e-10,
            )


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("rows,n", [(60, 4), (40, 15), (4, 150), (1, 800)])
@pytest.mark.slow
def test_p43_equals_pav_route_float64(rng, debias, rows, n):
    for l in (1e-2, 0.1, 1.0):
        for ties in (False, True):
            x = _rows(rng, rows, n, ties)
            k = rng.integers(0, n + 1, size=rows)
            y = softtopk.topk_mag(
                torch.from_numpy(x), torch.from_numpy(k), temperature=l, p=4 / 3, debias=debias
            )
            ref = np.stack([oracles.pav_magnitude(x[i], int(k[i]), l, 4 / 3, debias) for i in range(rows)])
            np.testing.assert_allclose(y.numpy(), ref, atol=1e-9, rtol=1e-9)


def test_p43_golden_values_of_the_reference_readme():
    """mag_pav (p = 4/3), x = (-5, -2, 3, 1), k = 2, l = 1e-2: (-5.000036, -0, 2.9999416, 0)
    in the reference's float32; the float64 answer is within its rounding."""
    y = softtopk.topk_mag(
        torch.tensor([-5.0, -2.0, 3.0, 1.0], dtype=torch.float64), 2, temperature=1e-2, p=4 / 3
    )
    np.testing.assert_allclose(y.numpy(), [-5.000036, 0.0, 2.9999416, 0.0], atol=1e-4)


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.slow
def test_p43_gradcheck(debias):
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: softtopk.topk_mag(a, 6, temperature=0.5, p=4 / 3, debias=debias), (x,)
    )


@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
def test_rows_of_length_one_and_k_zero(p):
    for x, k, expected in [([[0.5]], 1, [[0.5]]), ([[0.5]], 0, [[0.0]]), ([0.5, -1.0], 0, [0.0, 0.0])]:
        y = softtopk.topk_mag(torch.tensor(x), k, p=p)  # the first raised an index error
        torch.testing.assert_close(y, torch.tensor(expected))


def _route(name, fn, *args, **kwargs):
    old = os.environ.get("SOFTTOPK_BACKEND")
    os.environ["SOFTTOPK_BACKEND"] = name
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            del os.environ["SOFTTOPK_BACKEND"]
        else:
            os.environ["SOFTTOPK_BACKEND"] = old


def _value_and_grad(x, w, **kwargs):
    x = x.clone().requires_grad_()
    y = softtopk.topk_mag(x, **kwargs)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    return y.detach(), g


@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("rows,n,k", [(40, 3, 1), (40, 8, 2), (30, 100, 10), (6, 3000, 40), (5, 7, 7)])
def test_cpu_kernel_equals_the_tensor_route(rng, p, debias, rows, n, k):
    """The numba kernel (short rows on every entry, long rows from a sample) against the reference."""
    x = torch.from_numpy(rng.standard_normal((rows, n)))
    x[:2, -1] = math.inf
    x[2, 0] = -math.inf
    x[3, 1] = math.nan
    w = torch.randn(rows, n, dtype=torch.float64)
    for t in (0.01, 0.3):
        kwargs = dict(k=k, temperature=t, p=p, debias=debias)
        y_cpu, g_cpu = _route("cpu", _value_and_grad, x, w, **kwargs)
        y_ref, g_ref = _route("torch", _value_and_grad, x, w, **kwargs)
        torch.testing.assert_close(y_cpu, y_ref, rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(g_cpu, g_ref, rtol=1e-9, atol=1e-9, equal_nan=True)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 16),
    data=st.data(),
    p=st.sampled_from([2.0, 4.0 / 3.0]),
    debias=st.booleans(),
    t=st.sampled_from([1e-3, 0.1, 1.0]),
    ties=st.booleans(),
    n_inf=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_short_rows_equal_the_longer_rows_path(n, data, p, debias, t, ties, n_inf, seed):
    """Rows of at most SHORT entries (their magnitudes sorted whole) against the longer rows'
    path on the same entries padded with zeros past SHORT (zeros stay below s_(k+1)):
    outputs, the saved (b, w, a, ties) and gradients. Ties at the k-th magnitude, infinite
    entries."""
    from softtopk.ops import _magnitude_cpu as mc

    rng = np.random.default_rng(seed)
    x = rng.normal(size=n) * rng.choice([0.01, 1.0, 100.0])
    if ties:
        x = np.round(x * 2) / 2 + 0.25 * np.sign(x)  # equal magnitudes, none zero
    x[: min(n_inf, n - 1)] = [math.inf, -math.inf][: min(n_inf, n - 1)]
    finite = n - min(n_inf, n - 1)
    k = data.draw(st.integers(min(n_inf, n - 1), min(n_inf, n - 1) + finite - 1))  # kk < finite
    r = 1 if p == 2.0 else 3
    gy = rng.normal(size=n)
    outs = []
    for row in (x, np.r_[x, np.zeros(mc.SHORT + 1 - n)]):
        y = np.empty((1, row.size))
        info = np.empty((1, 4))
        mc.forward_serial(row[None], np.array([float(k)]), t, r, debias, y, info)
        g = np.empty((1, row.size))
        mc.backward_serial(row[None], info, t, r, debias, np.r_[gy, np.zeros(row.size - n)][None], g)
        outs.append((y[0, :n], info[0], g[0, :n]))
    (y0, info0, g0), (y1, info1, g1) = outs
    scale = np.abs(x[np.isfinite(x)]).max()
    np.testing.assert_allclose(y0, y1, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(info0, info1, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(g0, g1, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    extra=st.integers(0, 130),
    places=st.lists(st.integers(0, 10**6), min_size=1, max_size=12),
    n_inf=st.integers(0, 2),
    p=st.sampled_from([2.0, 4.0 / 3.0]),
    t=st.sampled_from([1e-3, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_long_rows_find_their_entries_above_tau_in_any_block(extra, places, n_inf, p, t, seed):
    """Rows beyond BLOCK_SCAN, scanned in blocks of COLLECT_BLOCK in both directions: the
    large entries (and the infinite ones) anywhere, in the last full block or in the partial
    one after it. Output and gradient against the tensor route."""
    from softtopk.ops import _magnitude_cpu as mc

    n = mc.BLOCK_SCAN + mc.COLLECT_BLOCK + extra
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n) * 1e-3
    full = n - n % mc.COLLECT_BLOCK  # the last full block's end: both of its sides get a spot
    spots = sorted({q % n for q in places} | {full - 1, min(full, n - 1)})
    x[spots] = rng.choice([-1.0, 1.0], size=len(spots)) * rng.uniform(1.0, 2.0, size=len(spots))
    x[spots[:n_inf]] = math.inf
    k = max(n_inf, len(spots) - 1)
    xt = torch.from_numpy(x)[None]
    w = torch.from_numpy(rng.normal(size=(1, n)))
    kwargs = dict(k=k, temperature=t, p=p)
    y_cpu, g_cpu = _route("cpu", _value_and_grad, xt, w, **kwargs)
    y_ref, g_ref = _route("torch", _value_and_grad, xt, w, **kwargs)
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(g_cpu, g_ref, rtol=1e-9, atol=1e-9, equal_nan=True)


def test_cpu_kernel_float32_and_ties():
    x = torch.tensor([[3.0, -3.0, 3.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]])
    y = _route("cpu", softtopk.topk_mag, x, 2, temperature=0.01)
    # ties at the k-th magnitude go to the lowest index; the third 3.0 is outside the top 2
    assert y.dtype == torch.float32
    for p in (2.0, 4.0 / 3.0):  # both routes break ties by the lowest index
        torch.testing.assert_close(
            _route("cpu", softtopk.topk_mag, x, 2, temperature=0.01, p=p),
            _route("torch", softtopk.topk_mag, x, 2, temperature=0.01, p=p),
        )
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("route", ["cpu", "torch"])
def test_p43_jacobian_at_a_tie_is_the_closed_form(route):
    # x = (1, 1), k = 1, l = 0.1: both entries pool at tau with 2 (1 - tau)^3 = l^3 tau; the
    # debiased output is z^3 + g (g = 1 - tau, z = g / l), so dy/dx = (3 z^2 / l + 1)(I - c 11^T)
    # with c = 3 g^2 / (6 g^2 + l^3).
    l = 0.1
    lo, hi = 0.5, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if 2 * (1 - mid) ** 3 > l**3 * mid else (lo, mid)
    g = 1.0 - 0.5 * (lo + hi)
    c = 3 * g * g / (6 * g * g + l**3)
    slope = 3 * (g / l) ** 2 / l + 1
    expected = slope * (torch.eye(2, dtype=torch.float64) - c)
    x = torch.ones(2, dtype=torch.float64)
    f = lambda v: softtopk.topk_mag(v, 1, temperature=l, p=4.0 / 3.0)  # noqa: E731
    jac = _route(route, torch.autograd.functional.jacobian, f, x)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=0)


def _bisect_gap(s1, delta, l):
    """g = s1 - tau of the block {s1 (top, pooled), s1 - delta (rest)}: g^3 + (g - delta)^3 = l^3 (s1 - g).

    Solved for g itself, whose digits survive however large s1 is.
    """
    lo, hi = delta, s1
    for _ in range(3000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if mid**3 + (mid - delta) ** 3 > l**3 * (s1 - mid) else (mid, hi)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("route", ["cpu", "torch"])
@pytest.mark.parametrize("s", [1e2, 1e8, 1e12, 1.68e14, 1e16, 1e20])
@pytest.mark.parametrize("near", [0.0, 0.5])
def test_p43_pooled_gaps_far_below_the_rounding_of_x(route, s, near):
    """Two (near-)tied entries s, s - delta at k = 1, l = 1e-6: gaps of l (s / 2)^(1/3).

    At s = 1e8 the gap is 4e-4, below the float64 rounding of s - tau for a rounded tau;
    the solver's unknown is tau's offset below the (k+1)-th magnitude, so the gaps keep
    their digits: the routes returned 5.0017e7 instead of 5e7 there, and [1.68e14, 2.44e14]
    for two ties of 1.68e14.
    """
    l = 1e-6
    delta = near * _bisect_gap(s, 0.0, l)
    second = s - delta
    if near:  # delta must be exact for the closed form: round it to what the input holds
        delta = s - second
    g = _bisect_gap(s, delta, l)
    gaps = torch.tensor([g, g - delta], dtype=torch.float64)
    expected = torch.cat([(gaps / l) ** 3 + gaps, torch.zeros(1, dtype=torch.float64)])
    x = torch.tensor([s, second, 0.3 * s], dtype=torch.float64, requires_grad=True)
    y = _route(route, softtopk.topk_mag, x, 1, temperature=l, p=4.0 / 3.0)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-12, atol=0)
    # Jacobian: dy_i/dx_j = (3 z_i^2 / l + 1)(delta_ij - c_j), c_j = 3 g_j^2 / (sum 3 g^2 + l^3)
    slope = 3 * (gaps / l) ** 2 / l + 1
    c = 3 * gaps**2 / (3 * (gaps**2).sum() + l**3)
    jac = torch.zeros(3, 3, dtype=torch.float64)
    jac[:2, :2] = slope[:, None] * (torch.eye(2, dtype=torch.float64) - c[None, :])
    f = lambda v: softtopk.topk_mag(v, 1, temperature=l, p=4.0 / 3.0)  # noqa: E731
    got = _route(route, torch.autograd.functional.jacobian, f, x.detach())
    torch.testing.assert_close(got, jac, rtol=1e-9, atol=0)


@pytest.mark.parametrize("route", ["cpu", "torch"])
def test_double_backward(route):
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    f = lambda v: softtopk.topk_mag(v, 3, temperature=0.5)  # noqa: E731
    assert _route(route, torch.autograd.gradgradcheck, f, (x,))
    g = lambda v: softtopk.topk_mag(v, 3, temperature=0.5, p=4.0 / 3.0)  # noqa: E731
    y = _route(route, g, x)
    w = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, torch.autograd.grad((_route(route, g, x) * w).sum(), x)[0])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((gx**2).sum(), x)


def test_cotangent_near_the_float32_limit():
    # The backward's coupling sum of a float32 cotangent overflowed (inf - inf = NaN).
    x = torch.tensor([[3.4028234663852886e38, 3.4028234663852886e38]], requires_grad=True)
    y = softtopk.topk_mag(x, 1)
    y.backward(y.detach())
    assert torch.isfinite(x.grad).all()
    x64 = x.detach().double().requires_grad_()
    y64 = softtopk.topk_mag(x64, 1)
    y64.backward(y64.detach())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=0)


def test_float64_beyond_the_solver_range_is_refused():
    # |x| (2 (1 + t))^3 overflowed float64: inf (t = 1e4) or zeros (t = 0.1) for tied rows.
    for t, a in [(1e4, 1e307), (0.1, 1e308)]:
        x = torch.tensor([[a, a]], dtype=torch.float64)
        with pytest.raises(ValueError, match="float64 range"):
            softtopk.topk_mag(x, 1, temperature=t)
    # Homogeneous in x and t: the rescaled row is answered.
    y = softtopk.topk_mag(torch.tensor([[1e3, 1e3]], dtype=torch.float64), 1, temperature=1e-1)
    assert torch.isfinite(y).all() and (y.abs() <= 1e3).all()


def test_cotangent_near_the_float64_limit():
    # The coupling sum of the backward is formed on the cotangent scaled by a power of two.
    x = torch.tensor([[3.0, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    v = torch.full((1, 3), 1.7e308, dtype=torch.float64)
    softtopk.topk_mag(x, 1, temperature=1.0).backward(v)
    assert torch.isfinite(x.grad).all()
    x2 = x.detach().clone().requires_grad_()
    softtopk.topk_mag(x2, 1, temperature=1.0).backward(v / 2.0**1000)
    torch.testing.assert_close(x.grad, x2.grad * 2.0**1000)


@pytest.mark.parametrize("route", ["cpu", "torch"])
def test_p43_keeps_huge_entries(route):
    # The kept entry's own value solves u^3 + l^3 u = l^3 s; Cardano's (l^3 s / 2)^2
    # overflowed float64 from abs(x) l^3 of about 1e154 on.
    x = torch.tensor([[0.0, 1e158], [0.0, 1e300]], dtype=torch.float64, requires_grad=True)
    y = _route(route, softtopk.topk_mag, x, 1, temperature=0.1, p=4.0 / 3.0)
    torch.testing.assert_close(y, x.detach() * torch.tensor([0.0, 1.0], dtype=torch.float64))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    plain = _route(route, softtopk.topk_mag, x.detach(), 1, temperature=0.1, p=4.0 / 3.0, debias=False)
    u = 0.1 * 1e158 ** (1 / 3)  # u ~ (l^3 s)^(1/3) when u >> l
    torch.testing.assert_close(plain[0, 1], torch.tensor(1e158 - u, dtype=torch.float64))


@pytest.mark.parametrize("route", ["torch", "cpu"])
@pytest.mark.parametrize("scale", [1e-11, 1.0, 1e11])
def test_the_solve_is_scale_free_in_x(route, scale):
    """For p = 2, l is dimensionless: rows of any magnitude converge to the isotonic oracle.

    The tensor route stopped its Newton steps at a tolerance in units of l, which left
    rows of magnitudes 1e-11 at l = 1e4 with the wrong block (2e-11 pooled).
    """
    base = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 4], dtype=np.float64)
    x = base * scale
    ref = oracles.isotonic_magnitude(x, 4, 1e4, True)
    y = _route(route, softtopk.topk_mag, torch.tensor(x)[None], 4, temperature=1e4)[0]
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("route", ["torch", "cpu"])
@pytest.mark.parametrize("l", [1e-4, 0.1])
def test_p43_float32_gradient_of_a_pooled_tie(route, l):
    """Two tied large entries, k = 1, small l: each gets half of the cotangent's pull.

    The diagonal (3 z^2 / l) and the coupling term nearly cancel; the tensor route rounded
    them to float32 before the backward and returned a zero gradient.
    """
    grads = []
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([[1e9, 1e9]], dtype=dtype, requires_grad=True)
        y = _route(route, softtopk.topk_mag, x, 1, temperature=l, p=4.0 / 3.0)
        (g,) = torch.autograd.grad(y.sum(), x)
        grads.append(g.double())
    torch.testing.assert_close(grads[1], torch.full_like(grads[1], 0.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("route", ["torch", "cpu"])
def test_p43_zero_entries_stay_zero_beside_tiny_ones(route):
    """tau >= 0 always (h(0) >= 0): the rounded bracket once put it below 0, and 0 came out 9e-316."""
    tiny = torch.finfo(torch.float64).tiny
    x = torch.tensor([[tiny] * 5 + [0.0], [tiny, 0.0, -0.0, tiny, 0.0, 0.0]], dtype=torch.float64)
    y = _route(route, softtopk.topk_mag, x, torch.tensor([5, 1]), temperature=1e-3, p=4.0 / 3.0)
    assert (y[x == 0] == 0).all(), y
    assert ((y.abs() <= x.abs()) | (x == 0)).all(), y


@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
def test_cpu_kernel_in_parallel_chunks_equals_the_tensor_route(p):
    """A batch above the serial size on two threads, ties and infinite entries included."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 2000, generator=g, dtype=torch.float64)
    x[:, ::7] = torch.round(x[:, ::7] * 2) / 2  # ties in magnitude
    x[3, 5] = math.inf
    w = torch.randn(40, 2000, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kwargs = {"k": 30, "temperature": 0.2, "p": p}
        y_cpu, g_cpu = _route("cpu", _value_and_grad, x, w, **kwargs)
        y_ref, g_ref = _route("torch", _value_and_grad, x, w, **kwargs)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_cpu, g_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
@pytest.mark.parametrize("route", ["torch", "cpu"])
def test_zero_entries_of_a_row_keeping_everything_get_zero_gradient(route, p):
    """k = n: every entry is kept (tau = -inf); abs has no slope at 0, so zeros get gradient 0.

    The CPU backward once passed the cotangent through at 0 there (found by the long
    property run, test_backends_agree[magnitude]).
    """
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, -1.0]], requires_grad=True)
    y = _route(route, softtopk.topk_mag, x, 3, temperature=0.1, p=p)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])), g


def _tied_block_gradient(s, n, k, l, v, debias):
    """grad_s of n ties at s (k of them in the top set) for p = 4/3, in 400-digit arithmetic.

    Every tie is in the pooled block with gap g = s - tau: n g^3 + k l^3 g = k l^3 s. With
    rho = 3 g^2 (= dh/ds_j), W = n rho + k l^3 and d = rho / l^3 (+ 1 debiased), the
    Jacobian in s is d (I - rho 11^T / W), so grad_s = d (v - rho sum(v) / W). The bracket
    cancels to a relative n l^3 / W (1e-208 at s = 1e300, l = 1e-8): hence the digits.
    """
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(400):
        s, l3 = mpmath.mpf(s), mpmath.mpf(l) ** 3
        # Newton from above the root (the cubic is convex for g > 0) descends onto it
        g = min(mpmath.cbrt(k * l3 * s / n), s)
        for _ in range(200):
            step = (n * g**3 + k * l3 * g - k * l3 * s) / (3 * n * g * g + k * l3)
            g -= step
            if abs(step) <= g * mpmath.mpf(10) ** -390:
                break
        rho = 3 * g * g
        weight = n * rho + k * l3
        d = rho / l3 + (1 if debias else 0)
        total = mpmath.fsum(mpmath.mpf(float(c)) for c in v)
        return [float(d * (mpmath.mpf(float(c)) - rho * total / weight)) for c in v]


@pytest.mark.parametrize("route", ["cpu", "torch"])
@pytest.mark.parametrize("debias", [True, False])
@settings(max_examples=40, deadline=None)
@given(
    exponent=st.floats(0.0, 300.0),
    log_l=st.floats(-8.0, 0.0),
    n=st.integers(2, 6),
    data=st.data(),
)
def test_p43_gradient_of_a_tied_block_with_near_equal_cotangents(route, debias, exponent, log_l, n, data):
    """n ties at s, k < n, p = 4/3: the cotangents' common part is not lost to rounding.

    The gradient is d (v - rho sum(v) / W), and with d = rho / l^3 + ... the bracket is
    the difference of two terms n l^3 / W apart in relative size: formed as written, the
    routes returned 4000256 against 3999744 at s = 1e8, l = 1e-6 and +-5.8e48 for a
    gradient of 1.4e37 at s = 3.4e38 (float32: +-inf). The error allowed here scales with
    the spread of the cotangents, not their size.
    """
    s, l = 10.0**exponent, 10.0**log_l
    if not math.isfinite(s * (2.0 * (1.0 + l)) ** 3):
        s = 1e300
    k = data.draw(st.integers(1, n - 1), label="k")
    spread = data.draw(st.sampled_from([0.0, 1e-9, 1e-3, 1.0]), label="spread")
    w = data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n), label="w")
    v = [1.0 + spread * c for c in w]
    expected = torch.tensor(_tied_block_gradient(s, n, k, l, v, debias), dtype=torch.float64)
    x = torch.full((n,), s, dtype=torch.float64, requires_grad=True)
    y = _route(route, softtopk.topk_mag, x, k, temperature=l, p=4.0 / 3.0, debias=debias)
    (got,) = torch.autograd.grad(y, x, torch.tensor(v, dtype=torch.float64))
    g = _tied_block_gradient(s, n, k, l, [1.0] * n, debias)[0]  # the common part's gradient
    d_spread = max(abs(a - b) for a in expected.tolist() for b in expected.tolist())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * (abs(g) + d_spread))


@pytest.mark.parametrize("route", ["cpu", "torch"])
@pytest.mark.parametrize("s", [1e8, 1e20, 3.0e38])
def test_p43_float32_gradient_of_a_tied_block_at_large_magnitudes(route, s):
    """Five ties in float32, k = 1, cotangent y: finite, and the float64 value (once +-inf)."""
    l = 1e-6 if s == 1e8 else 0.1
    x = torch.full((5,), s, dtype=torch.float32, requires_grad=True)
    y = _route(route, softtopk.topk_mag, x, 1, temperature=l, p=4.0 / 3.0)
    (got,) = torch.autograd.grad(y, x, y.detach())
    s32 = float(x[0].detach())
    expected = _tied_block_gradient(s32, 5, 1, l, [float(c) for c in y.detach()], True)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
