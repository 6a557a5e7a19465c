"""Gradients of the threshold family: gradcheck in float64 and the closed-form Jacobian.

J = diag(g) - g g^T / sum(g) with g_i = G'((x_i - tau)/t)/t, dy/dk = g / sum(g); the
oracle's tau comes from a float64 bisection (tests/reference), independent of the solver.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softtopk
from tests.reference import oracles

CASES = [
    ("sparse", 2.0, "sparse"),
    ("sparse", 4.0 / 3.0, "sparse"),
    ("entropic", 2.0, "logistic"),
    ("lapsum", 2.0, "laplace"),
]


def _slopes(link: str, z: np.ndarray, p: float) -> np.ndarray:
    if link == "sparse":
        a = 1.0 / (p - 1.0)
        inside = (z > 0) & (z < 1)
        return np.where(inside, a * np.clip(z, 0, 1) ** (a - 1.0), 0.0)
    if link == "logistic":
        y = 1.0 / (1.0 + np.exp(-z))
        return y * (1 - y)
    return 0.5 * np.exp(-np.abs(z))


def _tau_by_bisection(x: np.ndarray, k: float, t: float, link: str, p: float) -> float:
    lo, hi = x.min() - 50 * t - 1, x.max() + 50 * t + 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if oracles.link_value(link, (x - mid) / t, p).sum() > k:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("method,p,link", CASES)
@pytest.mark.parametrize("solver", ["auto", "newton"])
@pytest.mark.parametrize("n", [7, 40, 600])
@pytest.mark.slow
def test_gradcheck_in_x_and_k(method, p, link, solver, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.tensor([1.5, n / 3.0, n - 1.25], dtype=torch.float64, requires_grad=True)

    def f(x, k):
        return softtopk.topk_mask(x, k, method=method, p=p, temperature=0.3, solver=solver)

    assert torch.autograd.gradcheck(f, (x, k), fast_mode=n > 100)


@pytest.mark.parametrize("method,p,link", CASES)
def test_jacobian_equals_closed_form(method, p, link):
    rng = np.random.default_rng(0)
    for n, k, t in [(6, 2.0, 0.5), (30, 7.5, 0.2), (300, 40.0, 0.05)]:
        x = rng.normal(size=n)
        xt = torch.from_numpy(x)
        J = torch.autograd.functional.jacobian(
            lambda a: softtopk.topk_mask(a, k, method=method, p=p, temperature=t), xt
        )
        tau = _tau_by_bisection(x, k, t, link, p)
        g = _slopes(link, (x - tau) / t, p) / t
        expected = np.diag(g) - np.outer(g, g) / g.sum()
        np.testing.assert_allclose(J.numpy(), expected, atol=1e-7)
        # Symmetric, rows sum to zero, zero outside the support of g.
        np.testing.assert_allclose(J.numpy(), J.numpy().T, atol=1e-12)
        np.testing.assert_allclose(J.numpy().sum(1), 0.0, atol=1e-9)
        kt = torch.tensor(k, dtype=torch.float64, requires_grad=True)
        dk = torch.autograd.functional.jacobian(
            lambda kk: softtopk.topk_mask(xt, kk, method=method, p=p, temperature=t), kt
        )
        np.testing.assert_allclose(dk.numpy(), g / g.sum(), atol=1e-7)


def test_sparse_p2_second_derivative_is_zero_almost_everywhere():
    x = torch.randn(2, 30, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 30, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: softtopk.topk_mask(a, 5, temperature=0.5), (x,), (v,))


SECOND_ORDER = [("sparse", 2.0), ("sparse", 4.0 / 3.0), ("entropic", 2.0), ("lapsum", 2.0), ("soft", 2.0)]
# SOFT as published treats its cost normaliser C_max (a function of x) as a constant in the
# backward, so its derivatives are those of the mask at fixed C_max: finite differences of
# x, which move C_max, are not its oracle. The Jacobian-based checks cover it.
EXACT = [case for case in SECOND_ORDER if case[0] != "soft"]


def _mask(method, p, t=0.4):
    return lambda a, k=3.5: softtopk.topk_mask(a, k, method=method, p=p, temperature=t)


def _block_jacobian(f, x):
    """The (B, n, n) Jacobian of a row-wise f, one row at a time."""
    return torch.stack([torch.autograd.functional.jacobian(f, x[i : i + 1])[0, :, 0] for i in range(len(x))])


@pytest.mark.parametrize("method,p", SECOND_ORDER)
def test_double_backward_equals_two_j_jt_w(method, p):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    f = _mask(method, p)
    (gz,) = torch.autograd.grad((f(z) * w).sum(), z, create_graph=True)
    (gw,) = torch.autograd.grad((gz**2).sum(), w)
    assert gw is not None
    J = _block_jacobian(f, z.detach())
    expected = 2.0 * torch.einsum("bij,bkj,bk->bi", J, J, w.detach())
    torch.testing.assert_close(gw, expected, atol=1e-10, rtol=1e-8)
    assert gw.abs().max() > 1e-3  # not vacuous


@pytest.mark.parametrize("method,p", EXACT)
def test_gradgradcheck_in_x_and_k(method, p):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.tensor([2.5, 4.0], dtype=torch.float64, requires_grad=True)
    f = lambda a, kk: softtopk.topk_mask(a, kk, method=method, p=p, temperature=0.6)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, k))


@pytest.mark.parametrize("method,p", EXACT)
def test_hessian_equals_finite_differences_of_the_gradient(method, p):
    """An oracle independent of the double backward: central differences of the gradient."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, dtype=torch.float64, generator=gen)
    w = torch.randn(10, dtype=torch.float64, generator=gen)
    f = _mask(method, p, t=0.8)
    loss = lambda a: (f(a) * w).sum()  # noqa: E731
    H = torch.func.hessian(loss)(x)
    h = 1e-6
    grad = torch.func.grad(loss)
    fd = torch.stack(
        [(grad(x + h * e) - grad(x - h * e)) / (2 * h) for e in torch.eye(10, dtype=torch.float64)]
    )
    torch.testing.assert_close(H, fd, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,p", SECOND_ORDER)
def test_forward_mode_equals_the_jacobian(method, p):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 11, dtype=torch.float64, generator=gen)
    u = torch.randn(3, 11, dtype=torch.float64, generator=gen)
    f = _mask(method, p)
    _, ju = torch.func.jvp(f, (x,), (u,))
    J = _block_jacobian(f, x)
    torch.testing.assert_close(ju, torch.einsum("bij,bj->bi", J, u), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x))
    # ... and in k: dy/dk = g / sum(g).
    k = torch.tensor([1.5, 3.0, 7.25], dtype=torch.float64)
    _, jk = torch.func.jvp(lambda kk: f(x, kk), (k,), (torch.ones(3, dtype=torch.float64),))
    jac_k = torch.autograd.functional.jacobian(lambda kk: f(x, kk), k)
    torch.testing.assert_close(jk, jac_k.sum(-1))


