"""DFTopK (Zhu et al. 2025) against its sort-based definition and its closed-form Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import softtopk
from softtopk.ops._dftopk import dftopk_threshold
from tests.reference import oracles


def dftopk(x, k, **kw):
    return softtopk.topk_mask(x, k, method="dftopk", **kw)


@pytest.mark.parametrize("n", [2, 5, 40, 1000])
def test_equals_sort_based_definition(rng, n):
    for t in (0.01, 0.3, 5.0):
        x = rng.normal(size=(6, n))
        for k in sorted({1, n // 2, n - 1} - {0}):
            y = dftopk(torch.from_numpy(x), k, temperature=t).numpy()
            ref = np.stack([oracles.dftopk_sorted(row, k, t) for row in x])
            np.testing.assert_allclose(y, ref, atol=1e-12, rtol=0)


def test_per_row_k_equals_rowwise(rng):
    x = torch.from_numpy(rng.normal(size=(5, 30)))
    k = torch.tensor([1.0, 4.0, 4.0, 17.0, 29.0], dtype=torch.float64)
    y = dftopk(x, k, temperature=0.2)
    for i in range(5):
        ref = oracles.dftopk_sorted(x[i].numpy(), int(k[i]), 0.2)
        np.testing.assert_allclose(y[i].numpy(), ref, atol=1e-12, rtol=0)


def test_sum_is_not_k_by_design(rng):
    """The paper relaxes the normalisation: sum(y) -> k only as t -> 0; t -> inf gives 1/2."""
    x = torch.from_numpy(rng.normal(size=(4, 12)))
    sums = [dftopk(x, 4, temperature=t).sum(-1) for t in (1e-3, 0.5, 1e6)]
    torch.testing.assert_close(sums[0], torch.full((4,), 4.0, dtype=torch.float64), atol=1e-3, rtol=0)
    assert ((sums[1] - 4.0).abs() > 1e-3).all()
    torch.testing.assert_close(sums[2], torch.full((4,), 6.0, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,k", [(6, 1), (12, 4), (30, 29)])
def test_jacobian_equals_closed_form(rng, n, k):
    """Each entry couples to itself and to the two boundary entries (Zhu et al., Sec. 3)."""
    for t in (0.1, 1.0):
        x = torch.from_numpy(rng.normal(size=n))
        jac = torch.autograd.functional.jacobian(lambda a: dftopk(a, k, temperature=t), x)
        np.testing.assert_allclose(jac.numpy(), oracles.dftopk_jacobian(x.numpy(), k, t), atol=1e-12, rtol=0)


def test_gradcheck_float64(rng):
    x = torch.from_numpy(rng.normal(size=(3, 17))).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: dftopk(a, 5, temperature=0.4), (x,))
    # Per-row k takes the topk route instead of kthvalue.
    k = torch.tensor([2.0, 5.0, 9.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: dftopk(a, k, temperature=0.4), (x,))


def test_hard_limit_and_selection_without_sort(rng):
    x = torch.from_numpy(rng.normal(size=(8, 500)))
    y = dftopk(x, 10, temperature=1e-9)
    hard = torch.zeros_like(x).scatter_(-1, x.topk(10, dim=-1).indices, 1.0)
    torch.testing.assert_close(y, hard, atol=1e-12, rtol=0)


def test_real_k_interpolates_rank_k_plus_half():
    x = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    # Integer k: the midpoint. k = 2.25 -> rank 2.75: x_(2) + 0.75 (x_(3) - x_(2)) = 3.25.
    torch.testing.assert_close(
        dftopk_threshold(x, torch.tensor([2.0])), torch.tensor([3.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        dftopk_threshold(x, torch.tensor([2.25])), torch.tensor([3.25], dtype=torch.float64)
    )
    # k in (0, 1/2) and (n - 1/2, n): the rank is clamped into [1, n].
    torch.testing.assert_close(
        dftopk_threshold(x, torch.tensor([0.2])), torch.tensor([5.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        dftopk_threshold(x, torch.tensor([4.9])), torch.tensor([1.0], dtype=torch.float64)
    )


def test_ties_at_the_boundary_get_one_half():
    x = torch.tensor([[3.0, 1.0, 1.0, -2.0]], dtype=torch.float64)
    y = dftopk(x, 2, temperature=0.1)
    torch.testing.assert_close(y[0, 1:3], torch.tensor([0.5, 0.5], dtype=torch.float64))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(dftopk(xr, 2, temperature=0.1).sum(), xr)
    assert torch.isfinite(g).all()


def test_row_rules_and_padding():
    inf = math.inf
    x = torch.tensor(
        [
            [1.0, 2.0, -inf, 0.5, -inf],  # padding
            [1.0, -inf, -inf, -inf, -inf],  # fewer finite entries than k: ones
            [inf, 0.0, 1.0, inf, 2.0],  # two +inf, k = 2: k / #inf on them
            [inf, 0.0, 1.0, -1.0, 2.0],  # one +inf: it gets 1, threshold among the rest
            [math.nan, 0.0, 1.0, 2.0, 3.0],  # NaN row
        ],
        dtype=torch.float64,
    )
    xr = x.clone().requires_grad_()
    y = dftopk(xr, 2, temperature=0.1)
    ref0 = oracles.dftopk_sorted(np.array([1.0, 2.0, 0.5]), 2, 0.1)
    np.testing.assert_allclose(y[0, [0, 1, 3]].detach().numpy(), ref0, atol=1e-12)
    assert (y[0, [2, 4]] == 0).all()
    torch.testing.assert_close(y[1], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(y[2], torch.tensor([1.0, 0, 0, 1.0, 0], dtype=torch.float64))
    assert y[3, 0] == 1.0
    torch.testing.assert_close(y[3, 1:], torch.sigmoid((x[3, 1:] - 1.5) / 0.1))
    assert torch.isnan(y[4]).all()
    (g,) = torch.autograd.grad(y[:4].sum(), xr)
    assert torch.isfinite(g[:4]).all()
    assert (g[0, [2, 4]] == 0).all() and (g[1] == 0).all() and (g[2] == 0).all()
    assert torch.equal(dftopk(x[:4], 0), torch.zeros(4, 5, dtype=torch.float64))


def test_not_differentiable_in_k():
    with pytest.raises(ValueError, match="not differentiable in k"):
        dftopk(torch.randn(3, 5), torch.tensor([1.0, 2.0, 3.0], requires_grad=True))


def test_tied_boundary_entries_share_the_threshold_gradient():
    """At ties the threshold's gradient is split evenly among the tied entries.

    Which tied entry ``torch.kthvalue`` or ``torch.topk`` returns is arbitrary: a row's
    gradient changed with the other rows of its batch (they decide which selection runs).
    """
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    k_same = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    k_mixed = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # other ranks: the topk route
    w = torch.tensor([[1.0, 2.0, 3.0]] * 3, dtype=torch.float64)
    grads = []
    for k in (k_same, k_mixed):
        xr = x.clone().requires_grad_()
        y = softtopk.topk_mask(xr, k, method="dftopk", temperature=0.3)
        (g,) = torch.autograd.grad((y * w).sum(), xr)
        grads.append(g)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    # closed form: theta = mean of the tied entries, dy_i/dx_j = y(1 - y)/t (delta_ij - [j tied]/m)
    y0 = torch.full((3,), 0.5, dtype=torch.float64)
    jac = (y0 * (1 - y0) / 0.3).unsqueeze(-1) * (torch.eye(3, dtype=torch.float64) - 1.0 / 3.0)
    torch.testing.assert_close(grads[0][0], w[0] @ jac, rtol=1e-12, atol=1e-12)
    # row 2: x_(1) = 2 is alone, x_(2) = 1 is tied twice: theta = 1.5, half of 1/2 to each copy
    y2 = torch.sigmoid((x[2] - 1.5) / 0.3)
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    dtheta = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    jac2 = (y2 * (1 - y2) / 0.3).unsqueeze(-1) * (d - dtheta)
    torch.testing.assert_close(grads[0][2], w[2] @ jac2, rtol=1e-12, atol=1e-12)
