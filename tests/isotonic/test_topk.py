"""topk_mask(method="sparse", solver="pav" | "dykstra"): Sander et al.'s own routes.

They must agree with the threshold solver (solver="auto") to rounding, forward and
backward (in x and in k), including -inf padding, NaN rows, k = 0 and k = n; and the
gradient at tied saturated entries is the finite-difference derivative (0), which value-
based block recovery (the reference code) gets wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softtopk
from tests.conftest import random_rows


def _batch(rng, rows, n, ties=True):
    x = random_rows(rng, rows, n, ties=ties)
    k = rng.uniform(0.0, n, size=rows)
    integer = rng.random(rows) < 0.3
    k[integer] = np.floor(k[integer])
    k[rng.random(rows) < 0.05] = 0.0
    k[rng.random(rows) < 0.05] = float(n)
    return torch.from_numpy(x), torch.from_numpy(k)


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
@pytest.mark.parametrize("rows,n", [(300, 3), (300, 17), (100, 200), (20, 2000)])
def test_forward_equals_threshold_solver(rng, solver, rows, n):
    for t in (1e-3, 0.1, 1.0, 30.0):
        # Rounded scores put long runs of ties at the threshold: one pooled block of B
        # entries costs Dykstra ~2 B^2 iterations, so Dykstra gets untied rows here (ties:
        # test_saturated_ties_have_zero_gradient and the isotonic tests).
        x, k = _batch(rng, rows, n, ties=solver == "pav")
        ref = softtopk.topk_mask(x, k, temperature=t)
        if solver == "dykstra" and (t * n > 2.0 or t > 1.0 or n > 17):
            # Pooled blocks of many entries (also the runs clipped to +-20 in random_rows):
            # Dykstra needs ~2 B^2 iterations; its iteration counts are tested in
            # test_isotonic.py.
            continue
        got = softtopk.topk_mask(x, k, temperature=t, solver=solver)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0, equal_nan=True)


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
def test_backward_equals_threshold_solver(rng, solver):
    x, k = _batch(rng, 60, 40)
    x = torch.where(torch.isfinite(x), x + 1e-7 * torch.randn_like(x), x)  # no exact ties here
    v = torch.randn_like(x)
    grads = []
    for s in ("auto", solver):
        xr = x.clone().requires_grad_()
        kr = k.clone().requires_grad_()
        y = softtopk.topk_mask(xr, kr, temperature=0.3, solver=s)
        (y * v).nansum().backward()
        grads.append((xr.grad, kr.grad))
    finite = torch.isfinite(grads[0][0])
    torch.testing.assert_close(grads[1][0][finite], grads[0][0][finite], atol=1e-10, rtol=0)
    # An integer k whose mask is hard (no entry strictly inside (0, 1)) is a kink in k:
    # raising k lifts the (k+1)-th entry, lowering it lowers the k-th. The threshold solver
    # returns 0 there (no active entry); the isotonic route returns the central difference
    # (half of each one-sided derivative, so d sum(y)/dk = 1; checked on many rows by
    # test_k_gradient_at_a_hard_integer_k_is_the_central_difference). Both agree elsewhere.
    y = softtopk.topk_mask(x, k, temperature=0.3)
    kink = (k == k.round()) & ~((y > 0) & (y < 1)).any(-1)
    assert 0 < int(kink.sum()) < len(k)
    torch.testing.assert_close(grads[1][1][~kink], grads[0][1][~kink], atol=1e-10, rtol=0, equal_nan=True)


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
def test_k_gradient_at_a_hard_integer_k_is_the_central_difference(solver):
    """At an integer k with a hard mask the k-gradient is the average of the one-sided ones.

    Rounding used to put a saturated entry a hair above 1, where the final clamp cut its
    half of the derivative (72 of 187 such rows disagreed with the central difference).
    """
    g = torch.Generator().manual_seed(5)
    x = 3.0 * torch.randn(400, 8, dtype=torch.float64, generator=g)
    k = torch.randint(1, 8, (400,), generator=g).to(torch.float64)
    t = 0.05
    y = softtopk.topk_mask(x, k, temperature=t)
    hard = ~((y > 0) & (y < 1)).any(-1)
    x, k = x[hard], k[hard]
    assert len(k) > 100
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)
    kr = k.clone().requires_grad_()
    (softtopk.topk_mask(x, kr, temperature=t, solver=solver) * v).sum().backward()
    h = 1e-6

    def f(kk):
        return (softtopk.topk_mask(x, kk, temperature=t, solver=solver) * v).sum(-1)

    torch.testing.assert_close(kr.grad, (f(k + h) - f(k - h)) / (2 * h), atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
def test_gradcheck(solver):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.tensor([2.5, 3.0, 6.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, k: softtopk.topk_mask(x, k, temperature=0.7, solver=solver), (x, k)
    )


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
def test_saturated_ties_have_zero_gradient(solver):
    # The example of the reference notes: x = (3, 3, 0.5, 0.2, -1), k = 3, l = 0.1.
    # The two 3's are saturated (y = 1): their derivative is 0, whatever the tie.
    x = torch.tensor([3.0, 3.0, 0.5, 0.2, -1.0], dtype=torch.float64)

    def fn(x):
        return softtopk.topk_mask(x, 3, temperature=0.1, solver=solver)

    jac = torch.autograd.functional.jacobian(fn, x)
    h = 1e-6
    fd = torch.stack([(fn(x + h * e) - fn(x - h * e)) / (2 * h) for e in torch.eye(5, dtype=x.dtype)], -1)
    torch.testing.assert_close(jac, fd, atol=1e-6, rtol=0)
    assert jac[:2].abs().max() == 0 and jac[:, :2].abs().max() == 0
    torch.testing.assert_close(
        jac, torch.autograd.functional.jacobian(lambda x: softtopk.topk_mask(x, 3, temperature=0.1), x)
    )


def test_p_other_than_two_is_refused():
    with pytest.raises(ValueError, match="needs p = 2"):
        softtopk.topk_mask(torch.randn(4), 2, solver="pav", p=4.0 / 3.0)
    with pytest.raises(ValueError, match="solver must be one of"):
        softtopk.topk_mask(torch.randn(4), 2, method="entropic", solver="pav")


def test_float32_any_dim(rng):
    x = torch.from_numpy(rng.normal(size=(4, 30, 3))).float()
    got = softtopk.topk_mask(x, 5, dim=1, temperature=0.2, solver="pav")
    ref = softtopk.topk_mask(x, 5, dim=1, temperature=0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_float32_is_exact_when_abs_x_over_t_is_large():
    y = softtopk.topk_mask(torch.tensor([[0.3, -0.2, 1.5, 0.7]]), 2.5, temperature=1e-8, solver="pav")
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.0, 1.0, 1.0]]))
    x = torch.tensor([[3.0, 1.0, 2.0]]) + 1e6
    for solver in ("pav", "dykstra"):
        torch.testing.assert_close(
            softtopk.topk_mask(x, 1.5, temperature=0.1, solver=solver),
            softtopk.topk_mask(x, 1.5, temperature=0.1),
        )


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_spanning_many_orders_of_magnitude(solver, dtype, recwarn):
    # abs(x) / t = 1e16: the saturated entry is a block of one and keeps y = 1 exactly,
    # and the small entries are still ordered (a row-wide rounding margin hid their violation).
    x = torch.tensor([[0.0, 0.0, 1.1259e15]], dtype=dtype)
    y = softtopk.topk_mask(x, 2, temperature=0.1, solver=solver)
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.5, 1.0]], dtype=dtype))
    assert not recwarn.list


def test_dykstra_keeps_a_tied_pair_pooled_at_large_x_over_t():
    """Dykstra's certificate refined blocks at 'ties' within its order slack (64 ulps of 3e7):
    the tied pair [3e7, 3e7] at t = 1e-6, k = 0.5 was split into [0.5, 0] instead of [0.25, 0.25].
    """
    x = torch.tensor([[3e7, 3e7], [3e7 + 1.0, 3e7 + 1.0], [3e7, 3e7 - 1e-6]], dtype=torch.float64)
    pav = softtopk.topk_mask(x, 0.5, temperature=1e-6, solver="pav")
    dykstra = softtopk.topk_mask(x, 0.5, temperature=1e-6, solver="dykstra")
    torch.testing.assert_close(dykstra, pav, rtol=0, atol=1e-9)
    torch.testing.assert_close(dykstra[:2], torch.full((2, 2), 0.25, dtype=torch.float64), rtol=0, atol=1e-9)