@pytest.mark.parametrize("method,p", SECOND_ORDER)
def test_eager_forward_mode_with_dual_tensors(method, p):
    """torch.autograd.forward_ad on tensors that do not require grad: an eager call with
    nothing to differentiate in reverse mode skips autograd, but not inside a dual level,
    where x or k carries a tangent."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 11, dtype=torch.float64, generator=gen)
    u = torch.randn(3, 11, dtype=torch.float64, generator=gen)
    k = torch.tensor([1.5, 3.0, 7.25], dtype=torch.float64)
    f = _mask(method, p)
    J = _block_jacobian(f, x)
    with fwAD.dual_level():
        y, ju = fwAD.unpack_dual(f(fwAD.make_dual(x, u)))
        _, jk = fwAD.unpack_dual(f(x, fwAD.make_dual(k, torch.ones(3, dtype=torch.float64))))
    assert ju is not None and jk is not None
    torch.testing.assert_close(ju, torch.einsum("bij,bj->bi", J, u), atol=1e-10, rtol=1e-8)
    jac_k = torch.autograd.functional.jacobian(lambda kk: f(x, kk), k)
    torch.testing.assert_close(jk, jac_k.sum(-1))
    with torch.no_grad():
        torch.testing.assert_close(f(x), y, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("route", ["cpu", "torch"])
@pytest.mark.parametrize("method,p", [*EXACT, ("sparse", 1.7)])
def test_forward_over_forward_equals_reverse_over_reverse(monkeypatch, route, method, p):
    """jacfwd(jacfwd) and the third forward derivative against reverse mode, in x and k.

    torch.func does not differentiate an autograd.Function's jvp by an outer jvp (it
    returned 0 for every second derivative); nested forward mode takes the mask with
    tau from two Newton steps, whose derivatives are exact to the third order. Rows of
    a batch with a -inf entry, a +inf entry (k shared by the rest) and a row set by a
    rule (k = 0) are among them.
    """
    monkeypatch.setenv("SOFTTOPK_BACKEND", route)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 7, dtype=torch.float64, generator=gen)
    x[1, 2], x[2, 5] = -math.inf, math.inf
    w = torch.randn(4, 7, dtype=torch.float64, generator=gen)
    k = torch.tensor([2.5, 3.0, 1.5, 0.0], dtype=torch.float64)
    loss = lambda a, kk: (softtopk.topk_mask(a, kk, method=method, p=p, temperature=0.7) * w).sum()  # noqa: E731
    fwd, rev = torch.func.jacfwd, torch.func.jacrev
    H = rev(rev(loss))(x, k)
    assert H.abs().max() > 1e-3 or (method, p) == ("sparse", 2.0)
    torch.testing.assert_close(fwd(fwd(loss))(x, k), H, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.func.hessian(loss)(x, k), H, rtol=1e-9, atol=1e-12)
    H_k = rev(rev(loss, argnums=1), argnums=1)(x, k)
    torch.testing.assert_close(fwd(fwd(loss, argnums=1), argnums=1)(x, k), H_k, rtol=1e-9, atol=1e-12)
    x1, w1 = x[:1], w[:1]
    third = lambda a: (softtopk.topk_mask(a, 2.5, method=method, p=p, temperature=0.7) * w1).sum()  # noqa: E731
    torch.testing.assert_close(fwd(fwd(fwd(third)))(x1), rev(rev(rev(third)))(x1), rtol=1e-8, atol=1e-11)


def test_forward_over_forward_keeps_the_values_and_nan_rows():
    """Nested forward mode returns the solved mask itself, and NaN rows a NaN derivative."""
    x = torch.tensor([[0.3, -1.2, 2.0, 0.7], [0.1, math.nan, 0.4, 0.2]], dtype=torch.float64)
    u = torch.ones_like(x)
    f = lambda a: softtopk.topk_mask(a, 2.0, method="entropic", temperature=0.5)  # noqa: E731
    inner = lambda a: torch.func.jvp(f, (a,), (u,))  # noqa: E731
    (y, dy), (_, ddy) = torch.func.jvp(inner, (x,), (u,))
    torch.testing.assert_close(y, f(x), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(dy[1]).all() and torch.isnan(ddy[1]).all()
    assert torch.isfinite(dy[0]).all() and torch.isfinite(ddy[0]).all()


@pytest.mark.parametrize("method,p,link", CASES)
def test_gradients_are_finite_at_degenerate_inputs(method, p, link):
    rows = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # constant row
            [2.0, 2.0, 2.0, 0.0, 0.0, -1.0],  # ties at the boundary
            [3.0, -math.inf, 1.0, -math.inf, 0.5, 2.0],  # padding
            [math.inf, 1.0, 0.0, -1.0, 2.0, 3.0],  # +inf
            [1e30, -1e30, 0.0, 1.0, 2.0, 3.0],  # huge values
            [1e-30, 2e-30, 0.0, -1e-30, 3e-30, 4e-30],  # tiny values
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    for k in (0.0, 2.0, 3.0, 6.0):
        y = softtopk.topk_mask(rows, k, method=method, p=p, temperature=0.5)
        assert torch.isfinite(y).all()
        (g,) = torch.autograd.grad((y * torch.arange(6.0, dtype=torch.float64)).sum(), rows)
        assert torch.isfinite(g).all(), (k, g)
        # -inf padding and +inf entries get no gradient.
        assert (g[~torch.isfinite(rows.detach())] == 0).all()


def test_tied_saturated_entries_have_zero_gradient():
    """The reference recovers blocks from values and gets +-1/(2l) here; the truth is 0."""
    x = torch.tensor([3.0, 3.0, 0.5, 0.2, -1.0], dtype=torch.float64, requires_grad=True)
    J = torch.autograd.functional.jacobian(lambda a: softtopk.topk_mask(a, 3, temperature=0.1), x)
    assert torch.equal(J[:2], torch.zeros(2, 5, dtype=torch.float64))


# ------------------------------------------------- dense links near the hard mask


def _dense_oracle(
    x: list[float], v: list[float], k: float, t: float, method: str
) -> tuple[float, list[float], float]:
    """grad_k = <g, v>/sum g, grad_x = g (v - grad_k) and max g at 40 digits (mpmath), g = G'(z)/t.

    tau by bisection on sum G(z) - k, with each entry above tau counted as 1 - G(-z), so
    that no 1 - G is rounded away (mpmath's exponent range has no underflow either).
    """
    import mpmath as mp

    with mp.workdps(40):
        xs, vs, tm, km = [mp.mpf(a) for a in x], [mp.mpf(a) for a in v], mp.mpf(t), mp.mpf(k)
        laplace = method == "lapsum"

        def lower(z):  # G(z) for z <= 0
            return mp.exp(z) / 2 if laplace else 1 / (1 + mp.exp(-z))

        def f(tau):
            zs = [(a - tau) / tm for a in xs]
            above = sum(1 for z in zs if z > 0)
            return (above - km) + sum(lower(z) if z <= 0 else -lower(-z) for z in zs)

        lo, hi = min(xs) - 3000 * tm, max(xs) + 3000 * tm
        for _ in range(220):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        tau = (lo + hi) / 2
        e = [mp.exp(-abs((a - tau) / tm)) for a in xs]
        g = [b / 2 if laplace else b / (1 + b) ** 2 for b in e]
        c = sum(a * b for a, b in zip(g, vs, strict=True)) / sum(g)
        return float(c), [float(a / tm * (b - c)) for a, b in zip(g, vs, strict=True)], float(max(g) / tm)


@given(
    n=st.integers(2, 8),
    seed=st.integers(0, 2**16),
    t=st.sampled_from([0.05, 0.02, 0.005, 1e-3]),
    frac=st.sampled_from([0.0, 0.25]),
    method=st.sampled_from(["entropic", "lapsum"]),
    route=st.sampled_from(["cpu", "torch"]),
)
@settings(max_examples=40, deadline=None)
def test_dense_gradients_near_the_hard_mask_equal_a_40_digit_oracle(n, seed, t, frac, method, route):
    """The dense links' gradient in k (and in x) on rows whose entries saturate.

    With gaps of 0.05 to 3 between entries and t down to 1e-3, |z| runs from about 5 to
    3000, where 1 - y has rounded: a slope taken from y (y (1 - y), min(y, 1 - y)) made
    grad_k wrong by O(1) (1.34 against 0.567 on the first example). Beyond |z| = 745
    every slope underflows in float64, and only their ratios are left.
    """
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.uniform(0.05, 3.0, n)) * rng.choice([-1.0, 1.0])
    rng.shuffle(x)
    v = rng.standard_normal(n)
    k = float(rng.integers(1, n)) + frac
    c, gx, gmax = _dense_oracle(list(x), list(v), k, t, method)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTTOPK_BACKEND", route)
        for dtype, rtol in ((torch.float64, 1e-8), (torch.float32, 2e-5)):
            xt = torch.tensor(x, dtype=dtype).reshape(1, n).requires_grad_()
            kt = torch.tensor([k], dtype=torch.float64, requires_grad=True)
            y = softtopk.topk_mask(xt, kt, method=method, temperature=t)
            (y * torch.tensor(v, dtype=dtype)).sum().backward()
            # x in float32 is x rounded: the oracle of those entries
            c32, gx32, _ = (
                (c, gx, gmax)
                if dtype == torch.float64
                else _dense_oracle([float(a) for a in xt.detach()[0]], list(v), k, t, method)
            )
            assert kt.grad.item() == pytest.approx(c32, rel=rtol, abs=1e-12)
            # grad_x = g (v - c) is exact up to rounding of v - c: an error of about
            # eps max(g) max|v|, which is all of it where c is within rounding of a v_i
            # (and below the dtype's smallest normal number it underflows)
            atol = rtol * gmax * np.abs(v).max() + torch.finfo(dtype).tiny
            torch.testing.assert_close(
                xt.grad[0].double(), torch.tensor(gx32, dtype=torch.float64), rtol=rtol * 10, atol=atol
            )


@pytest.mark.parametrize("route", ["cpu", "torch"])
def test_dense_gradient_in_k_holds_where_every_slope_underflows(monkeypatch, route):
    """t = 1e-3 with entries 1 to 3 apart: every |z| exceeds 745, so every G'(z) is 0 in
    float64, and grad_k = <g, v>/sum g is still an O(1) weighted mean of v. The backward
    sums slopes scaled by the largest; the solvers sum the fractions apart from the
    counts (the tensor-op solver scaled by the largest fraction too)."""
    x = [-3.1, 0.2, 2.9, 6.0]
    v = [0.7, -1.3, 0.4, 2.2]
    for method in ("entropic", "lapsum"):
        c, _, _ = _dense_oracle(x, v, 2.0, 1e-3, method)
        xt = torch.tensor([x], dtype=torch.float64)
        kt = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        monkeypatch.setenv("SOFTTOPK_BACKEND", route)
        y = softtopk.topk_mask(xt, kt, method=method, temperature=1e-3)
        (y * torch.tensor([v], dtype=torch.float64)).sum().backward()
        assert abs(c) > 0.1
        assert kt.grad.item() == pytest.approx(c, rel=1e-9)


@pytest.mark.parametrize("route", ["cpu", "torch"])
@pytest.mark.parametrize("method", ["entropic", "lapsum"])
def test_dense_derivatives_near_the_hard_mask(monkeypatch, route, method):
    """gradcheck in x and k, gradgradcheck in x and forward mode in k on rows near the hard mask.

    (On the first row, k = 2 sits in a gap of about 80 t: d grad_k / dk is about
    1/sum g, 1e16, and a finite difference in k there spans the gap, so the second
    derivative in k is not checked by finite differences.)
    """
    from torch.autograd.forward_ad import dual_level, make_dual, unpack_dual

    monkeypatch.setenv("SOFTTOPK_BACKEND", route)
    x = torch.tensor([[-3.993415, -0.103670, 1.486851], [0.3, -0.4, 1.1]], dtype=torch.float64)
    x.requires_grad_()
    k = torch.tensor([2.0, 1.0], dtype=torch.float64, requires_grad=True)
    f = lambda a, kk: softtopk.topk_mask(a, kk, method=method, temperature=0.05)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, k))
    assert torch.autograd.gradgradcheck(lambda a: f(a, k.detach()), (x,))
    v = torch.tensor([[1.336932, -0.202765, 0.022415], [0.5, 1.0, -2.0]], dtype=torch.float64)
    (grad_k,) = torch.autograd.grad((f(x, k) * v).sum(), k)
    assert grad_k[0].item() == pytest.approx(0.5670835, rel=1e-6)  # a central difference
    with dual_level():
        y = f(x.detach(), make_dual(k.detach(), torch.ones(2, dtype=torch.float64)))
        tangent = unpack_dual(y).tangent
    torch.testing.assert_close((tangent * v).sum(-1), grad_k, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("code", [0, 2, 3], ids=["clip", "logistic", "laplace"])
def test_threshold_bwd_op_checks_and_vmaps_with_the_dense_links_x(code):
    """The backward op's schema, fake and autograd registration (opcheck) with x for the
    dense links and None for the sparse ones, and its vmap rule against the loop."""
    from softtopk.threshold import _ops

    gen = torch.Generator().manual_seed(code)
    x = torch.randn(3, 4, 9, dtype=torch.float64, generator=gen)
    v = torch.randn(3, 4, 9, dtype=torch.float64, generator=gen)
    k = torch.full((4,), 2.5, dtype=torch.float64)
    t = torch.full((4,), 0.3, dtype=torch.float64)
    outs = [_ops.forward_impl(x[i], k, t, code, 2.0, 0) for i in range(3)]
    y = torch.stack([o[0] for o in outs])
    tau = torch.stack([o[1] for o in outs])
    xs = x if code >= 2 else None
    op = torch.ops.softtopk.threshold_bwd
    torch.library.opcheck(op, (y[0], tau[0], t, v[0], code, 2.0, None if xs is None else xs[0]))
    vmapped = torch.func.vmap(
        lambda a, b, c, d: op(a, b, t, c, code, 2.0, d), in_dims=(0, 0, 0, None if xs is None else 0)
    )
    gx, gk = vmapped(y, tau, v, xs)
    for i in range(3):
        ref_x, ref_k = op(y[i], tau[i], t, v[i], code, 2.0, None if xs is None else xs[i])
        torch.testing.assert_close(gx[i], ref_x)
        torch.testing.assert_close(gk[i], ref_k)
